"""The layout of a feature snapshot table, the checks of a batch, and the column conversions.

A snapshot table is a Delta Lake table with one row per ad request: ``request_id`` (int64),
``ts_ms`` (the request time, int64), ``bucket`` (``ts_ms // BUCKET_MS``, the hour since the
epoch; the table is partitioned by it) and one column per feature in schema order, typed as in
the sample log: ``sparse`` int64, ``multi_sparse`` list<int64>, ``dense`` float32. Every column
is declared not null, so delta-rs refuses a null at write time.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from numpy.typing import NDArray

from minutely.clock import MS_PER_HOUR
from minutely.config import FeaturesConfig, FrozenMap
from minutely.errors import SchemaError, StorageError
from minutely.events import F32_OVERFLOW
from minutely.schema import Schema

BUCKET_MS = MS_PER_HOUR
"""The width of a partition of the table: one hour of request time."""

REQUEST_ID, TS_MS, BUCKET = "request_id", "ts_ms", "bucket"
FIXED_COLUMNS = (REQUEST_ID, TS_MS, BUCKET)

Features = dict[str, Any]
"""Feature columns by name, in schema order (the simulator's layout): ``sparse`` an int64
array, ``dense`` a float32 array, ``multi_sparse`` a ``(values int64, offsets int64)`` pair with
``len(offsets) == n + 1``."""

_LIST_INT64 = pa.list_(pa.field("element", pa.int64(), nullable=False))
_KIND_TYPES: dict[str, pa.DataType] = {
    "sparse": pa.int64(),
    "multi_sparse": _LIST_INT64,
    "dense": pa.float32(),
}
_KIND_NAMES = {"sparse": "int64", "multi_sparse": "list<int64>", "dense": "float32"}


@dataclass(frozen=True)
class Replica:
    """One copy of the snapshot table: a URL or local path and its delta-rs storage options."""

    url: str
    storage_options: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or not self.url.strip():
            raise StorageError(f"feature replica: expected a table URL or path, got {self.url!r}")
        if not isinstance(self.storage_options, FrozenMap):  # frozen and hashable
            object.__setattr__(self, "storage_options", FrozenMap(self.storage_options))

    @property
    def options(self) -> dict[str, str] | None:
        return dict(self.storage_options) or None


def resolve_replicas(cfg: FeaturesConfig, run_dir: Path) -> tuple[Replica, Replica]:
    """The two replicas of ``cfg``: URLs as they are, relative paths inside ``run_dir``.

    Two entries that name the same folder once resolved are refused with a
    :class:`~minutely.errors.StorageError`.
    """
    out = tuple(
        Replica(resolve_url(url, run_dir), cfg.options_for(i)) for i, url in enumerate(cfg.replicas)
    )
    if out[0].url == out[1].url:
        raise StorageError(
            f"feature replicas {cfg.replicas[0]!r} and {cfg.replicas[1]!r}: expected 2 different "
            f"tables, got the same one ({out[0].url})"
        )
    return out[0], out[1]


def resolve_url(url: str, run_dir: Path) -> str:
    """``url`` unchanged when it has a scheme (``s3://...``), else an absolute local path, taken
    relative to ``run_dir`` when it is relative."""
    if "://" in url:
        return url
    path = Path(url).expanduser()
    if not path.is_absolute():
        path = Path(run_dir) / path
    return str(path.absolute())


def arrow_schema(schema: Schema) -> pa.Schema:
    """The Arrow schema of a snapshot table for ``schema`` (all columns not null).

    >>> from minutely.schema import default_schema
    >>> arrow_schema(default_schema()).names[:4]
    ['request_id', 'ts_ms', 'bucket', 'user_id']
    """
    clashes = [f.name for f in schema.features if f.name in FIXED_COLUMNS]
    if clashes:
        raise SchemaError(
            f"feature snapshots: feature names must differ from {list(FIXED_COLUMNS)}, "
            f"got {clashes}"
        )
    fields = [pa.field(name, pa.int64(), nullable=False) for name in FIXED_COLUMNS]
    fields += [pa.field(f.name, _KIND_TYPES[f.kind], nullable=False) for f in schema.features]
    return pa.schema(fields)


def schema_problem(expected: pa.Schema, got: pa.Schema) -> str | None:
    """How the schema ``got`` of a table fails to hold the columns of ``expected``, or ``None``.

    Nullability is not compared (a table created by another producer may allow nulls; null
    values are caught row by row when they are read); a list's element name is not either.
    """
    problems = []
    for want in expected:
        idx = got.get_field_index(want.name)
        if idx < 0:
            problems.append(f"no column {want.name!r}")
            continue
        have = got.field(idx).type
        if not _same_type(want.type, have):
            problems.append(f"column {want.name!r} is {have}, expected {want.type}")
    return "; ".join(problems) or None


def _same_type(want: pa.DataType, have: pa.DataType) -> bool:
    if pa.types.is_list(want):
        return bool(pa.types.is_list(have) or pa.types.is_large_list(have)) and bool(
            have.value_type == want.value_type
        )
    return bool(have == want)


# -- a batch of snapshots as an Arrow table ------------------------------------------------------


def snapshot_table(
    schema: Schema,
    request_ids: NDArray[np.integer[Any]] | Sequence[int] | pa.Array,
    ts_ms: NDArray[np.integer[Any]] | Sequence[int] | pa.Array | int,
    features: Mapping[str, Any],
) -> pa.Table:
    """The rows to append for one batch of requests, checked column by column.

    ``features`` holds a column per feature of ``schema``: numpy or Arrow arrays, a
    ``multi_sparse`` one as ``(values, offsets)`` or an Arrow list array; ``ts_ms`` is one time
    per request or one for all. Raises :class:`~minutely.errors.SchemaError` naming the column,
    what was expected and what was got (a missing or unknown feature, a wrong length or type, a
    non-finite dense value, duplicate request ids).
    """
    target = arrow_schema(schema)
    ids = _int64_column("request_id", request_ids, None)
    n = len(ids)
    if np.unique(ids).size != n:
        values, counts = np.unique(ids, return_counts=True)
        raise SchemaError(
            f"snapshot batch: expected distinct request ids, got {int(values[counts > 1][0])} "
            f"{int(counts.max())} times"
        )
    if isinstance(ts_ms, (int, np.integer)) and not isinstance(ts_ms, bool):
        ts = np.full(n, int(ts_ms), dtype=np.int64)
    else:
        ts = _int64_column("ts_ms", ts_ms, n)
    names = [f.name for f in schema.features]
    missing = [name for name in names if name not in features]
    unknown = sorted(str(k) for k in features if k not in set(names))
    if missing or unknown:
        got = [f"missing {missing}"] if missing else []
        got += [f"unknown {unknown}"] if unknown else []
        raise SchemaError(f"snapshot batch: expected the features {names}, got {'; '.join(got)}")
    arrays: list[pa.Array] = [pa.array(ids), pa.array(ts), pa.array(ts // BUCKET_MS)]
    for spec in schema.features:
        col = features[spec.name]
        where = f"feature {spec.name!r}"
        if spec.kind == "sparse":
            arrays.append(pa.array(_int64_column(where, col, n)))
        elif spec.kind == "dense":
            arrays.append(pa.array(_dense_column(where, col, n)))
        else:
            arrays.append(_list_column(where, col, n))
    return pa.Table.from_arrays(arrays, schema=target)


def _numpy(where: str, col: object) -> NDArray[Any]:
    if isinstance(col, (pa.Array, pa.ChunkedArray)):
        if col.null_count:
            raise SchemaError(f"snapshot batch: {where}: expected no nulls, got {col.null_count}")
        return np.asarray(col.to_numpy(zero_copy_only=False))
    arr = np.asarray(col)
    if arr.ndim != 1:
        raise SchemaError(f"snapshot batch: {where}: expected a 1-d column, got shape {arr.shape}")
    return arr


def _int64_column(where: str, col: object, n: int | None) -> NDArray[np.int64]:
    arr = _numpy(where, col)
    if n is not None and len(arr) != n:
        raise SchemaError(f"snapshot batch: {where}: expected {n} values, got {len(arr)}")
    if arr.dtype.kind == "u" and len(arr) and int(arr.max()) > np.iinfo(np.int64).max:
        raise SchemaError(
            f"snapshot batch: {where}: expected int64 ids, got {int(arr.max())} (beyond int64)"
        )
    if arr.dtype.kind not in "iu" and not (len(arr) == 0 and arr.dtype.kind == "f"):
        raise SchemaError(f"snapshot batch: {where}: expected integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _dense_column(where: str, col: object, n: int) -> NDArray[np.float32]:
    arr = _numpy(where, col)
    if len(arr) != n:
        raise SchemaError(f"snapshot batch: {where}: expected {n} values, got {len(arr)}")
    if arr.dtype.kind not in "fiu":
        raise SchemaError(f"snapshot batch: {where}: expected numbers, got dtype {arr.dtype}")
    wide = arr.astype(np.float64)
    bad = ~(np.abs(wide) < F32_OVERFLOW)  # nan and inf fail the test too
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise SchemaError(
            f"snapshot batch: {where}: expected finite numbers within float32 range, got "
            f"{arr[i]!r} at row {i}"
        )
    return wide.astype(np.float32)


def _list_column(where: str, col: object, n: int) -> pa.Array:
    if isinstance(col, (pa.ListArray, pa.LargeListArray)):
        if col.null_count:
            raise SchemaError(f"snapshot batch: {where}: expected no nulls, got {col.null_count}")
        offsets = np.asarray(col.offsets.to_numpy(), dtype=np.int64)
        values = _int64_column(where + " values", col.values, None)
        values = values[offsets[0] : offsets[-1]]
        offsets = offsets - offsets[0]
    elif isinstance(col, tuple) and len(col) == 2:
        values = _int64_column(where + " values", col[0], None)
        offsets = _int64_column(where + " offsets", col[1], None)
    else:
        raise SchemaError(
            f"snapshot batch: {where}: expected (values, offsets) or an Arrow list array, got "
            f"{type(col).__name__}"
        )
    if len(offsets) != n + 1:
        raise SchemaError(f"snapshot batch: {where}: expected {n + 1} offsets, got {len(offsets)}")
    if offsets[0] != 0 or offsets[-1] != len(values):
        raise SchemaError(
            f"snapshot batch: {where}: expected offsets from 0 to {len(values)} (the number of "
            f"values), got {offsets[0]}..{offsets[-1]}"
        )
    drops = np.flatnonzero(np.diff(offsets) < 0)
    if len(drops):
        raise SchemaError(
            f"snapshot batch: {where}: expected non-decreasing offsets, got "
            f"{offsets[drops[0]]} then {offsets[drops[0] + 1]} at row {drops[0]}"
        )
    if len(values) > np.iinfo(np.int32).max:
        raise SchemaError(f"snapshot batch: {where}: expected < 2**31 ids, got {len(values)}")
    return pa.ListArray.from_arrays(
        pa.array(offsets.astype(np.int32)), pa.array(values), type=_LIST_INT64
    )


def table_to_features(table: pa.Table, schema: Schema) -> Features:
    """The feature columns of ``table`` in the simulator's layout (numpy arrays)."""
    out: Features = {}
    for spec in schema.features:
        col = table.column(spec.name)
        arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        if spec.kind == "multi_sparse":
            offsets = np.asarray(arr.offsets.to_numpy(), dtype=np.int64)
            values = np.asarray(arr.values.to_numpy(zero_copy_only=False), dtype=np.int64)
            out[spec.name] = (values[offsets[0] : offsets[-1]].copy(), offsets - offsets[0])
        elif spec.kind == "sparse":
            out[spec.name] = np.asarray(arr.to_numpy(zero_copy_only=False), dtype=np.int64)
        else:
            out[spec.name] = np.asarray(arr.to_numpy(zero_copy_only=False), dtype=np.float32)
    return out


# -- messages ---------------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def describe(exc: BaseException) -> str:
    """An exception as one short line: its type and its message, without colour codes."""
    text = " ".join(_ANSI.sub("", str(exc)).replace("↳", " ").split())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
