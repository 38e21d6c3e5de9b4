from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from minutely.config import FeaturesConfig, FrozenMap, load_config
from minutely.errors import ConfigError, StorageError
from minutely.features import Replica, resolve_replicas


def test_defaults_name_two_local_replicas_and_write_no_snapshots() -> None:
    cfg = load_config(None).features
    assert cfg == FeaturesConfig()
    assert cfg.snapshots is True
    assert len(cfg.replicas) == 2
    assert cfg.replicas[0] != cfg.replicas[1]
    assert cfg.storage_options == {}
    assert cfg.replica_storage_options == ()


def test_features_table_loads_from_toml(tmp_path: Path) -> None:
    p = tmp_path / "features.toml"
    p.write_text(
        """
[features]
snapshots = true
replicas = ["s3://lake-a/snapshots", "snap/b"]
read_timeout_s = 1
failback_check_s = 2.5
missing_wait_s = 0
cache_buckets = 2
replica_storage_options = [{AWS_REGION = "eu-west-1"}, {}]

[features.storage_options]
AWS_ALLOW_HTTP = "true"
AWS_REGION = "us-east-1"
"""
    )
    cfg = load_config(p).features
    assert cfg.snapshots is True
    assert cfg.replicas == ("s3://lake-a/snapshots", "snap/b")
    assert cfg.read_timeout_s == 1.0
    assert isinstance(cfg.read_timeout_s, float)
    assert cfg.missing_wait_s == 0.0
    assert cfg.cache_buckets == 2
    assert cfg.options_for(0) == {"AWS_ALLOW_HTTP": "true", "AWS_REGION": "eu-west-1"}
    assert cfg.options_for(1) == {"AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1"}
    # frozen, hashable and picklable like the rest of the configuration
    assert isinstance(cfg.storage_options, FrozenMap)
    assert hash(cfg) == hash(pickle.loads(pickle.dumps(cfg)))


@pytest.mark.parametrize(
    ("features", "message"),
    [
        (
            {"replicas": ["a"]},
            r"'features\.replicas': expected 2 table URLs or paths \(a primary and a secondary\), "
            r"got \('a',\) \(tuple\)",
        ),
        (
            {"replicas": ["a", "b", "c"]},
            r"'features\.replicas': expected 2 table URLs or paths",
        ),
        ({"replicas": ["a", "a"]}, r"'features\.replicas': expected 2 different tables"),
        (
            {"replicas": ["a", " "]},
            r"'features\.replicas\[1\]': expected a non-empty table URL or path, got ' '",
        ),
        ({"replicas": ["a", 3]}, r"'features\.replicas\[1\]': expected a string, got 3 \(int\)"),
        ({"replicas": "a,b"}, r"'features\.replicas': expected an array, got 'a,b'"),
        ({"read_timeout_s": 0}, r"'features\.read_timeout_s': expected float >= 0\.001, got 0"),
        ({"read_timeout_s": "5"}, r"'features\.read_timeout_s': expected float, got '5' \(str\)"),
        ({"write_timeout_s": -1}, r"'features\.write_timeout_s': expected float >= 0\.001"),
        ({"failback_check_s": 0.0}, r"'features\.failback_check_s': expected float >= 0\.001"),
        (
            {"missing_wait_s": -0.5},
            r"'features\.missing_wait_s': expected float >= 0\.0, got -0\.5",
        ),
        ({"cache_buckets": 0}, r"'features\.cache_buckets': expected int >= 1, got 0"),
        ({"cache_buckets": 2000}, r"'features\.cache_buckets': expected int <= 1024, got 2000"),
        ({"max_backlog_rows": 0}, r"'features\.max_backlog_rows': expected int >= 1, got 0"),
        ({"snapshots": 1}, r"'features\.snapshots': expected a boolean, got 1 \(int\)"),
        (
            {"storage_options": {"timeout": 5}},
            r"'features\.storage_options\.timeout': expected a string",
        ),
        (
            {"replica_storage_options": [{"AWS_REGION": "x"}]},
            r"'features\.replica_storage_options': expected an empty array or one table of "
            r"options per replica \(2\)",
        ),
        ({"replica": ["a", "b"]}, r"'features\.replica': expected a known field of \[features\]"),
    ],
)
def test_bad_features_values_fail_naming_the_field(
    features: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, {"features": features})


def test_a_config_built_in_code_is_checked_the_same_way() -> None:
    with pytest.raises(ConfigError, match=r"'features\.read_timeout_s': expected float >= 0\.001"):
        FeaturesConfig(read_timeout_s=0.0)
    with pytest.raises(
        ConfigError, match=r"'features\.missing_wait_s': expected float >= 0\.0, got nan"
    ):
        FeaturesConfig(missing_wait_s=float("nan"))
    with pytest.raises(ConfigError, match=r"'features\.replicas': expected 2 table URLs"):
        FeaturesConfig(replicas=["a", "b"])  # type: ignore[arg-type]
    cfg = FeaturesConfig(storage_options={"k": "v"}, replica_storage_options=({}, {"k": "w"}))
    assert isinstance(cfg.storage_options, FrozenMap)
    assert all(isinstance(m, FrozenMap) for m in cfg.replica_storage_options)
    assert cfg.options_for(1) == {"k": "w"}
    hash(cfg)


def test_relative_replicas_resolve_inside_the_run_folder_and_urls_stay(tmp_path: Path) -> None:
    cfg = FeaturesConfig(
        replicas=("s3://bucket/snapshots", "features/b"), storage_options={"AWS_REGION": "x"}
    )
    primary, secondary = resolve_replicas(cfg, tmp_path)
    assert primary == Replica("s3://bucket/snapshots", {"AWS_REGION": "x"})
    assert secondary.url == str(tmp_path / "features" / "b")
    assert hash(primary) == hash(Replica("s3://bucket/snapshots", {"AWS_REGION": "x"}))
    with pytest.raises(
        StorageError, match=r"feature replica: expected a table URL or path, got ''"
    ):
        Replica("")
    absolute = FeaturesConfig(replicas=(str(tmp_path / "x"), "y"))
    assert resolve_replicas(absolute, Path("/elsewhere"))[0].url == str(tmp_path / "x")


def test_two_replicas_that_resolve_to_one_folder_are_refused(tmp_path: Path) -> None:
    cfg = FeaturesConfig(replicas=("snap", str(tmp_path / "snap")))
    with pytest.raises(StorageError, match=r"expected 2 different tables, got the same one"):
        resolve_replicas(cfg, tmp_path)
