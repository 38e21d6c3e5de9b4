"""A simulated day of traffic as columns, and the feature columns shared with event batches."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from minutely.errors import SchemaError
from minutely.schema import Schema

# Dense features are rounded to these decimals at the source, so the float32 column and the
# shortest JSON float of the logged event denote the same number.
DENSE_DECIMALS: dict[str, int] = {"ad_age_hours": 2, "user_activity": 4, "ad_ctr_1h": 5}

Features = dict[str, Any]
"""Feature columns by name, in schema order: ``sparse`` an int64 array, ``dense`` a float32
array, ``multi_sparse`` a ``(values int64, offsets int64)`` pair with ``len(offsets) == n + 1``."""


def freeze(a: NDArray[Any]) -> NDArray[Any]:
    a.setflags(write=False)
    return a


def slice_features(features: Features, schema: Schema, lo: int, hi: int) -> Features:
    """Rows ``[lo, hi)`` of ``features`` (views; jagged offsets rebased to 0)."""
    out: Features = {}
    for spec in schema.features:
        col = features[spec.name]
        if spec.kind == "multi_sparse":
            values, offsets = col
            out[spec.name] = (values[offsets[lo] : offsets[hi]], offsets[lo : hi + 1] - offsets[lo])
        else:
            out[spec.name] = col[lo:hi]
    return out


def concat_features(parts: list[Features], schema: Schema) -> Features:
    """Rows of ``parts`` one after the other."""
    if len(parts) == 1:
        return parts[0]
    out: Features = {}
    for spec in schema.features:
        if spec.kind == "multi_sparse":
            vals = [p[spec.name][0] for p in parts]
            offs = [p[spec.name][1] for p in parts]
            starts = np.cumsum([0] + [len(v) for v in vals[:-1]])
            offsets = np.concatenate(
                [offs[0][:1], *(o[1:] + s for o, s in zip(offs, starts, strict=True))]
            )
            out[spec.name] = (np.concatenate(vals), offsets)
        else:
            out[spec.name] = np.concatenate([p[spec.name] for p in parts])
    return out


def empty_features(schema: Schema) -> Features:
    out: Features = {}
    for spec in schema.features:
        if spec.kind == "multi_sparse":
            out[spec.name] = (np.zeros(0, np.int64), np.zeros(1, np.int64))
        elif spec.kind == "sparse":
            out[spec.name] = np.zeros(0, np.int64)
        else:
            out[spec.name] = np.zeros(0, np.float32)
    return out


@dataclass(frozen=True, eq=False)
class DayTraffic:
    """Every impression of one simulated day, its true odds and its eventual outcomes.

    Impression columns are in time order (``imp_id`` ascending). ``clicked`` and ``converted``
    are the eventual outcomes; the click and conversion events are in ``click_*`` and ``conv_*``,
    sorted by ``(ts_ms, imp_id)``; a conversion may land days after the day ends. All arrays are
    read-only (they are shared with the market's cache).
    """

    day: int
    schema: Schema
    imp_id: NDArray[np.int64]
    imp_ts_ms: NDArray[np.int64]
    features: Features
    p_click: NDArray[np.float32]
    p_conv: NDArray[np.float32]
    clicked: NDArray[np.bool_]
    converted: NDArray[np.bool_]
    click_imp_id: NDArray[np.int64]
    click_ts_ms: NDArray[np.int64]
    conv_imp_id: NDArray[np.int64]
    conv_ts_ms: NDArray[np.int64]
    _n: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_n", len(self.imp_id))

    def __len__(self) -> int:
        return self._n

    def column(self, name: str) -> NDArray[Any]:
        """A ``sparse`` (int64) or ``dense`` (float32) feature column."""
        if self.schema.get(name).kind == "multi_sparse":
            raise SchemaError(
                f"DayTraffic.column: expected a sparse or dense feature, got {name!r}"
                " (multi_sparse; use jagged())"
            )
        return np.asarray(self.features[name])

    def jagged(self, name: str) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """A ``multi_sparse`` feature as ``(values, offsets)``."""
        kind = self.schema.get(name).kind
        if kind != "multi_sparse":
            raise SchemaError(
                f"DayTraffic.jagged: expected a multi_sparse feature, got {name!r} ({kind})"
            )
        values, offsets = self.features[name]
        return values, offsets
