import dataclasses
import pickle
import typing
from pathlib import Path

import pytest

from minutely.config import Config, ModelConfig, StreamConfig, load_config
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
        (
            {"demo": {"models": ["nope"]}},
            r"'demo\.models': expected names of models among \['ctr', 'cvr'\], got 'nope'",
        ),
        (
            {"models": [{"name": "a"}, {"name": "a"}]},
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


def test_a_directory_as_config_path_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=rf"expected a TOML file, not a folder, got '{tmp_path}'"):
        load_config(tmp_path)


def test_a_config_file_that_is_not_utf8_names_it(tmp_path: Path) -> None:
    p = tmp_path / "latin1.toml"
    p.write_bytes('[demo]\nmodel = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"expected UTF-8 text \(.* at byte 19\), got '{p}'"):
        load_config(p)


def test_an_unreadable_config_file_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = tmp_path / "locked.toml"
    p.write_text("")

    def deny(self: Path, *args: object, **kwargs: object) -> str:
        raise PermissionError(13, "Permission denied", str(self))

    # Root reads any file whatever its mode, so the refusal is simulated.
    monkeypatch.setattr(Path, "read_text", deny)
    monkeypatch.setattr(Path, "read_bytes", deny)
    with pytest.raises(
        ConfigError, match=rf"expected a readable file \(Permission denied\), got '{p}'"
    ):
        load_config(p)


@pytest.mark.parametrize("literal", ["nan", "inf", "-inf"])
def test_non_finite_floats_in_a_file_are_refused(tmp_path: Path, literal: str) -> None:
    p = tmp_path / "m.toml"
    p.write_text(f"[serve]\npoll_interval_s = {literal}\n")
    with pytest.raises(ConfigError, match=r"'serve\.poll_interval_s': expected a finite float"):
        load_config(p)


def float_fields() -> list[tuple[str, str]]:
    """Every float field of every config section, as (section, field)."""
    found = []
    for section, tp in typing.get_type_hints(Config).items():
        if not dataclasses.is_dataclass(tp):
            continue
        for name, hint in typing.get_type_hints(tp).items():
            if hint is float or float in typing.get_args(hint):
                found.append((section, name))
    return found


def test_the_float_fields_are_found() -> None:
    assert {("train", "lr"), ("sim", "base_ctr"), ("serve", "poll_interval_s")} <= set(
        float_fields()
    )


@pytest.mark.parametrize(("section", "name"), float_fields())
@pytest.mark.parametrize(
    "value",
    [float("nan"), float("inf"), float("-inf"), pytest.param(10**400, id="10**400")],
)
def test_every_float_field_refuses_non_finite_values(section: str, name: str, value: float) -> None:
    with pytest.raises(ConfigError, match=rf"'{section}\.{name}': expected a finite float, got"):
        load_config(None, {section: {name: value}})


@pytest.mark.parametrize(
    ("overrides", "where", "value"),
    [
        ({"sim": {"seed": 2**63}}, r"sim\.seed", str(2**63)),
        ({"sim": {"regime_switch_hour": 10**30}}, r"sim\.regime_switch_hour", str(10**30)),
        ({"train": {"seed": -(2**63) - 1}}, r"train\.seed", str(-(2**63) - 1)),
        ({"models": [{"hidden": [8, 2**64]}]}, r"models\[0\]\.hidden\[1\]", str(2**64)),
    ],
)
def test_ints_beyond_64_bits_are_refused(
    overrides: dict[str, object], where: str, value: str
) -> None:
    with pytest.raises(
        ConfigError, match=rf"'{where}': expected int within 64 bits .*, got {value}"
    ):
        load_config(None, overrides)


def test_64_bit_limits_themselves_are_accepted() -> None:
    assert load_config(None, {"train": {"seed": 2**63 - 1}}).train.seed == 2**63 - 1
    assert load_config(None, {"train": {"seed": -(2**63)}}).train.seed == -(2**63)


def test_stream_kafka_options_load_from_a_toml_table(tmp_path: Path) -> None:
    p = tmp_path / "kafka.toml"
    p.write_text(
        """
[stream]
backend = "kafka"
bootstrap_servers = "broker-1:9092,broker-2:9092"
session_timeout_s = 6
request_timeout_s = 15.5
[stream.kafka]
"security.protocol" = "SASL_SSL"
sasl.mechanism = "PLAIN"
"""
    )
    stream = load_config(p).stream
    assert stream.backend == "kafka"
    assert stream.bootstrap_servers == "broker-1:9092,broker-2:9092"
    assert (stream.session_timeout_s, stream.request_timeout_s) == (6.0, 15.5)
    # A dotted TOML key names the dotted client option.
    assert dict(stream.kafka) == {"security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN"}
    assert load_config(None).stream.kafka == {}


def test_stream_kafka_options_stay_immutable_hashable_and_picklable() -> None:
    options = {"client.id": "join"}
    stream = StreamConfig(backend="kafka", kafka=options)
    options["client.id"] = "changed"  # the config keeps its own copy
    assert stream.kafka == {"client.id": "join"}
    with pytest.raises(TypeError):
        stream.kafka["client.id"] = "x"  # type: ignore[index]
    assert hash(stream) == hash(StreamConfig(backend="kafka", kafka={"client.id": "join"}))
    assert pickle.loads(pickle.dumps(stream)) == stream


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        (
            {"kafka": {"sasl": {"mechanism": 1}}},
            r"'stream\.kafka\.sasl\.mechanism': expected a string, got 1",
        ),
        ({"kafka": {"acks": True}}, r"'stream\.kafka\.acks': expected a string, got True"),
        ({"kafka": "security.protocol=SSL"}, r"'stream\.kafka': expected a table, got 'security"),
        ({"backend": "redis"}, r"'stream\.backend': expected one of \['sqlite', 'kafka'\]"),
        (
            {"session_timeout_s": 0.5},
            r"'stream\.session_timeout_s': expected float >= 1\.0, got 0\.5",
        ),
        ({"request_timeout_s": "10"}, r"'stream\.request_timeout_s': expected float, got '10'"),
    ],
)
def test_bad_stream_fields_fail_naming_the_field(stream: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, {"stream": stream})


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (
            {"name": "c", "loss": "fnw"},
            r"'models\.c\.attribution_window_s': expected 0 \(loss 'fnw' trains on samples "
            r"emitted at once\), got 600",
        ),
        (
            {"name": "c", "loss": "fnc", "attribution_window_s": 0, "correction_horizon_s": 0},
            r"'models\.c\.correction_horizon_s': expected int >= 1 \(loss 'fnc' learns",
        ),
        ({"name": "c", "loss": "focal"}, r"'models\[0\]\.loss': expected one of \['bce', 'pu'"),
    ],
)
def test_loss_rules_fail_at_load_naming_the_field(model: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, {"models": [model]})


def test_fake_negative_losses_load_with_an_immediate_window() -> None:
    cfg = load_config(
        None,
        {
            "models": [{"name": "c", "loss": "fnw", "attribution_window_s": 0}],
        },
    )
    assert cfg.model("c").loss == "fnw"
    assert cfg.model("c").attribution_window_s == 0
