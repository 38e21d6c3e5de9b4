"""Raw events of a time range, as columns, and their conversion to log messages.

Turning a million impressions into Python objects is the simulator's hot path. Rows are built
as msgspec structs straight from column lists (one C call per row, no per-row dict and no GC
tracking), and impressions are encoded through a struct whose fields are the schema's features,
in schema order: msgspec writes a struct and a dict with the same keys in the same order to the
same JSON, so ``messages()`` equals ``encode_event`` of ``events()`` byte for byte (a test holds
it to that).

With ``by_reference=True`` impressions carry no features but a request id (the impression id:
each simulated impression answers one ad request); their features are the rows of
:meth:`EventBatch.snapshots`, which a producer writes to the feature snapshot tables before it
publishes the messages.
"""

from __future__ import annotations

import gc
import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import msgspec
import numpy as np
from numpy.typing import NDArray

from minutely.events import Click, Conversion, Event, FeatureValue, Impression
from minutely.schema import Schema
from minutely.sim.traffic import DENSE_DECIMALS, Features, empty_features

IMPRESSION, CLICK, CONVERSION = 0, 1, 2

_ENCODER = msgspec.json.Encoder()


@dataclass(frozen=True, eq=False)
class EventBatch:
    """Impressions, clicks and conversions sorted by ``(ts_ms, kind, imp_id)``.

    ``kind`` is 0 (impression), 1 (click) or 2 (conversion). ``features`` holds one row per
    impression of the batch, in the order the impressions appear (see
    :data:`minutely.sim.traffic.Features` for the column layout).
    """

    schema: Schema
    kind: NDArray[np.uint8]
    imp_id: NDArray[np.int64]
    ts_ms: NDArray[np.int64]
    features: Features

    @classmethod
    def empty(cls, schema: Schema) -> EventBatch:
        z = np.zeros(0, np.int64)
        return cls(schema, np.zeros(0, np.uint8), z, z, empty_features(schema))

    def __len__(self) -> int:
        return len(self.kind)

    def count(self, kind: int) -> int:
        """How many events of ``kind`` (0 impression, 1 click, 2 conversion) the batch holds."""
        return int(np.count_nonzero(self.kind == kind))

    def feature_dicts(self) -> list[dict[str, FeatureValue]]:
        """The features of each impression as plain Python values, in impression order."""
        with _gc_paused():
            rows: list[dict[str, FeatureValue]] = msgspec.to_builtins(self._feature_rows())
        return rows

    def snapshots(self) -> tuple[NDArray[np.int64], NDArray[np.int64], Features]:
        """``(request_ids, ts_ms, features)`` of the impressions, in impression order: the rows
        a producer writes as feature snapshots before it publishes by-reference impressions.

        The request id is the impression id. Dense values are the logged ones (rounded as in
        :meth:`messages`, then float32, the type of the snapshot table and of the sample log),
        so a sample joined from a snapshot equals one joined from the inline features.
        """
        imp = self.kind == IMPRESSION
        features: Features = {}
        for spec in self.schema.features:
            col = self.features[spec.name]
            if spec.kind == "dense":
                decimals = DENSE_DECIMALS.get(spec.name, 6)
                col = np.round(col.astype(np.float64), decimals).astype(np.float32)
            features[spec.name] = col
        return self.imp_id[imp], self.ts_ms[imp], features

    def events(self, *, by_reference: bool = False) -> list[Event]:
        """The batch as :mod:`minutely.events` structs, in batch order.

        With ``by_reference``, impressions have empty features and their impression id as
        ``request_id`` (see :meth:`snapshots`).
        """
        with _gc_paused():
            imp, click, conv = self._split()
            if by_reference:
                impressions = [Impression(i, t, {}, i) for i, t in zip(imp[0], imp[1], strict=True)]
            else:
                impressions = list(map(Impression, imp[0], imp[1], self.feature_dicts()))
            clicks = list(map(Click, *click))
            conversions = list(map(Conversion, *conv))
            return self._in_order([*impressions, *clicks, *conversions])

    def messages(self, *, by_reference: bool = False) -> list[tuple[bytes, bytes, int]]:
        """``(key, value, ts_ms)`` per event, ready for ``Log.append``.

        The key is the impression id as 8 big-endian bytes, so every event of an impression
        lands on the same partition; the value is what :func:`minutely.events.encode_event`
        writes for the event of :meth:`events` (with the same ``by_reference``).
        """
        with _gc_paused():
            imp, click, conv = self._split()
            if by_reference:
                ids = imp[0]
                rows = map(_WireReference, ids, imp[1], itertools.repeat(_NO_FEATURES), ids)
                impressions: list[msgspec.Struct] = list(rows)
            else:
                wire = _wire_impression(tuple(f.name for f in self.schema.features))
                impressions = list(map(wire, imp[0], imp[1], self._feature_rows()))
            encode = _ENCODER.encode
            values = self._in_order(
                [
                    *map(encode, impressions),
                    *map(encode, map(Click, *click)),
                    *map(encode, map(Conversion, *conv)),
                ]
            )
            blob = self.imp_id.astype(">i8").tobytes()
            keys = [blob[i : i + 8] for i in range(0, len(blob), 8)]
            return list(zip(keys, values, self.ts_ms.tolist(), strict=True))

    # --- internals --------------------------------------------------------------------------

    def _split(self) -> list[tuple[list[int], list[int]]]:
        """``(imp_ids, ts)`` lists of the impressions, clicks and conversions."""
        return [
            (self.imp_id[self.kind == k].tolist(), self.ts_ms[self.kind == k].tolist())
            for k in (IMPRESSION, CLICK, CONVERSION)
        ]

    def _in_order(self, grouped: list[Any]) -> list[Any]:
        """Items listed impressions first, then clicks, then conversions, put in batch order."""
        # A stable sort by kind lists each kind in batch order; its inverse puts them back.
        by_kind = np.argsort(self.kind, kind="stable")
        back = np.empty_like(by_kind)
        back[by_kind] = np.arange(len(by_kind))
        return [grouped[i] for i in back.tolist()]

    def _feature_rows(self) -> list[msgspec.Struct]:
        names = tuple(f.name for f in self.schema.features)
        cols: list[list[Any]] = []
        for spec in self.schema.features:
            col = self.features[spec.name]
            if spec.kind == "sparse":
                cols.append(col.tolist())
            elif spec.kind == "multi_sparse":
                values, offsets = col[0].tolist(), col[1].tolist()
                cols.append(list(map(values.__getitem__, map(slice, offsets, offsets[1:]))))
            else:
                decimals = DENSE_DECIMALS.get(spec.name, 6)
                cols.append(np.round(col.astype(np.float64), decimals).tolist())
        return list(map(_wire_features(names), *cols))


@lru_cache(maxsize=16)
def _wire_features(names: tuple[str, ...]) -> type[msgspec.Struct]:
    fields = [(name, Any) for name in names]
    return msgspec.defstruct("WireFeatures", fields, gc=False)


@lru_cache(maxsize=16)
def _wire_impression(names: tuple[str, ...]) -> type[msgspec.Struct]:
    fields = [("imp_id", int), ("ts_ms", int), ("features", _wire_features(names))]
    return msgspec.defstruct("WireImpression", fields, tag="impression", gc=False)


class _WireReference(msgspec.Struct, tag="impression", gc=False):
    """An impression by reference as :func:`minutely.events.encode_event` writes it (same fields
    in the same order; ``features`` always the empty dict)."""

    imp_id: int
    ts_ms: int
    features: dict[str, Any]
    request_id: int


_NO_FEATURES: dict[str, Any] = {}


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Suspend the cyclic GC while building many acyclic objects (it would rescan them often)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
