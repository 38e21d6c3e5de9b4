"""Samples as tensors in one jagged sparse layout (values + offsets per feature).

Two entry points build a :class:`TensorBatch`, and both end in the same function, so training and
serving cannot disagree on a feature:

* :func:`record_batch_to_tensors` for training, straight from an Arrow record batch of the sample
  log;
* :func:`instances_to_tensors` for serving, from request instances (feature dicts as JSON gives
  them).

Serving also decodes requests column by column: :func:`columns_from_instances`,
:func:`columns_from_lists` (a JSON object of one list per feature) and :func:`columns_from_arrow`
(an Arrow record batch) validate a request into :class:`FeatureColumns` (raw ids and dense
values, not yet hashed), :func:`concat_columns` merges the columns of several requests, and
:func:`columns_to_tensors` hashes them with the buckets of the model that scores them. The three
decoders apply the same rules with the same messages (naming the instance index and the
feature): every value is checked by :func:`~minutely.data._features.value_problem`, after a
vectorised check of the common, valid case.

Sparse ids are hashed per feature into ``[0, buckets)`` (:func:`~minutely.data.hashing.hash_ids`
with the feature's salt). Dense values go through the fixed transform ``sign(x) * log1p(|x|)``:
it keeps heavy-tailed counts and ages well scaled without batch or running statistics, which
would drift in online training and would have to be shipped to, and kept in step with, every
server.

>>> from minutely.schema import default_schema
>>> schema = default_schema()
>>> inst = {f.name: ([3, 4] if f.kind == "multi_sparse" else 1) for f in schema.features}
>>> tb = instances_to_tensors([inst, inst], schema, buckets=1000)
>>> len(tb), tb.sparse["user_interests"].offsets.tolist(), tuple(tb.dense.shape)
(2, [0, 2, 4], (2, 3))
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import torch

from minutely.data._features import features_problem, value_problem
from minutely.data.arrow import check_record_batch
from minutely.data.hashing import feature_salt, hash_ids
from minutely.errors import CodecError, SchemaError
from minutely.events import F32_OVERFLOW, INT64_MAX
from minutely.schema import FeatureSpec, Schema


@dataclass(frozen=True)
class Jagged:
    """A batch of variable-length id lists for one feature.

    ``values`` holds the ids of all rows back to back (int64); row ``i`` is
    ``values[offsets[i]:offsets[i + 1]]`` (``offsets`` has ``batch_size + 1`` entries, the
    Arrow list layout, and the ``include_last_offset=True`` layout of ``nn.EmbeddingBag``).
    """

    values: torch.Tensor
    offsets: torch.Tensor


@dataclass(frozen=True)
class TensorBatch:
    """A decoded micro-batch: what models and the trainer consume."""

    sparse: dict[str, Jagged]  # in schema order; ids already hashed into [0, buckets)
    dense: torch.Tensor  # float32 [batch, n_dense], schema order
    labels: torch.Tensor  # float32 [batch]
    is_correction: torch.Tensor  # bool [batch]
    sample_ids: torch.Tensor  # int64 [batch]
    event_ts_ms: torch.Tensor  # int64 [batch]
    emit_ts_ms: torch.Tensor  # int64 [batch]
    label_ts_ms: torch.Tensor  # int64 [batch]; time of the positive event, -1 for a negative

    def __len__(self) -> int:
        return int(self.labels.shape[0])


Int64Array = npt.NDArray[np.int64]


def record_batch_to_tensors(rb: pa.RecordBatch, schema: Schema, buckets: int) -> TensorBatch:
    """Decode a sample record batch into tensors, hashing ids into ``[0, buckets)``.

    Id and dense columns are read in place (zero-copy NumPy views of the Arrow buffers); hashing
    and the dense transform then write fresh arrays, which the tensors own. A ``multi_sparse``
    column is read as the ListArray's offsets and values; a sliced batch (offsets not starting at
    0) is normalised so every feature's offsets start at 0. The small per-row columns (ids,
    timestamps, flags) are copied: tensors over the immutable message bytes would be writable
    aliases of memory nobody may write.

    Raises :class:`~minutely.errors.CodecError` naming the column for mismatched columns, nulls,
    a label other than 0/1, or a non-finite dense value.

    >>> from minutely.data.arrow import samples_to_record_batch
    >>> from minutely.data.samples import Sample
    >>> from minutely.schema import default_schema
    >>> schema = default_schema()
    >>> feats = {f.name: ([3, 4] if f.kind == "multi_sparse" else 1) for f in schema.features}
    >>> rb = samples_to_record_batch([Sample(9, 0, 0, 1, False, 5, feats)], schema)
    >>> tb = record_batch_to_tensors(rb, schema, buckets=1000)
    >>> tb.labels.tolist(), tb.label_ts_ms.tolist(), tb.sparse["user_interests"].offsets.tolist()
    ([1.0], [5], [0, 2])
    """
    check_record_batch(rb, schema)
    n = rb.num_rows
    sparse: list[tuple[str, Int64Array, Int64Array | None]] = []
    for spec in schema.sparse:
        col = rb.column(spec.name)
        if spec.kind == "sparse":
            sparse.append((spec.name, col.to_numpy(zero_copy_only=True), None))
        else:
            sparse.append((spec.name, *_list_column(col)))
    dense_cols = []
    for spec in schema.dense:
        values = rb.column(spec.name).to_numpy(zero_copy_only=True)
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            raise CodecError(
                f"sample batch: column {spec.name!r} expected finite values, "
                f"got {values[bad[0]]} at row {bad[0]}"
            )
        dense_cols.append(values)
    dense = np.stack(dense_cols, axis=1) if dense_cols else np.zeros((n, 0), np.float32)
    labels = rb.column("label").to_numpy(zero_copy_only=True)
    bad = np.flatnonzero((labels != 0) & (labels != 1))
    if bad.size:
        raise CodecError(
            f"sample batch: column 'label' expected 0 or 1, got {labels[bad[0]]} at row {bad[0]}"
        )
    return _assemble(
        sparse,
        dense,
        buckets,
        labels=labels.astype(np.float32),
        is_correction=rb.column("is_correction").to_numpy(zero_copy_only=False, writable=True),
        sample_ids=rb.column("sample_id").to_numpy(zero_copy_only=False, writable=True),
        event_ts_ms=rb.column("event_ts_ms").to_numpy(zero_copy_only=False, writable=True),
        emit_ts_ms=rb.column("emit_ts_ms").to_numpy(zero_copy_only=False, writable=True),
        label_ts_ms=rb.column("label_ts_ms").to_numpy(zero_copy_only=False, writable=True),
    )


def _list_column(col: pa.ListArray) -> tuple[Int64Array, Int64Array]:
    """Values and 0-based int64 offsets of a (possibly sliced) list<int64> column."""
    offsets = col.offsets.to_numpy(zero_copy_only=True)
    if len(offsets) == 0:  # a zero-length array may come without an offsets buffer
        return np.zeros(0, np.int64), np.zeros(1, np.int64)
    start, end = int(offsets[0]), int(offsets[-1])
    values = col.values.slice(start, end - start).to_numpy(zero_copy_only=True)
    return values, offsets.astype(np.int64) - start


def instances_to_tensors(
    instances: Sequence[Mapping[str, object]], schema: Schema, buckets: int
) -> TensorBatch:
    """Turn serving request instances (feature dicts) into tensors, exactly as training does.

    Each instance maps every feature of ``schema`` to an int id (``sparse``), a list of int ids
    (``multi_sparse``) or a finite number (``dense``). Labels are 0, sample ids -1, event and emit
    times 0, label times -1 (the value of a negative).
    Raises :class:`~minutely.errors.SchemaError` naming the instance index and the feature for a
    missing, unknown or mistyped feature.

    >>> from minutely.schema import default_schema
    >>> schema = default_schema()
    >>> inst = {f.name: ([] if f.kind == "multi_sparse" else 2) for f in schema.features}
    >>> tb = instances_to_tensors([inst], schema, buckets=100)
    >>> tb.sparse["user_interests"].offsets.tolist(), tb.sample_ids.tolist()
    ([0, 0], [-1])
    """
    return columns_to_tensors(columns_from_instances(instances, schema), buckets)


@dataclass(frozen=True)
class FeatureColumns:
    """The validated features of ``n`` request rows, column by column, before hashing.

    ``sparse`` holds, in schema order, ``(feature, ids, offsets)``: a ``sparse`` feature's raw
    int64 ids, one per row, with ``None`` offsets; a ``multi_sparse`` feature's ids of all rows
    back to back with int64 offsets (``n + 1`` entries, from 0). ``dense`` is float32
    ``[n, n_dense]`` in schema order, not yet transformed. :func:`columns_to_tensors` hashes the
    ids into the buckets of the model that scores them.
    """

    n: int
    sparse: tuple[tuple[str, Int64Array, Int64Array | None], ...]
    dense: npt.NDArray[np.float32]

    def __len__(self) -> int:
        return self.n


def columns_from_instances(
    instances: Sequence[Mapping[str, object]], schema: Schema
) -> FeatureColumns:
    """Validate request instances (feature dicts) and gather them column by column.

    The rules and messages are :func:`instances_to_tensors`'.
    """
    for i, inst in enumerate(instances):
        if not isinstance(inst, Mapping):
            raise SchemaError(
                f"instance {i}: expected a mapping of feature name to value, "
                f"got {type(inst).__name__}"
            )
        problem = features_problem(inst, schema)
        if problem is not None:
            raise SchemaError(f"instance {i}: {problem}")
    n = len(instances)
    sparse: list[tuple[str, Int64Array, Int64Array | None]] = []
    for spec in schema.sparse:
        name = spec.name
        if spec.kind == "sparse":
            ids = np.fromiter((inst[name] for inst in instances), np.int64, count=n)
            sparse.append((name, ids, None))
        else:
            lists = [inst[name] for inst in instances]
            offsets = np.zeros(n + 1, np.int64)
            np.cumsum([len(v) for v in lists], out=offsets[1:])  # type: ignore[arg-type]
            ids = np.fromiter(
                itertools.chain.from_iterable(lists),  # type: ignore[arg-type]
                np.int64,
                count=int(offsets[-1]),
            )
            sparse.append((name, ids, offsets))
    names = [f.name for f in schema.dense]
    # float64 first, then float32: the rounding the Arrow encoder applies to training samples.
    dense = (
        np.array([[inst[f] for f in names] for inst in instances], dtype=np.float64)
        .reshape(n, len(names))
        .astype(np.float32)
    )
    return FeatureColumns(n, tuple(sparse), dense)


def columns_from_lists(columns: Mapping[str, object], schema: Schema) -> FeatureColumns:
    """Validate request features given as one list per feature (row ``i`` at index ``i``).

    Every feature of ``schema`` needs a list, all of the same length; the values follow the
    rules of :func:`instances_to_tensors`, and a bad one is named by its instance (row) index
    and feature, in the same words. Raises :class:`~minutely.errors.SchemaError`.

    >>> from minutely.schema import default_schema
    >>> schema = default_schema()
    >>> cols = {f.name: ([[1, 2], []] if f.kind == "multi_sparse" else [3, 4])
    ...         for f in schema.features}
    >>> fc = columns_from_lists(cols, schema)
    >>> len(fc), fc.sparse[-1][2].tolist(), fc.dense.shape
    (2, [0, 2, 2], (2, 3))
    """
    _check_names(columns.keys(), schema, "columns")
    first = schema.features[0].name
    n = -1
    for spec in schema.features:
        values = columns[spec.name]
        if type(values) is not list:
            raise SchemaError(
                f"columns: feature {spec.name!r}: expected a list of values, one per instance, "
                f"got {type(values).__name__}"
            )
        if n < 0:
            n = len(values)
        elif len(values) != n:
            raise SchemaError(
                f"columns: feature {spec.name!r}: expected {n} values (as many as "
                f"{first!r}), got {len(values)}"
            )
    sparse: list[tuple[str, Int64Array, Int64Array | None]] = []
    for spec in schema.sparse:
        values = cast(list[object], columns[spec.name])
        if spec.kind == "sparse":
            sparse.append((spec.name, _id_list(spec, values), None))
        else:
            sparse.append((spec.name, *_id_lists(spec, values)))
    dense = np.empty((n, len(schema.dense)), np.float32)
    for j, spec in enumerate(schema.dense):
        dense[:, j] = _number_list(spec, cast(list[object], columns[spec.name]))
    return FeatureColumns(n, tuple(sparse), dense)


def columns_from_arrow(rb: pa.RecordBatch, schema: Schema) -> FeatureColumns:
    """Validate request features given as an Arrow record batch, one column per feature.

    A ``sparse`` feature is an ``int64`` column, a ``multi_sparse`` one ``list<int64>``, a
    ``dense`` one any integer or floating-point column. A null or a value outside the rules of
    :func:`instances_to_tensors` is named by its instance (row) index and feature, in the same
    words; a column of another type is named with the type expected and got. Raises
    :class:`~minutely.errors.SchemaError`.
    """
    names = rb.schema.names
    dup = sorted({name for name in names if names.count(name) > 1})
    if dup:
        raise SchemaError(f"arrow batch: expected one column per feature, got {dup} repeated")
    _check_names(names, schema, "arrow batch")
    n = rb.num_rows
    sparse: list[tuple[str, Int64Array, Int64Array | None]] = []
    for spec in schema.sparse:
        col = rb.column(spec.name)
        if spec.kind == "sparse":
            _expect_type(spec, col, pa.types.is_int64(col.type), "int64")
            _refuse_nulls(spec, col)
            sparse.append((spec.name, col.to_numpy(zero_copy_only=False).astype(np.int64), None))
            continue
        ok = pa.types.is_list(col.type) and pa.types.is_int64(col.type.value_type)
        _expect_type(spec, col, ok, "list<int64>")
        _refuse_nulls(spec, col)
        offsets = col.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
        offsets = offsets - offsets[0] if offsets.size else np.zeros(1, np.int64)
        flat = col.flatten()  # the ids of the rows of this (possibly sliced) column
        if flat.null_count:  # a null id inside a list: name the row that holds it
            first = np.flatnonzero(flat.is_null().to_numpy(zero_copy_only=False))[0]
            row = int(np.searchsorted(offsets, first, side="right")) - 1
            raise _value_error(row, spec, col[row].as_py())
        ids = flat.to_numpy(zero_copy_only=False).astype(np.int64)
        sparse.append((spec.name, ids, offsets))
    dense = np.empty((n, len(schema.dense)), np.float32)
    for j, spec in enumerate(schema.dense):
        col = rb.column(spec.name)
        numeric = pa.types.is_integer(col.type) or pa.types.is_floating(col.type)
        _expect_type(spec, col, numeric, "an integer or floating-point type")
        _refuse_nulls(spec, col)
        raw = col.to_numpy(zero_copy_only=False)
        wide = raw.astype(np.float64)
        bad = ~(np.abs(wide) < F32_OVERFLOW)
        if raw.dtype == np.uint64:
            bad |= raw > INT64_MAX
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise _value_error(row, spec, raw[row].item())
        dense[:, j] = wide
    return FeatureColumns(n, tuple(sparse), dense)


def concat_columns(parts: Sequence[FeatureColumns]) -> FeatureColumns:
    """The rows of ``parts`` (all decoded with one schema) as one :class:`FeatureColumns`."""
    if len(parts) == 1:
        return parts[0]
    if not parts:
        raise SchemaError("concat_columns: expected at least one part, got none")
    sparse: list[tuple[str, Int64Array, Int64Array | None]] = []
    for k, (name, _, offsets) in enumerate(parts[0].sparse):
        ids = np.concatenate([p.sparse[k][1] for p in parts])
        if offsets is None:
            sparse.append((name, ids, None))
            continue
        lengths = np.concatenate([np.diff(cast(Int64Array, p.sparse[k][2])) for p in parts])
        merged = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=merged[1:])
        sparse.append((name, ids, merged))
    dense = np.concatenate([p.dense for p in parts])
    return FeatureColumns(sum(p.n for p in parts), tuple(sparse), dense)


def columns_to_tensors(columns: FeatureColumns, buckets: int) -> TensorBatch:
    """Hash ``columns``' ids into ``[0, buckets)`` and transform the dense values: a
    :class:`TensorBatch` as training builds it (labels 0, sample ids -1, event and emit times 0,
    label times -1)."""
    n = columns.n
    return _assemble(
        columns.sparse,
        columns.dense,
        buckets,
        labels=np.zeros(n, np.float32),
        is_correction=np.zeros(n, np.bool_),
        sample_ids=np.full(n, -1, np.int64),
        event_ts_ms=np.zeros(n, np.int64),
        emit_ts_ms=np.zeros(n, np.int64),
        label_ts_ms=np.full(n, -1, np.int64),
    )


def _check_names(names: Iterable[str], schema: Schema, where: str) -> None:
    """SchemaError naming missing and unknown features (the instance check's words)."""
    present = dict.fromkeys(names)
    if present.keys() != {f.name for f in schema.features}:
        # With the names wrong, the instance check reports them (and only them).
        raise SchemaError(f"{where}: {features_problem(present, schema)}")


def _value_error(row: int, spec: FeatureSpec, value: object) -> SchemaError:
    problem = value_problem(spec, value)
    return SchemaError(f"instance {row}: feature {spec.name!r}: {problem}")


# Each column is first checked for the common, valid case at C speed (exact types, then NumPy's
# own range checks); when that fails, value_problem, the one set of rules, looks at every value
# and names the first bad one. Values the quick check doubts but the rules accept (subclasses of
# int, float or list) are converted one by one.


def _first_bad(spec: FeatureSpec, values: Sequence[object]) -> None:
    """Raise for the first value the rules refuse (nothing when they accept every one)."""
    for i, value in enumerate(values):
        if value_problem(spec, value) is not None:
            raise _value_error(i, spec, value)


def _id_list(spec: FeatureSpec, values: list[object]) -> Int64Array:
    if set(map(type, values)) <= {int}:
        try:
            return np.array(values, dtype=np.int64)
        except OverflowError:  # an int outside int64
            pass
    _first_bad(spec, values)
    return np.fromiter(map(int, cast(list[int], values)), np.int64, count=len(values))


def _id_lists(spec: FeatureSpec, values: list[object]) -> tuple[Int64Array, Int64Array]:
    quick = set(map(type, values)) <= {list}
    if not quick:
        _first_bad(spec, values)
    lists = cast(list[list[int]], values)
    offsets = np.zeros(len(lists) + 1, np.int64)
    np.cumsum(list(map(len, lists)), out=offsets[1:])
    flat = list(itertools.chain.from_iterable(lists))
    if quick and set(map(type, flat)) <= {int}:
        try:
            return np.array(flat, dtype=np.int64), offsets
        except OverflowError:
            pass
    _first_bad(spec, values)
    return np.fromiter(map(int, flat), np.int64, count=len(flat)), offsets


def _number_list(spec: FeatureSpec, values: list[object]) -> npt.NDArray[np.float64]:
    types = set(map(type, values))
    if types <= {int, float}:
        try:
            if int in types:  # an int must fit int64 (what a JSON decoder may give)
                np.array([v for v in values if type(v) is int], dtype=np.int64)
            wide = np.array(values, dtype=np.float64)
        except OverflowError:
            pass
        else:
            if (np.abs(wide) < F32_OVERFLOW).all():  # false for nan too
                return wide
    _first_bad(spec, values)
    return np.fromiter(map(float, cast(list[float], values)), np.float64, count=len(values))


def _expect_type(spec: FeatureSpec, col: pa.Array, ok: bool, expected: str) -> None:
    if not ok:
        raise SchemaError(
            f"arrow batch: feature {spec.name!r}: expected a column of {expected}, got {col.type}"
        )


def _refuse_nulls(spec: FeatureSpec, col: pa.Array) -> None:
    if col.null_count:
        row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise _value_error(row, spec, None)


def _assemble(
    sparse: Sequence[tuple[str, Int64Array, Int64Array | None]],
    dense: npt.NDArray[np.float32],
    buckets: int,
    *,
    labels: npt.NDArray[np.float32],
    is_correction: npt.NDArray[np.bool_],
    sample_ids: Int64Array,
    event_ts_ms: Int64Array,
    emit_ts_ms: Int64Array,
    label_ts_ms: Int64Array,
) -> TensorBatch:
    """The one place ids are hashed and dense values transformed, for training and serving."""
    n = len(labels)
    jagged = {}
    for name, ids, offsets in sparse:
        if offsets is None:  # one id per row
            offsets = np.arange(n + 1, dtype=np.int64)
        jagged[name] = Jagged(
            values=torch.from_numpy(hash_ids(ids, feature_salt(name), buckets)),
            offsets=torch.from_numpy(offsets),
        )
    transformed = np.sign(dense) * np.log1p(np.abs(dense))
    return TensorBatch(
        sparse=jagged,
        dense=torch.from_numpy(transformed),
        labels=torch.from_numpy(labels),
        is_correction=torch.from_numpy(is_correction),
        sample_ids=torch.from_numpy(sample_ids),
        event_ts_ms=torch.from_numpy(event_ts_ms),
        emit_ts_ms=torch.from_numpy(emit_ts_ms),
        label_ts_ms=torch.from_numpy(label_ts_ms),
    )


def concat_tensor_batches(batches: Sequence[TensorBatch]) -> TensorBatch:
    """Concatenate batches row-wise (e.g. the micro-batches of a day, for the day mode).

    Offsets are rebased so the result is one valid jagged batch. Raises
    :class:`~minutely.errors.SchemaError` when there is no batch or the batches' sparse features
    or dense widths differ.

    >>> from minutely.schema import default_schema
    >>> schema = default_schema()
    >>> inst = {f.name: ([3, 4] if f.kind == "multi_sparse" else 1) for f in schema.features}
    >>> one = instances_to_tensors([inst], schema, buckets=100)
    >>> both = concat_tensor_batches([one, one])
    >>> len(both), both.sparse["user_interests"].offsets.tolist()
    (2, [0, 2, 4])
    """
    if not batches:
        raise SchemaError("concat_tensor_batches: expected at least one batch, got none")
    first = batches[0]
    names = list(first.sparse)
    width = first.dense.shape[1]
    for i, b in enumerate(batches):
        if list(b.sparse) != names:
            raise SchemaError(
                f"concat_tensor_batches: batch {i} has sparse features {list(b.sparse)}, "
                f"expected {names}"
            )
        if b.dense.shape[1] != width:
            raise SchemaError(
                f"concat_tensor_batches: batch {i} has {b.dense.shape[1]} dense features, "
                f"expected {width}"
            )
    sparse = {}
    for name in names:
        values, offsets = [], [torch.zeros(1, dtype=torch.int64)]
        base = 0
        for b in batches:
            jag = b.sparse[name]
            start, end = int(jag.offsets[0]), int(jag.offsets[-1])
            values.append(jag.values[start:end])
            offsets.append(jag.offsets[1:] - start + base)
            base += end - start
        sparse[name] = Jagged(values=torch.cat(values), offsets=torch.cat(offsets))
    return TensorBatch(
        sparse=sparse,
        dense=torch.cat([b.dense for b in batches]),
        labels=torch.cat([b.labels for b in batches]),
        is_correction=torch.cat([b.is_correction for b in batches]),
        sample_ids=torch.cat([b.sample_ids for b in batches]),
        event_ts_ms=torch.cat([b.event_ts_ms for b in batches]),
        emit_ts_ms=torch.cat([b.emit_ts_ms for b in batches]),
        label_ts_ms=torch.cat([b.label_ts_ms for b in batches]),
    )
