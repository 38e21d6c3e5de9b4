import numpy as np
import pytest

from minutely.config import SimConfig
from minutely.sim import DELAY_PRESETS, LogNormalMixture, Market
from minutely.sim.campaigns import Ledger
from minutely.sim.world import build_world

MIN, HOUR, DAY = 60_000, 3_600_000, 86_400_000


def conversion_delays(delay_preset: str) -> np.ndarray:
    """Click-to-conversion delays of a day of a market with many conversions."""
    cfg = SimConfig(
        impressions_per_day=20_000,
        users=3_000,
        base_ctr=0.3,
        base_cvr=0.5,
        delay_preset=delay_preset,  # type: ignore[arg-type]
    )
    t = Market(cfg).simulate_day(0)
    click_ts = dict(zip(t.click_imp_id.tolist(), t.click_ts_ms.tolist(), strict=True))
    conv = zip(t.conv_imp_id.tolist(), t.conv_ts_ms.tolist(), strict=True)
    return np.array([ts - click_ts[i] for i, ts in conv])


def test_criteo_preset_matches_the_published_delay_shape() -> None:
    d = conversion_delays("criteo")
    assert len(d) > 2_000
    assert np.mean(d <= HOUR) == pytest.approx(0.35, abs=0.04)
    assert np.mean(d <= DAY) == pytest.approx(0.50, abs=0.04)
    assert d.max() <= 30 * DAY
    assert np.mean(d > 7 * DAY) > 0.1  # a long tail


def test_criteo_mixture_fractions_in_a_large_sample() -> None:
    model = DELAY_PRESETS["criteo"].conversion
    d = model.sample(np.random.default_rng(3), 200_000)
    assert np.mean(d <= HOUR) == pytest.approx(0.35, abs=0.01)
    assert np.mean(d <= DAY) == pytest.approx(0.50, abs=0.015)
    for t in (MIN, HOUR, DAY, 10 * DAY):
        assert np.mean(d <= t) == pytest.approx(model.cdf(t), abs=0.005)
    assert model.cdf(31 * DAY) == pytest.approx(1.0)


def test_fast_preset_converts_within_ten_minutes() -> None:
    d = conversion_delays("fast")
    assert len(d) > 2_000
    assert d.min() >= 1_000
    assert d.max() <= 10 * MIN
    assert DELAY_PRESETS["fast"].max_total_ms == 40 * MIN


def test_clicks_come_seconds_to_minutes_after_the_impression() -> None:
    d = DELAY_PRESETS["criteo"].click.sample(np.random.default_rng(0), 50_000)
    assert 20_000 <= np.median(d) <= 60_000
    assert d.min() >= 1_000
    assert d.max() <= 30 * MIN
    assert np.mean(d > 5 * MIN) > 0.01


def test_truncation_draws_again_instead_of_piling_up_at_the_cap() -> None:
    model = LogNormalMixture(((1.0, 10_000.0, 1.0),), floor_ms=1, cap_ms=10_000)
    d = model.sample(np.random.default_rng(0), 10_000)
    assert d.max() <= 10_000
    assert np.mean(d == 10_000) < 0.01


def test_hours_before_the_warmup_are_refused() -> None:
    cfg = SimConfig(users=100)
    ledger = Ledger(cfg, build_world(cfg))
    with pytest.raises(ValueError, match=r"expected hour >= -72, got -73"):
        ledger.active(-73)
