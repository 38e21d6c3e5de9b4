"""Regime A -> B -> A: switched preferences only in [regime_switch_hour, regime_end_hour)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from minutely.config import SimConfig, load_config
from minutely.errors import ConfigError
from minutely.sim import Market
from minutely.sim.hour import check_regime, in_regime_b

HOUR = 3_600_000
CFG = SimConfig(impressions_per_day=20_000, users=5_000, delay_preset="fast")


def test_regime_end_hour_defaults_to_none_and_loads_typed() -> None:
    assert load_config(None).sim.regime_end_hour is None
    cfg = load_config(None, {"sim": {"regime_switch_hour": 30, "regime_end_hour": 36}}).sim
    assert (cfg.regime_switch_hour, cfg.regime_end_hour) == (30, 36)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"regime_end_hour": 0}, r"'sim\.regime_end_hour': expected int \| None >= 1, got 0"),
        ({"regime_end_hour": "36"}, r"'sim\.regime_end_hour': expected int, got '36'"),
    ],
)
def test_bad_regime_end_hour_values_name_the_field(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, {"sim": overrides})


@pytest.mark.parametrize("end", [30, 12])
def test_an_end_not_after_the_switch_is_refused_naming_the_field(end: int) -> None:
    cfg = replace(CFG, regime_switch_hour=30, regime_end_hour=end)
    expected = (
        rf"config field 'sim\.regime_end_hour': expected int > sim\.regime_switch_hour \(30\), "
        rf"got {end} \(int\)"
    )
    with pytest.raises(ConfigError, match=expected):
        check_regime(cfg)
    with pytest.raises(ConfigError, match=expected):
        Market(cfg)


def test_an_end_without_a_switch_is_refused_naming_the_field() -> None:
    with pytest.raises(
        ConfigError,
        match=r"'sim\.regime_end_hour': expected None when sim\.regime_switch_hour is not set, "
        r"got 36 \(int\)",
    ):
        Market(replace(CFG, regime_end_hour=36))


def test_in_regime_b_is_the_half_open_span() -> None:
    assert not any(in_regime_b(CFG, h) for h in range(100))
    forever = replace(CFG, regime_switch_hour=30)
    assert [in_regime_b(forever, h) for h in (29, 30, 10_000)] == [False, True, True]
    span = replace(CFG, regime_switch_hour=30, regime_end_hour=36)
    assert [h for h in range(100) if in_regime_b(span, h)] == list(range(30, 36))


def test_preferences_return_to_regime_a_at_the_end_hour() -> None:
    plain = Market(CFG)
    switched = Market(replace(CFG, regime_switch_hour=30, regime_end_hour=36))
    a, b = plain.simulate_day(1), switched.simulate_day(1)
    np.testing.assert_array_equal(a.features["ad_id"], b.features["ad_id"])  # same traffic
    hour = 24 + (a.imp_ts_ms - plain.day_start_ms(1)) // HOUR
    before, during, after = hour < 30, (hour >= 30) & (hour < 36), hour >= 36
    for m in (before, during, after):
        assert m.sum() > 1_000
    for m in (before, after):  # regime A: the unswitched market's odds, exactly
        np.testing.assert_array_equal(a.p_click[m], b.p_click[m])
        np.testing.assert_array_equal(a.p_conv[m], b.p_conv[m])
    shift = np.abs(np.log(a.p_click[during]) - np.log(b.p_click[during]))
    assert shift.mean() > 0.3  # regime B: permuted preferences
    assert (a.p_conv[during] != b.p_conv[during]).mean() > 0.5
