"""The ad market: days of traffic, the raw event stream and the ground truth.

A :class:`Market` is deterministic for its :class:`~minutely.config.SimConfig`: a day comes out
byte-identical whichever days were simulated before it and in which order, because every hour
draws from its own random streams (see :mod:`minutely.sim._rng`) and the campaigns running in an
hour follow from the hour alone (see :mod:`minutely.sim.campaigns`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from minutely.clock import MS_PER_DAY
from minutely.config import SimConfig
from minutely.errors import SchemaError
from minutely.schema import Schema, default_schema
from minutely.sim.batch import CLICK, CONVERSION, IMPRESSION, EventBatch
from minutely.sim.delays import DELAY_PRESETS, DelayModel
from minutely.sim.generate import DayGenerator
from minutely.sim.traffic import DayTraffic, Features, concat_features, slice_features
from minutely.sim.world import build_world

SIM_FEATURES: dict[str, str] = {spec.name: spec.kind for spec in default_schema().features}


@dataclass(frozen=True)
class _Outcomes:
    """The click and conversion events of one day's impressions, sorted by time."""

    click_imp_id: NDArray[np.int64]
    click_ts_ms: NDArray[np.int64]
    conv_imp_id: NDArray[np.int64]
    conv_ts_ms: NDArray[np.int64]


class Market:
    """A simulated ad market; days are generated on demand and cached.

    ``cached_days`` full days are kept (least recently used first out); the clicks and
    conversions of every simulated day are kept, so the late conversions of old days stay
    cheap. Asking first for a day far from the start simulates the days whose conversions can
    still land in it (up to ``max_delay_ms`` back: a month with the ``criteo`` preset).
    Not thread-safe.

    >>> from minutely.config import SimConfig
    >>> m = Market(SimConfig(impressions_per_day=2_000, users=500, delay_preset="fast"))
    >>> day = m.simulate_day(0)
    >>> len(day), day.imp_id[0]
    (2000, np.int64(0))
    >>> batch = m.events_between(m.day_start_ms(0), m.day_start_ms(0) + 3_600_000)
    >>> key, value, ts_ms = batch.messages()[0]
    >>> value[:40]
    b'{"type":"impression","imp_id":0,"ts_ms":'
    """

    def __init__(
        self, cfg: SimConfig, schema: Schema | None = None, *, cached_days: int = 2
    ) -> None:
        self.cfg = cfg
        self.schema = default_schema() if schema is None else schema
        _check_schema(self.schema)
        if cached_days < 1:
            raise ValueError(f"Market: expected cached_days >= 1, got {cached_days}")
        self.delays: DelayModel = DELAY_PRESETS[cfg.delay_preset]
        self._gen = DayGenerator(cfg, self.schema, build_world(cfg), self.delays)
        self._cached_days = cached_days
        self._days: OrderedDict[int, DayTraffic] = OrderedDict()
        self._outcomes: dict[int, _Outcomes] = {}

    def intercepts(self) -> tuple[float, float]:
        """The true click and conversion logit intercepts (fitted to the base rates)."""
        return self._gen.intercepts()

    # --- time -------------------------------------------------------------------------------

    @property
    def max_delay_ms(self) -> int:
        """The longest impression-to-conversion delay of the delay preset."""
        return self.delays.max_total_ms

    def day_start_ms(self, day: int) -> int:
        return self.cfg.start_ms + day * MS_PER_DAY

    def day_of(self, ts_ms: int) -> int:
        """The market day that contains ``ts_ms`` (negative before the start)."""
        return (ts_ms - self.cfg.start_ms) // MS_PER_DAY

    # --- days -------------------------------------------------------------------------------

    def simulate_day(self, day: int) -> DayTraffic:
        """Every impression of ``day`` (day 0 starts at ``cfg.start_ms``) and its outcomes."""
        if isinstance(day, bool) or not isinstance(day, int) or day < 0:
            raise ValueError(f"Market.simulate_day: expected an int day >= 0, got {day!r}")
        cached = self._days.get(day)
        if cached is not None:
            self._days.move_to_end(day)
            return cached
        traffic = self._gen.day(day)
        self._days[day] = traffic
        while len(self._days) > self._cached_days:
            self._days.popitem(last=False)
        self._outcomes[day] = _Outcomes(
            traffic.click_imp_id, traffic.click_ts_ms, traffic.conv_imp_id, traffic.conv_ts_ms
        )
        return traffic

    def truth(self, day: int) -> dict[str, NDArray[Any]]:
        """The true probabilities and eventual outcomes of each impression of ``day``."""
        t = self.simulate_day(day)
        return {
            "imp_id": t.imp_id,
            "ts_ms": t.imp_ts_ms,
            "p_click": t.p_click,
            "p_conv": t.p_conv,
            "clicked": t.clicked,
            "converted": t.converted,
        }

    # --- the event stream -------------------------------------------------------------------

    def events_between(self, start_ms: int, end_ms: int) -> EventBatch:
        """Every event whose own timestamp is in ``[start_ms, end_ms)``, in stream order.

        Includes the clicks and conversions of impressions from earlier days (simulating those
        days if needed). Order: ``(ts_ms, kind, imp_id)`` with impression < click < conversion.
        """
        if end_ms < start_ms:
            raise ValueError(
                f"Market.events_between: expected start_ms <= end_ms, got {start_ms} > {end_ms}"
            )
        first = max(0, self.day_of(start_ms))
        last = self.day_of(end_ms - 1)
        if end_ms == start_ms or last < 0:
            return EventBatch.empty(self.schema)

        feats: list[Features] = []
        kinds: list[NDArray[np.uint8]] = []
        ids: list[NDArray[np.int64]] = []
        times: list[NDArray[np.int64]] = []

        def add(kind: int, imp_id: NDArray[np.int64], ts: NDArray[np.int64]) -> None:
            lo, hi = np.searchsorted(ts, [start_ms, end_ms])
            if hi > lo:
                kinds.append(np.full(hi - lo, kind, np.uint8))
                ids.append(imp_id[lo:hi])
                times.append(ts[lo:hi])

        for day in range(first, last + 1):
            t = self.simulate_day(day)
            lo, hi = np.searchsorted(t.imp_ts_ms, [start_ms, end_ms])
            feats.append(slice_features(t.features, self.schema, int(lo), int(hi)))
            add(IMPRESSION, t.imp_id, t.imp_ts_ms)
        for day in range(max(0, self.day_of(start_ms - self.max_delay_ms)), last + 1):
            out = self._day_outcomes(day)
            add(CLICK, out.click_imp_id, out.click_ts_ms)
            add(CONVERSION, out.conv_imp_id, out.conv_ts_ms)
        if not kinds:
            return EventBatch.empty(self.schema)

        kind, imp_id, ts = np.concatenate(kinds), np.concatenate(ids), np.concatenate(times)
        order = np.lexsort((imp_id, kind, ts))
        # Impressions are already in (ts, imp_id) order day after day, so their feature rows
        # stay in the order they take in the sorted batch.
        return EventBatch(
            schema=self.schema,
            kind=kind[order],
            imp_id=imp_id[order],
            ts_ms=ts[order],
            features=concat_features(feats, self.schema),
        )

    def _day_outcomes(self, day: int) -> _Outcomes:
        out = self._outcomes.get(day)
        if out is None:
            self.simulate_day(day)
            out = self._outcomes[day]
        return out


def _check_schema(schema: Schema) -> None:
    for spec in schema.features:
        kind = SIM_FEATURES.get(spec.name)
        if kind != spec.kind:
            want = f"one of {sorted(SIM_FEATURES)}" if kind is None else f"kind {kind!r}"
            raise SchemaError(
                f"Market: feature {spec.name!r} ({spec.kind}): expected {want}, "
                "the features the simulator emits"
            )
