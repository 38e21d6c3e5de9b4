from pathlib import Path

import pytest

from minutely.config import Config, ModelConfig, load_config
from minutely.errors import ConfigError


def test_defaults_are_complete_and_frozen() -> None:
    cfg = load_config(None)
    assert isinstance(cfg, Config)
    assert [m.name for m in cfg.models] == ["ctr", "cvr"]
    assert cfg.model("cvr").label == "conversion"
    with pytest.raises(AttributeError):
        cfg.train.batch_size = 3  # type: ignore[misc]


def test_toml_file_overrides_defaults(tmp_path: Path) -> None:
    p = tmp_path / "m.toml"
    p.write_text(
        """
[train]
batch_size = 256
lr = 1
[[models]]
name = "ctr"
attribution_window_s = 900
hidden = [32, 16]
"""
    )
    cfg = load_config(p)
    assert cfg.train.batch_size == 256
    assert cfg.train.lr == 1.0
    assert isinstance(cfg.train.lr, float)
    assert cfg.models == (ModelConfig(attribution_window_s=900, hidden=(32, 16)),)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"train": {"batch_size": 0}}, r"'train\.batch_size': expected int >= 1, got 0"),
        ({"train": {"batch_size": "8"}}, r"'train\.batch_size': expected int, got '8' \(str\)"),
        ({"train": {"batch_size": True}}, r"'train\.batch_size': expected int, got True"),
        ({"train": {"batchsize": 8}}, r"'train\.batchsize': expected a known field of \[train\]"),
        ({"bogus": {}}, r"'bogus': expected a known field of \[root\]"),
        ({"train": 5}, r"'train': expected a table, got 5"),
        ({"models": [{"label": "view"}]}, r"'models\[0\]\.label': expected one of"),
        ({"models": [{"hidden": [8, "x"]}]}, r"'models\[0\]\.hidden\[1\]': expected int"),
        ({"models": {"name": "x"}}, r"'models': expected an array"),
        ({"serve": {"port": 70_000}}, r"'serve\.port': expected int <= 65535"),
        ({"serve": {"host": 1}}, r"'serve\.host': expected a string"),
        ({"sim": {"regime_switch_hour": "x"}}, r"'sim\.regime_switch_hour': expected int"),
        ({"demo": {"model": "nope"}}, r"'demo\.model': expected one of \['ctr', 'cvr'\]"),
        (
            {"models": [{"name": "a"}, {"name": "a"}], "demo": {"model": "a"}},
            r"'models': expected unique model names",
        ),
    ],
)
def test_bad_fields_fail_naming_the_field(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_optional_field_accepts_value_and_none() -> None:
    assert load_config(None, {"sim": {"regime_switch_hour": 30}}).sim.regime_switch_hour == 30
    assert load_config(None).sim.regime_switch_hour is None


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected an existing TOML file"):
        load_config(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\n")
    with pytest.raises(ConfigError, match="expected valid TOML"):
        load_config(bad)


def test_unknown_model_lookup_names_choices() -> None:
    with pytest.raises(ConfigError, match=r"'models': expected a model named one of"):
        load_config(None).model("nope")
