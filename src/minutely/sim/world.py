"""The static part of the market: users, advertisers, categories and request contexts.

Everything here is drawn once from the seed. What moves in time (campaigns, ad quality, category
appeal, user interests over the day) is computed from these arrays and the hour, in
:mod:`minutely.sim.campaigns` and :mod:`minutely.sim.hour`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from minutely.config import SimConfig
from minutely.sim._rng import Stream, rng

LATENT_DIM = 8  # user tastes and category positions live in this space
MAX_INTERESTS = 5  # logged user_interests hold 1..5 category ids
REP_USERS = 2_048  # users that stand for the population when budgets are paced
_CHUNK = 16_384  # users per block when drawing logged interests (bounds the memory)

# Relative request volume by UTC hour of day: a night trough and an evening peak.
TRAFFIC_PROFILE = np.array(
    [
        *(0.55, 0.40, 0.30, 0.25, 0.25, 0.30, 0.45, 0.65, 0.85, 0.95, 1.00, 1.05),
        *(1.10, 1.05, 1.00, 1.00, 1.05, 1.15, 1.30, 1.45, 1.50, 1.40, 1.10, 0.80),
    ]
)


@dataclass(frozen=True)
class World:
    """Arrays indexed by user, advertiser, category, slot or device id."""

    # users
    user_taste: NDArray[np.float32]  # [users, LATENT_DIM] latent interest vector
    user_swing: NDArray[np.float32]  # [users, LATENT_DIM] direction the taste moves over a day
    user_bias: NDArray[np.float64]  # [users] propensity to click at all
    user_activity: NDArray[np.float32]  # [users] relative request rate (mean 1), logged
    user_activity_cdf: NDArray[np.float64]  # [users] to draw requesting users
    user_device: NDArray[np.int64]  # [users] main device
    interests_pad: NDArray[np.int64]  # [users, MAX_INTERESTS] logged interests, -1 padded
    interests_len: NDArray[np.int64]  # [users]
    rep_interests: NDArray[np.int64]  # listed categories of REP_USERS users drawn by activity
    rep_rows: NDArray[np.int64]  # the representative user (0..REP_USERS) of each of those
    # categories
    category_pos: NDArray[np.float64]  # [categories, LATENT_DIM]
    category_appeal: NDArray[np.float64]  # [categories] base appeal
    category_phase: NDArray[np.float64]  # [categories] phase of the daily appeal cycle
    regime_perm: NDArray[np.int64]  # [categories] preferences after the regime switch
    # advertisers
    advertiser_p: NDArray[np.float64]  # [advertisers] share of new campaigns
    advertiser_category: NDArray[np.int64]  # [advertisers] main vertical
    advertiser_bid: NDArray[np.float64]  # [advertisers] bid scale
    advertiser_cvr: NDArray[np.float64]  # [advertisers] conversion propensity (logit)
    # request contexts
    slot_p: NDArray[np.float64]  # [slots]
    slot_effect: NDArray[np.float64]  # [slots] click logit shift (top slots get clicked more)
    device_effect: NDArray[np.float64]  # [devices] click logit shift
    device_cvr: NDArray[np.float64]  # [devices] conversion logit shift


def build_world(cfg: SimConfig) -> World:
    """Draw the static market for ``cfg.seed``."""
    g = rng(cfg.seed, Stream.WORLD)
    u, c, a = cfg.users, cfg.categories, cfg.advertisers

    taste = g.standard_normal((u, LATENT_DIM)).astype(np.float32)
    swing = g.standard_normal((u, LATENT_DIM)).astype(np.float32)
    bias = g.normal(0.0, 0.3, u)
    activity = g.lognormal(0.0, 0.8, u)
    activity = np.round(activity / activity.mean(), 4).astype(np.float32)
    cdf = np.cumsum(activity, dtype=np.float64)
    cdf /= cdf[-1]
    devices = _device_p(cfg.devices)
    main_device = g.choice(cfg.devices, size=u, p=devices)

    pos = g.standard_normal((c, LATENT_DIM)) / np.sqrt(LATENT_DIM)
    n_int = np.minimum(1 + g.binomial(MAX_INTERESTS - 1, 0.45, u), min(MAX_INTERESTS, c))
    pad = np.concatenate(
        [
            _logged_interests(taste[lo : lo + _CHUNK], pos, n_int[lo : lo + _CHUNK], g)
            for lo in range(0, u, _CHUNK)
        ]
    )

    popularity = 1.0 / np.arange(1, a + 1) ** 0.9
    popularity = g.permutation(popularity)

    slot_p = 1.0 / np.arange(1, cfg.slots + 1)
    rep_pad = pad[np.searchsorted(cdf, g.random(REP_USERS), side="right").clip(0, u - 1)]
    rep_rows = np.broadcast_to(np.arange(REP_USERS)[:, None], rep_pad.shape)[rep_pad >= 0]
    return World(
        user_taste=taste,
        user_swing=swing,
        user_bias=bias,
        user_activity=activity,
        user_activity_cdf=cdf,
        user_device=main_device.astype(np.int64),
        interests_pad=pad,
        interests_len=np.asarray(n_int, dtype=np.int64),
        rep_interests=rep_pad[rep_pad >= 0],
        rep_rows=rep_rows.astype(np.int64),
        category_pos=pos,
        category_appeal=g.normal(0.0, 0.3, c),
        category_phase=g.uniform(0.0, 2 * np.pi, c),
        regime_perm=g.permutation(c).astype(np.int64),
        advertiser_p=popularity / popularity.sum(),
        advertiser_category=g.integers(0, c, a),
        advertiser_bid=g.lognormal(0.0, 0.3, a),
        advertiser_cvr=g.normal(0.0, 0.5, a),
        slot_p=slot_p / slot_p.sum(),
        slot_effect=np.linspace(0.4, -0.4, cfg.slots) if cfg.slots > 1 else np.zeros(1),
        device_effect=g.normal(0.0, 0.25, cfg.devices),
        device_cvr=g.normal(0.0, 0.2, cfg.devices),
    )


def _logged_interests(
    taste: NDArray[np.float32],
    pos: NDArray[np.float64],
    n_int: NDArray[np.int64],
    g: np.random.Generator,
) -> NDArray[np.int64]:
    """Each user's ``n_int`` top categories, ascending, padded with -1 to MAX_INTERESTS."""
    # A noisy top-k of the true base affinity: informative about the user, not exact.
    noisy = taste.astype(np.float64) @ pos.T + g.gumbel(0.0, 0.7, (len(taste), len(pos)))
    k = min(MAX_INTERESTS, len(pos))
    top = np.argpartition(-noisy, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(noisy, top, axis=1), axis=1)
    top = np.take_along_axis(top, order, axis=1)
    keep = np.arange(k)[None, :] < n_int[:, None]
    big = np.iinfo(np.int64).max  # sorts the pads last
    pad = np.full((len(taste), MAX_INTERESTS), big, dtype=np.int64)
    pad[:, :k] = np.where(keep, top, big)
    pad = np.sort(pad, axis=1)
    pad[pad == big] = -1
    return pad


def _device_p(devices: int) -> NDArray[np.float64]:
    p = 0.6 ** np.arange(devices, dtype=np.float64)
    return np.asarray(p / p.sum(), dtype=np.float64)


def hourly_impressions(total: int) -> NDArray[np.int64]:
    """Impressions per UTC hour of day summing exactly to ``total`` (largest remainders)."""
    share = TRAFFIC_PROFILE / TRAFFIC_PROFILE.sum() * total
    base = np.floor(share).astype(np.int64)
    rest = total - int(base.sum())
    order = np.argsort(-(share - base), kind="stable")
    base[order[:rest]] += 1
    return np.asarray(base, dtype=np.int64)
