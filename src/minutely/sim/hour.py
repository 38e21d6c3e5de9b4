"""One simulated hour: who requests, which ad wins, and the true click and conversion odds.

The true click logit of an impression is

    0.8 * affinity(user taste at t, ad category and creative)  + ad quality(age)
    + category appeal(t) + slot + device + hour-of-day cycle + user bias

and the conversion logit (given a click) is ``0.6 * affinity`` plus advertiser, campaign, ad and
device traits. Everything that moves with time (user tastes over the day, category appeal,
ad quality with age, the hour-of-day cycle) is scaled by ``SimConfig.drift``; in the hours
from ``regime_switch_hour`` up to ``regime_end_hour`` (for good when it is not set), users'
preferences over categories are permuted (regime B), and before and after they are the
original ones (regime A). Intercepts are set by :mod:`minutely.sim.market` so that the mean
CTR and CVR hit the configured base rates.

Ad selection is a cheap proxy of an auction: an ad wins a request with probability proportional
to its weight (bid x quality x budget pacing) times a targeting boost when its category is among
the user's logged interests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from minutely.clock import MS_PER_DAY, MS_PER_HOUR
from minutely.config import SimConfig
from minutely.errors import ConfigError
from minutely.sim._rng import Stream, rng
from minutely.sim.campaigns import TARGETING_BOOST, Ledger, quality
from minutely.sim.world import World

APPEAL_KNOT_HOURS = 4  # category appeal takes a new random level every few hours
_APPEAL_SIGMA = 0.35
_APPEAL_DAILY = 0.25
_TASTE_SWING = 0.6  # how far user tastes move over the day
_HOUR_CYCLE = 0.2
_MAIN_DEVICE_P = 0.85
_TWO_PI = 2.0 * np.pi


def check_regime(cfg: SimConfig) -> None:
    """Raise :class:`~minutely.errors.ConfigError` unless the regime hours make a span:
    ``regime_end_hour`` needs ``regime_switch_hour`` and must come after it.

    >>> check_regime(SimConfig(regime_switch_hour=30, regime_end_hour=30))
    Traceback (most recent call last):
    ...
    minutely.errors.ConfigError: config field 'sim.regime_end_hour': expected int > \
sim.regime_switch_hour (30), got 30 (int)
    """
    end, switch = cfg.regime_end_hour, cfg.regime_switch_hour
    if end is None:
        return
    if switch is None:
        raise ConfigError("sim.regime_end_hour", "None when sim.regime_switch_hour is not set", end)
    if end <= switch:
        raise ConfigError("sim.regime_end_hour", f"int > sim.regime_switch_hour ({switch})", end)


def in_regime_b(cfg: SimConfig, hour: int) -> bool:
    """Whether ``hour`` (hours since the market opened) is in the switched regime:
    ``regime_switch_hour <= hour < regime_end_hour`` (no end: from the switch on).

    >>> cfg = SimConfig(regime_switch_hour=30, regime_end_hour=36)
    >>> [in_regime_b(cfg, h) for h in (29, 30, 35, 36)]
    [False, True, True, False]
    """
    switch, end = cfg.regime_switch_hour, cfg.regime_end_hour
    return switch is not None and hour >= switch and (end is None or hour < end)


@dataclass(frozen=True)
class Requests:
    """An hour's impressions before outcomes, sorted by time."""

    hour: int
    ts_ms: NDArray[np.int64]
    user: NDArray[np.int64]
    device: NDArray[np.int64]
    slot: NDArray[np.int64]
    ad: NDArray[np.int64]
    campaign: NDArray[np.int64]
    advertiser: NDArray[np.int64]
    category: NDArray[np.int64]
    age_h: NDArray[np.float64]
    x_click: NDArray[np.float64]  # true click logit without the intercept
    x_conv: NDArray[np.float64]  # true conversion logit without the intercept

    def __len__(self) -> int:
        return len(self.ts_ms)


class HourDrawer:
    """Draws hours of requests for one market; keeps a small cache of appeal knots."""

    def __init__(self, cfg: SimConfig, world: World, ledger: Ledger) -> None:
        check_regime(cfg)
        self._cfg = cfg
        self._world = world
        self._ledger = ledger
        self._knots: dict[int, NDArray[np.float64]] = {}

    def requests(
        self, hour: int, n: int, g: np.random.Generator, *, regime: bool = True
    ) -> Requests:
        """``n`` requests of ``hour`` drawn with ``g``; ``regime=False`` ignores the regime
        switch."""
        cfg, w = self._cfg, self._world
        hour_start = cfg.start_ms + hour * MS_PER_HOUR
        ts = hour_start + np.sort(g.integers(0, MS_PER_HOUR, n))
        # Sorted keys make the search cache-friendly; the permutation restores random order.
        user = np.searchsorted(w.user_activity_cdf, np.sort(g.random(n)), side="right")
        user = g.permutation(np.minimum(user, cfg.users - 1))
        device = np.where(
            g.random(n) < _MAIN_DEVICE_P, w.user_device[user], g.integers(0, cfg.devices, n)
        )
        slot = g.choice(cfg.slots, size=n, p=w.slot_p)
        ad = self._choose_ads(hour, user, g)
        c = self._ledger.campaigns  # after _choose_ads: pacing may have extended it
        campaign = ad // cfg.ads_per_campaign
        category = c.category[campaign]
        advertiser = c.advertiser[campaign]
        age_h = (ts - (cfg.start_ms + c.start_hour[campaign] * MS_PER_HOUR)) / MS_PER_HOUR

        t_h = (ts - cfg.start_ms) / MS_PER_HOUR  # hours since the market opened
        hod = (ts % MS_PER_DAY) / MS_PER_HOUR  # UTC hour of day, continuous
        switched = regime and in_regime_b(cfg, hour)
        pref = w.regime_perm[category] if switched else category
        taste = w.user_taste[user].astype(np.float64)
        swing = np.sin(_TWO_PI * t_h / 24.0) * (cfg.drift * _TASTE_SWING)
        taste += swing[:, None] * w.user_swing[user]
        affinity = np.einsum("ij,ij->i", taste, w.category_pos[pref] + c.ad_vec[ad])
        q = quality(c.ad_q0[ad], c.ad_trend[ad], age_h, cfg.drift)
        appeal = w.category_appeal[pref] + cfg.drift * (
            _APPEAL_DAILY * np.sin(_TWO_PI * hod / 24.0 + w.category_phase[pref])
            + self._appeal_walk(hour, t_h, pref)
        )
        cycle = cfg.drift * _HOUR_CYCLE * np.cos(_TWO_PI * (hod - 20.0) / 24.0)
        x_click = (
            0.8 * affinity
            + q
            + appeal
            + w.slot_effect[slot]
            + w.device_effect[device]
            + cycle
            + w.user_bias[user]
        )
        x_conv = (
            0.6 * affinity
            + w.advertiser_cvr[advertiser]
            + c.cvr[campaign]
            + 0.3 * c.ad_q0[ad]
            + w.device_cvr[device]
        )
        return Requests(
            hour=hour,
            ts_ms=ts,
            user=user,
            device=device,
            slot=slot,
            ad=ad,
            campaign=campaign,
            advertiser=advertiser,
            category=category,
            age_h=age_h,
            x_click=x_click,
            x_conv=x_conv,
        )

    def _choose_ads(
        self, hour: int, user: NDArray[np.int64], g: np.random.Generator
    ) -> NDArray[np.int64]:
        cfg, w = self._cfg, self._world
        n = len(user)
        ads, weight = self._ledger.active(hour)
        cats = self._ledger.campaigns.category[ads // cfg.ads_per_campaign]
        order = np.argsort(cats, kind="stable")
        ads, weight, cats = ads[order], weight[order], cats[order]
        cum = np.cumsum(weight)
        total = cum[-1]
        w_cat = np.bincount(cats, weights=weight, minlength=cfg.categories)
        hi = np.cumsum(np.bincount(cats, minlength=cfg.categories))
        lo = hi - np.bincount(cats, minlength=cfg.categories)
        before = np.concatenate([[0.0], cum])[lo]

        pad = w.interests_pad[user]
        listed = np.where(pad >= 0, w_cat[np.maximum(pad, 0)], 0.0)
        listed_total = listed.sum(axis=1)
        r_branch, r_cat, r_ad = g.random((3, n))
        targeted = r_branch * (total + TARGETING_BOOST * listed_total) >= total

        k = (np.cumsum(listed, axis=1) <= (r_cat * listed_total)[:, None]).sum(axis=1)
        k = np.minimum(k, w.interests_len[user] - 1)
        cat = pad[np.arange(n), k]
        in_cat = np.searchsorted(cum, before[cat] + r_ad * w_cat[cat], side="right")
        in_cat = np.clip(in_cat, lo[cat], np.maximum(hi[cat] - 1, lo[cat]))
        anywhere = np.minimum(np.searchsorted(cum, r_ad * total, side="right"), len(ads) - 1)
        return np.asarray(ads[np.where(targeted, in_cat, anywhere)], dtype=np.int64)

    def _appeal_walk(
        self, hour: int, t_h: NDArray[np.float64], pref: NDArray[np.int64]
    ) -> NDArray[np.float64]:
        """Piecewise-linear random levels of each category's appeal, new every few hours."""
        k = hour // APPEAL_KNOT_HOURS
        a, b = self._knot(k), self._knot(k + 1)
        frac = (t_h - k * APPEAL_KNOT_HOURS) / APPEAL_KNOT_HOURS
        return np.asarray(a[pref] + frac * (b[pref] - a[pref]), dtype=np.float64)

    def _knot(self, k: int) -> NDArray[np.float64]:
        knot = self._knots.get(k)
        if knot is None:
            g = rng(self._cfg.seed, Stream.APPEAL, k)
            knot = g.normal(0.0, _APPEAL_SIGMA, self._cfg.categories)
            if len(self._knots) > 64:
                self._knots.clear()
            self._knots[k] = knot
        return knot
