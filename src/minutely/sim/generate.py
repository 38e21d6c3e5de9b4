"""From hours of requests to a day of traffic: outcomes, delays and the logged features."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from minutely.clock import MS_PER_HOUR
from minutely.config import SimConfig
from minutely.schema import Schema
from minutely.sim._rng import Stream, rng
from minutely.sim.campaigns import Ledger
from minutely.sim.delays import DelayModel
from minutely.sim.hour import HourDrawer, Requests
from minutely.sim.traffic import DayTraffic, Features, freeze
from minutely.sim.world import World

IMP_ID_STRIDE = 1_000_000_000  # imp_id = day * IMP_ID_STRIDE + index within the day
CTR_PRIOR_IMPRESSIONS = 100.0  # weight of the base CTR in the smoothed ad_ctr_1h
_CALIBRATION_IMPRESSIONS = 60_000
_CALIBRATION_DAYS = 3


@dataclass(frozen=True)
class HourOutcome:
    requests: Requests
    p_click: NDArray[np.float64]
    p_conv: NDArray[np.float64]
    clicked: NDArray[np.bool_]
    converted: NDArray[np.bool_]


class DayGenerator:
    """Generates whole days; holds the world, the campaign ledger and the fitted intercepts."""

    def __init__(self, cfg: SimConfig, schema: Schema, world: World, delays: DelayModel) -> None:
        self._cfg = cfg
        self._schema = schema
        self._world = world
        self._delays = delays
        self._ledger = Ledger(cfg, world)
        self._drawer = HourDrawer(cfg, world, self._ledger)
        self._intercepts: tuple[float, float] | None = None

    @property
    def ledger(self) -> Ledger:
        return self._ledger

    def intercepts(self) -> tuple[float, float]:
        """Click and conversion logit intercepts that put the mean CTR and CVR at the base rates.

        Fitted once on a sample of the first days drawn from a stream of its own (ignoring any
        regime switch), so every day uses the same intercepts whatever was simulated first.
        """
        if self._intercepts is None:
            cfg = self._cfg
            share = _CALIBRATION_IMPRESSIONS / (cfg.impressions_per_day * _CALIBRATION_DAYS)
            xc, xv = [], []
            for hour in range(24 * _CALIBRATION_DAYS):
                n = max(1, round(self._ledger.impressions_in_hour(hour) * share))
                g = rng(cfg.seed, Stream.CALIBRATION, hour)
                r = self._drawer.requests(hour, n, g, regime=False)
                xc.append(r.x_click)
                xv.append(r.x_conv)
            x_click, x_conv = np.concatenate(xc), np.concatenate(xv)
            b_click = solve_intercept(x_click, np.ones_like(x_click), cfg.base_ctr)
            b_conv = solve_intercept(x_conv, sigmoid(b_click + x_click), cfg.base_cvr)
            self._intercepts = (b_click, b_conv)
        return self._intercepts

    def hour(self, hour: int) -> HourOutcome:
        """The requests of ``hour``, their true odds and eventual outcomes."""
        b_click, b_conv = self.intercepts()
        n = self._ledger.impressions_in_hour(hour)
        r = self._drawer.requests(hour, n, rng(self._cfg.seed, Stream.HOUR_REQUESTS, hour))
        p_click = sigmoid(b_click + r.x_click)
        p_conv = sigmoid(b_conv + r.x_conv)
        u = rng(self._cfg.seed, Stream.HOUR_OUTCOMES, hour).random((2, n))
        clicked = u[0] < p_click
        return HourOutcome(r, p_click, p_conv, clicked, clicked & (u[1] < p_conv))

    def day(self, day: int) -> DayTraffic:
        cfg, w = self._cfg, self._world
        first = 24 * day
        prev = self.hour(first - 1)  # for the first hour's ad_ctr_1h
        hours: list[HourOutcome] = []
        ctr: list[NDArray[np.float64]] = []
        click_delay: list[NDArray[np.int64]] = []
        conv_delay: list[NDArray[np.int64]] = []
        for h in range(first, first + 24):
            cur = self.hour(h)
            hours.append(cur)
            ctr.append(smoothed_ctr(prev.requests.ad, prev.clicked, cur.requests.ad, cfg.base_ctr))
            g = rng(cfg.seed, Stream.HOUR_DELAYS, h)
            click_delay.append(self._delays.click.sample(g, int(cur.clicked.sum())))
            conv_delay.append(self._delays.conversion.sample(g, int(cur.converted.sum())))
            prev = cur
        req = [h.requests for h in hours]

        ts = _cat([r.ts_ms for r in req])
        n = len(ts)
        imp_id = day * IMP_ID_STRIDE + np.arange(n, dtype=np.int64)
        clicked = _cat([h.clicked for h in hours])
        converted = _cat([h.converted for h in hours])
        click_at = np.zeros(n, np.int64)
        click_at[clicked] = ts[clicked] + _cat(click_delay)
        click_ids, click_ts = imp_id[clicked], click_at[clicked]
        conv_ids, conv_ts = imp_id[converted], click_at[converted] + _cat(conv_delay)
        click_order = np.lexsort((click_ids, click_ts))
        conv_order = np.lexsort((conv_ids, conv_ts))

        user = _cat([r.user for r in req])
        lengths = w.interests_len[user]
        pad = w.interests_pad[user]
        columns: dict[str, Any] = {
            "user_id": user,
            "ad_id": _cat([r.ad for r in req]),
            "campaign_id": _cat([r.campaign for r in req]),
            "advertiser_id": _cat([r.advertiser for r in req]),
            "category": _cat([r.category for r in req]),
            "slot": _cat([r.slot for r in req]),
            "device": _cat([r.device for r in req]),
            "hour_of_day": (ts // MS_PER_HOUR) % 24,
            "user_interests": (pad[pad >= 0], np.concatenate([[0], np.cumsum(lengths)])),
            "ad_age_hours": np.round(_cat([r.age_h for r in req]), 2),
            "user_activity": w.user_activity[user],
            "ad_ctr_1h": np.round(_cat(ctr), 5),
        }
        features: Features = {}
        for spec in self._schema.features:
            col = columns[spec.name]
            if spec.kind == "multi_sparse":
                features[spec.name] = tuple(freeze(c.astype(np.int64)) for c in col)
            elif spec.kind == "sparse":
                features[spec.name] = freeze(col.astype(np.int64))
            else:
                features[spec.name] = freeze(col.astype(np.float32))
        return DayTraffic(
            day=day,
            schema=self._schema,
            imp_id=freeze(imp_id),
            imp_ts_ms=freeze(ts),
            features=features,
            p_click=freeze(_cat([h.p_click for h in hours]).astype(np.float32)),
            p_conv=freeze(_cat([h.p_conv for h in hours]).astype(np.float32)),
            clicked=freeze(clicked),
            converted=freeze(converted),
            click_imp_id=freeze(click_ids[click_order]),
            click_ts_ms=freeze(click_ts[click_order]),
            conv_imp_id=freeze(conv_ids[conv_order]),
            conv_ts_ms=freeze(conv_ts[conv_order]),
        )


def _cat(parts: Sequence[NDArray[Any]]) -> NDArray[Any]:
    return np.concatenate(parts)


def sigmoid(x: NDArray[np.float64]) -> NDArray[np.float64]:
    return np.asarray(1.0 / (1.0 + np.exp(-x)), dtype=np.float64)


def solve_intercept(x: NDArray[np.float64], weight: NDArray[np.float64], target: float) -> float:
    """``b`` such that the ``weight``-weighted mean of ``sigmoid(b + x)`` is ``target``."""
    lo, hi = -40.0, 40.0
    total = float(weight.sum())
    for _ in range(50):  # to ~1e-13
        mid = 0.5 * (lo + hi)
        if float((weight * sigmoid(mid + x)).sum()) / total < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def smoothed_ctr(
    prev_ad: NDArray[np.int64],
    prev_clicked: NDArray[np.bool_],
    ad: NDArray[np.int64],
    prior: float,
) -> NDArray[np.float64]:
    """Each ad's CTR over the previous hour, shrunk to ``prior`` (the prior for unseen ads)."""
    if len(prev_ad) == 0:
        return np.full(len(ad), prior)
    ids, inverse = np.unique(prev_ad, return_inverse=True)
    imps = np.bincount(inverse, minlength=len(ids)).astype(np.float64)
    clicks = np.bincount(inverse, weights=prev_clicked, minlength=len(ids))
    pos = np.minimum(np.searchsorted(ids, ad), len(ids) - 1)
    m = CTR_PRIOR_IMPRESSIONS
    smoothed = (clicks[pos] + m * prior) / (imps[pos] + m)
    return np.asarray(np.where(ids[pos] == ad, smoothed, prior), dtype=np.float64)
