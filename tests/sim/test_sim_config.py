import pytest

from minutely.config import SimConfig, load_config
from minutely.errors import ConfigError


def test_sim_defaults() -> None:
    cfg = load_config(None).sim
    assert cfg == SimConfig()
    assert cfg.impressions_per_day == 1_000_000
    assert cfg.regime_switch_hour is None


def test_sim_overrides_are_typed() -> None:
    cfg = load_config(None, {"sim": {"regime_switch_hour": 30, "drift": 2, "slots": 6}}).sim
    assert cfg.regime_switch_hour == 30
    assert cfg.drift == 2.0
    assert isinstance(cfg.drift, float)
    assert cfg.slots == 6


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"users": 0}, r"'sim\.users': expected int >= 1, got 0"),
        ({"seed": -1}, r"'sim\.seed': expected int >= 0, got -1"),
        ({"impressions_per_day": 10**9}, r"'sim\.impressions_per_day': expected int <= 999999999"),
        ({"categories": 1}, r"'sim\.categories': expected int >= 2, got 1"),
        ({"campaign_hours_mean": 0.5}, r"'sim\.campaign_hours_mean': expected float >= 1\.0"),
        ({"campaign_hours_mean": 1e4}, r"'sim\.campaign_hours_mean': expected float <= 720\.0"),
        ({"base_ctr": 0.9}, r"'sim\.base_ctr': expected float <= 0\.5, got 0\.9"),
        ({"base_cvr": 0.0}, r"'sim\.base_cvr': expected float >= 0\.0001, got 0\.0"),
        ({"drift": -1.0}, r"'sim\.drift': expected float >= 0\.0, got -1\.0"),
        ({"slots": 0}, r"'sim\.slots': expected int >= 1, got 0"),
        ({"devices": 100}, r"'sim\.devices': expected int <= 64, got 100"),
        ({"delay_preset": "slow"}, r"'sim\.delay_preset': expected one of \['criteo', 'fast'\]"),
        (
            {"regime_switch_hour": -3},
            r"'sim\.regime_switch_hour': expected int | None >= 0, got -3",
        ),
        ({"regime_switch_hour": "9"}, r"'sim\.regime_switch_hour': expected int, got '9'"),
        ({"userz": 5}, r"'sim\.userz': expected a known field of \[sim\]"),
    ],
)
def test_bad_sim_values_name_the_field(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, {"sim": overrides})
