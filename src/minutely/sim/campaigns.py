"""Campaigns and ads over time, and which of them run in each hour.

``campaigns_per_hour`` campaigns start at every hour boundary, each with ``ads_per_campaign`` new
ads. A campaign runs until its lifetime ends or its impression budget is spent. Budgets are paced
on *expected* delivery (the share an ad would win of the hour's requests, computed over a fixed
panel of representative users), not on sampled impressions: the campaigns live in any hour are
then a function of the hour alone, so an hour's traffic can be drawn without drawing the hours
before it. The recursion starts ``warmup_hours`` before hour 0 so the market opens in a steady
state, with campaigns of every age running.

Ids are dense and global: campaign ``(s + warmup_hours) * campaigns_per_hour + j`` is the j-th
campaign started at hour ``s``; its ads are ``campaign_id * ads_per_campaign + k``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from minutely.config import SimConfig
from minutely.sim._rng import Stream, rng
from minutely.sim.world import (
    LATENT_DIM,
    REP_USERS,
    TRAFFIC_PROFILE,
    World,
    hourly_impressions,
)

TARGETING_BOOST = 4.0  # an ad of a category the user lists is this much more likely to win
NOVELTY = 0.3  # quality boost of a fresh creative, fading over a few hours
_EXTEND_HOURS = 24


def quality(
    q0: NDArray[np.float64], trend: NDArray[np.float64], age_h: NDArray[np.float64], drift: float
) -> NDArray[np.float64]:
    """An ad's latent quality (a click logit shift) at ``age_h`` hours after its start."""
    moving = trend * np.minimum(age_h, 48.0) / 24.0 + NOVELTY * np.exp(-age_h / 4.0)
    return np.asarray(q0 + drift * moving, dtype=np.float64)


@dataclass
class Campaigns:
    """Campaign and ad attributes, indexed by campaign id and ad id."""

    advertiser: NDArray[np.int64]
    category: NDArray[np.int64]
    start_hour: NDArray[np.int64]
    end_hour: NDArray[np.int64]  # exclusive
    bid: NDArray[np.float64]
    budget: NDArray[np.float64]  # impressions
    cvr: NDArray[np.float64]  # conversion logit shift
    ad_q0: NDArray[np.float64]
    ad_trend: NDArray[np.float64]  # quality change per day of age (mostly negative: fatigue)
    ad_vec: NDArray[np.float64]  # [ads, LATENT_DIM] taste the creative appeals to, on top


class Ledger:
    """Generates campaigns hour by hour and paces their budgets; cached, extended on demand."""

    def __init__(self, cfg: SimConfig, world: World) -> None:
        self._cfg = cfg
        self._world = world
        self.warmup_hours = math.ceil(4 * cfg.campaign_hours_mean)
        self._per_day = hourly_impressions(cfg.impressions_per_day)
        self._hod0 = (cfg.start_ms // 3_600_000) % 24
        live_campaigns = cfg.campaigns_per_hour * cfg.campaign_hours_mean
        self._typical_hourly = cfg.impressions_per_day / len(TRAFFIC_PROFILE) / live_campaigns
        self.campaigns = _empty_campaigns()
        self._generated_to = -self.warmup_hours  # start hours generated: [-warmup, this)
        self._delivered = np.zeros(0)
        self._live = np.zeros(0, dtype=np.int64)
        self._paced_to = -self.warmup_hours  # hours paced: [-warmup, this)
        self._active: dict[int, tuple[NDArray[np.int64], NDArray[np.float64]]] = {}

    def impressions_in_hour(self, hour: int) -> int:
        return int(self._per_day[(self._hod0 + hour) % 24])

    def utc_hour_of_day(self, hour: int) -> int:
        return int((self._hod0 + hour) % 24)

    def active(self, hour: int) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
        """The ad ids running in ``hour`` and their auction weights (bid x quality x pacing)."""
        if hour < -self.warmup_hours:
            raise ValueError(f"Ledger.active: expected hour >= {-self.warmup_hours}, got {hour}")
        while self._paced_to <= hour:
            self._pace_next()
        return self._active[hour]

    # --- generation -------------------------------------------------------------------------

    def _ensure_generated(self, hour: int) -> None:
        if hour < self._generated_to:
            return
        stop = max(hour + 1, self._generated_to + _EXTEND_HOURS)
        parts = [self._generate(s) for s in range(self._generated_to, stop)]
        self.campaigns = _concat([self.campaigns, *parts])
        self._delivered = np.concatenate(
            [self._delivered, np.zeros(len(self.campaigns.bid) - len(self._delivered))]
        )
        self._generated_to = stop

    def _generate(self, start: int) -> Campaigns:
        cfg, w = self._cfg, self._world
        g = rng(cfg.seed, Stream.CAMPAIGNS, start)
        n, per = cfg.campaigns_per_hour, cfg.ads_per_campaign
        adv = g.choice(cfg.advertisers, size=n, p=w.advertiser_p)
        on_vertical = g.random(n) < 0.7
        cat = np.where(on_vertical, w.advertiser_category[adv], g.integers(0, cfg.categories, n))
        hours = np.ceil(g.exponential(cfg.campaign_hours_mean, n))
        hours = np.clip(hours, 1, self.warmup_hours).astype(np.int64)
        budget = self._typical_hourly * hours * g.uniform(0.4, 2.4, n)
        m = n * per
        return Campaigns(
            advertiser=adv.astype(np.int64),
            category=cat.astype(np.int64),
            start_hour=np.full(n, start, dtype=np.int64),
            end_hour=start + hours,
            bid=w.advertiser_bid[adv] * g.lognormal(0.0, 0.4, n),
            budget=budget,
            cvr=g.normal(0.0, 0.3, n),
            ad_q0=g.normal(0.0, 0.4, m),
            ad_trend=g.normal(-0.35, 0.45, m),
            ad_vec=g.normal(0.0, 0.3 / np.sqrt(LATENT_DIM), (m, LATENT_DIM)),
        )

    # --- pacing -----------------------------------------------------------------------------

    def _pace_next(self) -> None:
        hour = self._paced_to
        self._ensure_generated(hour)
        cfg, c = self._cfg, self.campaigns
        per = cfg.ads_per_campaign
        first_new = (hour + self.warmup_hours) * cfg.campaigns_per_hour
        live = np.concatenate(
            [self._live, np.arange(first_new, first_new + cfg.campaigns_per_hour)]
        )
        ads = (live[:, None] * per + np.arange(per)).ravel()
        age = np.repeat(hour - c.start_hour[live] + 0.5, per)
        weight = np.repeat(c.bid[live], per) * np.exp(
            quality(c.ad_q0[ads], c.ad_trend[ads], age, cfg.drift)
        )
        cats = np.repeat(c.category[live], per)
        n_hour = self.impressions_in_hour(hour)

        expected = self._expected(weight, cats, n_hour).reshape(-1, per).sum(axis=1)
        remaining = c.budget[live] - self._delivered[live]
        scale = np.minimum(1.0, remaining / np.maximum(expected, 1e-12))
        weight = weight * np.repeat(scale, per)
        expected = self._expected(weight, cats, n_hour).reshape(-1, per).sum(axis=1)
        self._delivered[live] += expected

        ads.setflags(write=False)
        weight.setflags(write=False)
        self._active[hour] = (ads, weight)
        still = (c.end_hour[live] > hour + 1) & (c.budget[live] - self._delivered[live] >= 1.0)
        self._live = live[still]
        self._paced_to = hour + 1

    def _expected(
        self, weight: NDArray[np.float64], cats: NDArray[np.int64], n_hour: int
    ) -> NDArray[np.float64]:
        """Expected impressions per ad in an hour of ``n_hour`` requests."""
        w = self._world
        n_cat = self._cfg.categories
        w_cat = np.bincount(cats, weights=weight, minlength=n_cat)
        # The win probability of the proxy auction (see minutely.sim.hour), averaged over the
        # representative users: 1 / (W + boost * sum of W over the user's listed categories).
        listed = np.bincount(w.rep_rows, weights=w_cat[w.rep_interests], minlength=REP_USERS)
        inv = 1.0 / (w_cat.sum() + TARGETING_BOOST * listed)
        per_cat = np.bincount(w.rep_interests, weights=inv[w.rep_rows], minlength=n_cat)
        share = (inv.sum() + TARGETING_BOOST * per_cat) / REP_USERS
        return np.asarray(n_hour * weight * share[cats], dtype=np.float64)


def _empty_campaigns() -> Campaigns:
    i, f = np.zeros(0, dtype=np.int64), np.zeros(0)
    return Campaigns(i, i, i, i, f, f, f, f, f, np.zeros((0, LATENT_DIM)))


def _concat(parts: list[Campaigns]) -> Campaigns:
    return Campaigns(
        advertiser=np.concatenate([p.advertiser for p in parts]),
        category=np.concatenate([p.category for p in parts]),
        start_hour=np.concatenate([p.start_hour for p in parts]),
        end_hour=np.concatenate([p.end_hour for p in parts]),
        bid=np.concatenate([p.bid for p in parts]),
        budget=np.concatenate([p.budget for p in parts]),
        cvr=np.concatenate([p.cvr for p in parts]),
        ad_q0=np.concatenate([p.ad_q0 for p in parts]),
        ad_trend=np.concatenate([p.ad_trend for p in parts]),
        ad_vec=np.concatenate([p.ad_vec for p in parts]),
    )
