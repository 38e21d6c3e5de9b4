"""Labeled samples as Arrow record batches: the wire format of the sample log.

One log message holds one micro-batch: a single record batch in the Arrow IPC stream format. The
columns are the sample's fixed fields followed by one column per feature in schema order
(``sparse`` -> int64, ``multi_sparse`` -> list<int64>, ``dense`` -> float32), and the Arrow schema
metadata carries the feature schema's fingerprint, so a reader refuses batches written for another
schema. Columns decode straight into tensors (see :mod:`minutely.data.tensors`) without building
Python objects.

Dense values are stored as float32, so a sample read back carries the nearest float32 of each
dense value (as a Python float).

>>> from minutely.schema import default_schema
>>> schema = default_schema()
>>> feats = {f.name: ([1, 2] if f.kind == "multi_sparse" else 1) for f in schema.features}
>>> s = Sample(7, 1_000, 61_000, 1, False, 5_000, feats)
>>> data = encode_batch(samples_to_record_batch([s], schema))
>>> record_batch_to_samples(decode_batch(data, schema), schema) == [s]
True
"""

from __future__ import annotations

import functools
import itertools
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from minutely.data._features import features_problem, is_int64
from minutely.data.samples import Sample
from minutely.errors import CodecError, SchemaError
from minutely.events import F32_OVERFLOW, INT64_MAX, INT64_MIN, FeatureValue
from minutely.schema import Schema

FINGERPRINT_KEY = b"minutely.schema_fingerprint"

_FIXED_COLUMNS: tuple[tuple[str, pa.DataType], ...] = (
    ("sample_id", pa.int64()),
    ("event_ts_ms", pa.int64()),
    ("emit_ts_ms", pa.int64()),
    ("label", pa.int8()),
    ("is_correction", pa.bool_()),
    ("label_ts_ms", pa.int64()),
)
_KIND_TYPES: dict[str, pa.DataType] = {
    "sparse": pa.int64(),
    "multi_sparse": pa.list_(pa.int64()),
    "dense": pa.float32(),
}


def arrow_schema(schema: Schema) -> pa.Schema:
    """The Arrow schema of a sample batch for ``schema``, with its fingerprint as metadata.

    >>> from minutely.schema import default_schema
    >>> arrow_schema(default_schema()).names[:3]
    ['sample_id', 'event_ts_ms', 'emit_ts_ms']
    """
    return _arrow_schema(schema)


@functools.lru_cache(maxsize=64)
def _arrow_schema(schema: Schema) -> pa.Schema:
    fixed = {name for name, _ in _FIXED_COLUMNS}
    clashes = [f.name for f in schema.features if f.name in fixed]
    if clashes:
        raise SchemaError(
            f"arrow schema: feature names must differ from the sample columns {sorted(fixed)}, "
            f"got {clashes}"
        )
    fields = [pa.field(name, typ, nullable=False) for name, typ in _FIXED_COLUMNS]
    fields += [pa.field(f.name, _KIND_TYPES[f.kind], nullable=False) for f in schema.features]
    return pa.schema(fields, metadata={FINGERPRINT_KEY: schema.fingerprint().encode()})


# -- samples -> record batch ----------------------------------------------------------------


def samples_to_record_batch(samples: Sequence[Sample], schema: Schema) -> pa.RecordBatch:
    """Build one record batch from samples, column by column.

    Raises :class:`~minutely.errors.SchemaError` naming the sample and the field for a sample that
    does not fit ``schema`` (a missing or unknown feature, a wrong type, a null, an out-of-range
    value).
    """
    arrays = _fast_columns(samples, _layout(schema))
    if arrays is not None:
        return pa.RecordBatch.from_arrays(arrays, schema=arrow_schema(schema))
    return _checked_record_batch(samples, schema)


# The fast path takes a batch whose every value has exactly the type its column expects (what
# the ingest check guarantees for joined samples), tested by sets of value types built in C, and
# converts whole groups of columns at once: every int64 column in one numpy array, every dense
# column in another (a few large conversions cost less than one per column, which matters for the
# many small batches). Anything else (a bool or a float among ids, a numpy scalar, an id beyond
# int64, a dense value beyond float32, an empty batch) falls back to the checked path below, which
# says what is wrong or converts what is unusual but valid.
_INT = {int}
_LIST = {list}
_BOOL = {bool}
_NUMBER = {float, int}
_LABELS = {0, 1}
_LIST_INT64 = pa.list_(pa.int64())


@dataclass(frozen=True)
class _Layout:
    """The features by kind: ``get`` maps a feature dict to its values in schema order, and
    ``sparse``, ``multi`` and ``dense`` are the positions of each kind in that order."""

    n_features: int
    get: Callable[[dict[str, FeatureValue]], tuple[object, ...]]
    sparse: tuple[int, ...]
    multi: tuple[int, ...]
    dense: tuple[int, ...]


@functools.lru_cache(maxsize=64)
def _layout(schema: Schema) -> _Layout:
    names = [f.name for f in schema.features]
    get: Callable[[dict[str, FeatureValue]], tuple[object, ...]]
    if len(names) == 1:
        name = names[0]
        get = lambda feats: (feats[name],)  # noqa: E731 (itemgetter of one name: no tuple)
    else:
        get = operator.itemgetter(*names)
    kinds = [f.kind for f in schema.features]
    return _Layout(
        len(names),
        get,
        tuple(i for i, k in enumerate(kinds) if k == "sparse"),
        tuple(i for i, k in enumerate(kinds) if k == "multi_sparse"),
        tuple(i for i, k in enumerate(kinds) if k == "dense"),
    )


def _fast_columns(samples: Sequence[Sample], layout: _Layout) -> list[pa.Array] | None:
    """The batch's columns when every value has exactly its column's type, else ``None``."""
    n = len(samples)
    feats = [s.features for s in samples]
    if not n or set(map(len, feats)) != {layout.n_features}:
        return None
    try:
        # One pass over the dicts (they are cold by now: the impressions came minutes ago), then
        # a transpose in C.
        columns = list(zip(*map(layout.get, feats), strict=True))
    except KeyError:
        return None
    labels = [s.label for s in samples]
    corrections = [s.is_correction for s in samples]
    ints = [
        [s.sample_id for s in samples],
        [s.event_ts_ms for s in samples],
        [s.emit_ts_ms for s in samples],
        [s.label_ts_ms for s in samples],
        *(columns[i] for i in layout.sparse),
    ]
    dense = [columns[i] for i in layout.dense]
    if (
        set(map(type, itertools.chain.from_iterable(ints))) != _INT
        or set(map(type, labels)) != _INT
        or not set(labels) <= _LABELS
        or set(map(type, corrections)) != _BOOL
    ):
        return None
    for i in layout.multi:
        if set(map(type, columns[i])) != _LIST or not _INT.issuperset(
            map(type, itertools.chain.from_iterable(columns[i]))
        ):
            return None
    dense_types = set(map(type, itertools.chain.from_iterable(dense)))
    if not dense_types <= _NUMBER or (
        int in dense_types
        and not all(
            INT64_MIN <= v <= INT64_MAX
            for v in itertools.chain.from_iterable(dense)
            if type(v) is int
        )
    ):
        return None
    by_position: dict[int, pa.Array] = {}
    try:  # OverflowError: an id beyond int64
        int64s = np.fromiter(itertools.chain.from_iterable(ints), np.int64, len(ints) * n)
        int64s = int64s.reshape(len(ints), n)
        for i in layout.multi:
            by_position[i] = pa.array(columns[i], _LIST_INT64)
    except OverflowError:
        return None
    float64s = np.array(dense, dtype=np.float64)
    # Below the float32 limit the cast rounds to a finite float32 (NaN fails the test too).
    if dense and not np.abs(float64s).max() < F32_OVERFLOW:
        return None
    float32s = float64s.astype(np.float32)  # float64 -> float32 as numpy rounds it in serving
    for k, i in enumerate(layout.sparse, start=4):
        by_position[i] = pa.array(int64s[k])
    for k, i in enumerate(layout.dense):
        by_position[i] = pa.array(float32s[k])
    return [
        pa.array(int64s[0]),
        pa.array(int64s[1]),
        pa.array(int64s[2]),
        pa.array(np.array(labels, dtype=np.int8)),
        pa.array(corrections, pa.bool_()),
        pa.array(int64s[3]),
        *(by_position[i] for i in range(layout.n_features)),
    ]


def _checked_record_batch(samples: Sequence[Sample], schema: Schema) -> pa.RecordBatch:
    """The checked path: converts what the fast path refused, or says which sample is wrong."""
    pa_schema = arrow_schema(schema)
    n_features = len(schema.features)
    if any(len(s.features) != n_features for s in samples):
        _raise_feature_problem(samples, schema)  # always raises: some feature is missing or extra
    arrays: list[pa.Array] = [
        _int_column(samples, "sample_id", [s.sample_id for s in samples]),
        _int_column(samples, "event_ts_ms", [s.event_ts_ms for s in samples]),
        _int_column(samples, "emit_ts_ms", [s.emit_ts_ms for s in samples]),
        _label_column(samples, [s.label for s in samples]),
        _bool_column(samples, "is_correction", [s.is_correction for s in samples]),
        _int_column(samples, "label_ts_ms", [s.label_ts_ms for s in samples]),
    ]
    for spec in schema.features:
        name = spec.name
        try:
            values = [s.features[name] for s in samples]
        except KeyError:
            _raise_feature_problem(samples, schema)  # always raises: names the sample
            raise
        if spec.kind == "sparse":
            arr = _try_ints(values)
        elif spec.kind == "multi_sparse":
            arr = _try_int_lists(values)
        else:
            arr = _try_floats(values)
        if arr is None:
            _raise_feature_problem(samples, schema)
            if spec.kind == "dense":
                # Valid values pyarrow will not convert exactly (ints beyond 2**53): via numpy.
                arr = _float32_array(np.array(values, dtype=np.float64))
        if arr is None:
            raise SchemaError(
                f"samples: feature {name!r} fits the schema but could not be encoded as "
                f"{_KIND_TYPES[spec.kind]}"
            )
        arrays.append(arr)
    return pa.RecordBatch.from_arrays(arrays, schema=pa_schema)


def _try_ints(values: Sequence[object]) -> pa.Array | None:
    # Inferring the type (rather than passing int64) makes pyarrow refuse floats, which it would
    # otherwise truncate to ints silently.
    try:
        arr = pa.array(values)
    except (pa.ArrowException, OverflowError):
        return None
    if arr.null_count:
        return None
    if arr.type == pa.int64():
        return arr
    if pa.types.is_null(arr.type):  # no values at all
        return pa.array([], pa.int64())
    return None


def _try_int_lists(values: Sequence[object]) -> pa.Array | None:
    try:
        arr = pa.array(values)
    except (pa.ArrowException, OverflowError):
        return None
    if not pa.types.is_list(arr.type) and not pa.types.is_null(arr.type):
        return None
    if arr.null_count or (pa.types.is_list(arr.type) and arr.values.null_count):
        return None
    if arr.type == pa.list_(pa.int64()):
        return arr
    if pa.types.is_null(arr.type) or pa.types.is_null(arr.type.value_type):  # only empty lists
        return arr.cast(pa.list_(pa.int64()))
    return None


def _try_floats(values: Sequence[object]) -> pa.Array | None:
    # pyarrow would take True as 1.0; a bool is not a dense value here, as in serving.
    if any(type(v) is bool for v in values):
        return None
    try:
        arr = pa.array(values, type=pa.float64())
    except (pa.ArrowException, OverflowError):
        return None
    if arr.null_count:
        return None
    return _float32_array(arr.to_numpy(zero_copy_only=False))


def _float32_array(f64: npt.NDArray[np.float64]) -> pa.Array | None:
    # float64 -> float32 through numpy, the same rounding as the serving path.
    with np.errstate(over="ignore", invalid="ignore"):
        f32 = f64.astype(np.float32)
    if not np.isfinite(f32).all():
        return None
    return pa.array(f32)


def _int_column(samples: Sequence[Sample], name: str, values: list[object]) -> pa.Array:
    arr = _try_ints(values)
    if arr is None:
        _raise_field_problem(samples, name, values, is_int64, "an int64")
    return arr


def _label_column(samples: Sequence[Sample], values: list[object]) -> pa.Array:
    arr = _try_ints(values)
    if arr is not None:
        lo_hi = arr.to_numpy()
        if len(lo_hi) == 0 or (lo_hi.min() >= 0 and lo_hi.max() <= 1):
            return arr.cast(pa.int8())
    _raise_field_problem(samples, "label", values, lambda v: v in (0, 1) and is_int64(v), "0 or 1")


def _bool_column(samples: Sequence[Sample], name: str, values: list[object]) -> pa.Array:
    if all(type(v) is bool for v in values):
        return pa.array(values, pa.bool_())
    _raise_field_problem(samples, name, values, lambda v: type(v) is bool, "a bool")


def _raise_field_problem(
    samples: Sequence[Sample],
    name: str,
    values: list[object],
    ok: Callable[[object], bool],
    expected: str,
) -> NoReturn:
    for i, v in enumerate(values):
        if not ok(v):
            raise SchemaError(
                f"sample {i} (sample_id {samples[i].sample_id!r}): field {name!r} expected "
                f"{expected}, got {v!r} ({type(v).__name__})"
            )
    raise SchemaError(f"samples: field {name!r} fits but could not be encoded as {expected}")


def _raise_feature_problem(samples: Sequence[Sample], schema: Schema) -> None:
    """Raise for the first sample whose features do not fit; return if they all do.

    The slow path: only runs once a column failed, to say which sample and why.
    """
    for i, s in enumerate(samples):
        problem = features_problem(s.features, schema)
        if problem is not None:
            raise SchemaError(f"sample {i} (sample_id {s.sample_id!r}): {problem}")


# -- record batch checks and record batch -> samples --------------------------------------


def check_record_batch(rb: pa.RecordBatch, schema: Schema, *, where: str = "sample batch") -> None:
    """Check a batch's columns (names and types) and that no required value is null.

    Columns are matched by name; raises :class:`~minutely.errors.CodecError` naming every missing,
    extra or mistyped column, or the first column holding nulls.
    """
    check_columns(rb.schema, schema, where=where)
    for name in rb.schema.names:
        col = rb.column(name)
        nulls = col.null_count
        if not nulls and pa.types.is_list(col.type):
            nulls = _list_values(col).null_count
        if nulls:
            raise CodecError(f"{where}: column {name!r} expected no nulls, got {nulls}")


def check_columns(got: pa.Schema, schema: Schema, *, where: str = "sample batch") -> None:
    """Compare column names and types with :func:`arrow_schema`; raise one CodecError for all."""
    expected = arrow_schema(schema)
    want = {f.name: f.type for f in expected}
    have: dict[str, pa.DataType] = {}
    problems = []
    for field in got:
        if field.name in have:
            problems.append(f"duplicate column {field.name!r}")
        have[field.name] = field.type
    for name, typ in want.items():
        if name not in have:
            problems.append(f"missing column {name!r} ({typ})")
        elif have[name] != typ:
            problems.append(f"column {name!r}: expected {typ}, got {have[name]}")
    problems += [f"extra column {n!r} ({t})" for n, t in have.items() if n not in want]
    if problems:
        raise CodecError(
            f"{where}: columns do not match schema {schema.fingerprint()}: " + "; ".join(problems)
        )


def _list_values(col: pa.ListArray) -> pa.Array:
    """The child values a (possibly sliced) list array actually covers."""
    offsets = col.offsets
    if len(col) == 0:
        return col.values.slice(0, 0)
    start = offsets[0].as_py()
    return col.values.slice(start, offsets[len(col)].as_py() - start)


def record_batch_to_samples(rb: pa.RecordBatch, schema: Schema) -> list[Sample]:
    """Rebuild :class:`Sample` objects from a batch (for tools and tests; training reads tensors).

    Raises :class:`~minutely.errors.CodecError` for a batch whose columns do not match ``schema``.
    """
    check_record_batch(rb, schema)
    fixed = [rb.column(name).to_pylist() for name, _ in _FIXED_COLUMNS]
    names = [f.name for f in schema.features]
    feature_rows = zip(*(rb.column(n).to_pylist() for n in names), strict=True)
    return [
        Sample(sid, ev, em, label, corr, lts, dict(zip(names, row, strict=True)))
        for sid, ev, em, label, corr, lts, row in zip(*fixed, feature_rows, strict=True)
    ]


# -- IPC bytes ------------------------------------------------------------------------------


def encode_batch(rb: pa.RecordBatch) -> bytes:
    """Serialise one record batch as an Arrow IPC stream (schema message + one batch)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, rb.schema) as writer:
        writer.write_batch(rb)
    return bytes(sink.getvalue().to_pybytes())


def decode_batch(data: bytes, schema: Schema) -> pa.RecordBatch:
    """Decode one log message into its record batch, checking it against ``schema``.

    The batch references ``data`` without copying. Raises :class:`~minutely.errors.CodecError` for
    bytes that are not an Arrow IPC stream, a stream with no batch or more than one, columns that
    do not match (each missing, extra or mistyped column is named), a fingerprint of another
    schema, nulls, or a batch whose buffers are inconsistent (e.g. offsets out of bounds).
    """
    try:
        reader = pa.ipc.open_stream(pa.py_buffer(data))
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise CodecError(
            f"sample batch: expected an Arrow IPC stream, got {len(data)} bytes that do not "
            f"decode as one ({exc})"
        ) from exc
    check_columns(reader.schema, schema)
    expected_fp = arrow_schema(schema).metadata[FINGERPRINT_KEY]  # cached, unlike fingerprint()
    got_fp = (reader.schema.metadata or {}).get(FINGERPRINT_KEY)
    if got_fp is None:
        raise CodecError(
            f"sample batch: expected schema fingerprint {expected_fp.decode()} in the Arrow "
            "metadata, got none"
        )
    if got_fp != expected_fp:
        raise CodecError(
            f"sample batch: expected schema fingerprint {expected_fp.decode()}, "
            f"got {got_fp.decode(errors='replace')}"
        )
    try:
        batches = list(reader)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise CodecError(f"sample batch: truncated or corrupt Arrow IPC stream ({exc})") from exc
    if len(batches) != 1:
        got = "an empty stream (no batch)" if not batches else f"{len(batches)} batches"
        raise CodecError(f"sample batch: expected exactly one record batch per message, got {got}")
    rb = batches[0]
    try:
        # Full validation: offsets and lengths come from the wire and are used for slicing.
        rb.validate(full=True)
    except (pa.ArrowException, ValueError) as exc:
        raise CodecError(f"sample batch: inconsistent record batch ({exc})") from exc
    check_record_batch(rb, schema)
    return rb
