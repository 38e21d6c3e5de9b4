"""The registry a run publishes to: keys, locations, announcements, and the exporter's deltas."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import msgspec
import pytest
import torch

from minutely.config import ExportConfig, ModelConfig, StreamConfig, load_config
from minutely.errors import ArtifactError, ConfigError
from minutely.model import build_model
from minutely.pipeline.export import Exporter
from minutely.pipeline.origin import (
    Announcer,
    decode_announcement,
    ensure_keys,
    follow_announcements,
    fsspec_options,
    publisher_registry,
    reader_registry,
    registry_location,
)
from minutely.registry import Manifest, Registry
from minutely.registry.signing import Signer
from minutely.schema import default_schema
from minutely.stream.factory import open_log

SCHEMA = default_schema()


def publish(registry: Registry, model: str, w: torch.Tensor) -> Manifest:
    """A one-tensor LR version of ``model``."""
    return registry.publish(
        model,
        {"w": w},
        created_ms=5,
        arch="lr",
        model_config={"arch": "lr"},
        schema=SCHEMA,
        metrics={},
        samples_seen=0,
    )


def test_a_run_generates_its_key_pair_once_and_signs_what_it_publishes(tmp_path: Path) -> None:
    cfg = load_config(None)
    private, _ = ensure_keys(cfg, tmp_path)
    assert private == tmp_path / "keys" / "signing.pem"
    assert oct(private.stat().st_mode & 0o777) == "0o600"
    before = private.read_bytes()
    ensure_keys(cfg, tmp_path)
    assert private.read_bytes() == before  # not regenerated
    pub = publisher_registry(cfg, tmp_path)
    m = publish(pub, "ctr", torch.ones(3))
    _, sig = pub.manifest_bytes("ctr", m.version)
    assert sig is not None
    reader = reader_registry(cfg, tmp_path)
    _, tensors = reader.load("ctr", m.version, expected_fingerprint=SCHEMA.fingerprint())
    assert tensors["w"].tolist() == [1.0, 1.0, 1.0]


def test_a_reader_refuses_a_version_another_key_signed(tmp_path: Path) -> None:
    cfg = load_config(None)
    ensure_keys(cfg, tmp_path)
    other = Registry(tmp_path / "registry", signer=Signer.generate())
    m = publish(other, "ctr", torch.ones(3))
    with pytest.raises(ArtifactError, match="wrong signature"):
        reader_registry(cfg, tmp_path).load("ctr", m.version, expected_fingerprint=None)


def test_a_reader_without_a_public_key_fails_at_start_naming_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"registry\.public_key.*public.pem"):
        reader_registry(load_config(None), tmp_path)


def test_a_configured_key_that_is_missing_is_not_replaced(tmp_path: Path) -> None:
    cfg = load_config(None, {"registry": {"signing_key": str(tmp_path / "nope.pem")}})
    with pytest.raises(ConfigError, match=r"registry\.signing_key.*nope\.pem"):
        publisher_registry(cfg, tmp_path)
    assert not (tmp_path / "nope.pem").exists()


def test_locations_and_nested_storage_options(tmp_path: Path) -> None:
    cfg = load_config(None, {"registry": {"uri": "/srv/models"}})
    assert registry_location(cfg, tmp_path) == Path("/srv/models")
    bad = load_config(
        None,
        {"registry": {"storage_options": {"client_kwargs": "x", "client_kwargs.region": "y"}}},
    )
    with pytest.raises(ConfigError, match=r"registry\.storage_options\.client_kwargs\.region"):
        fsspec_options(bad)
    with pytest.raises(ConfigError, match=r"registry\.uri"):
        load_config(None, {"registry": {"uri": " "}})


def test_every_publish_and_pin_is_announced_on_the_topic(tmp_path: Path) -> None:
    cfg = load_config(None)
    log = open_log(StreamConfig(), tmp_path)
    try:
        registry = publisher_registry(cfg, tmp_path)
        Announcer(registry, log, "model-versions")
        v1 = publish(registry, "ctr", torch.zeros(2)).version
        v2 = publish(registry, "ctr", torch.ones(2)).version
        registry.pin("ctr", v1)
        registry.unpin("ctr")
        records = log.read("model-versions", 0, 0, 100)
        got = [decode_announcement(r.value) for r in records]
        assert [(a.model, a.version, a.serving) for a in got] == [
            ("ctr", v1, v1),
            ("ctr", v2, v2),
            ("ctr", v2, v1),
            ("ctr", v2, v2),
        ]
        assert all(r.key == b"ctr" for r in records)
        with pytest.raises(msgspec.DecodeError):
            decode_announcement(b'{"model": 1}')
    finally:
        log.close()


def test_the_exporter_publishes_sparse_deltas_up_to_the_chain_bound(tmp_path: Path) -> None:
    mcfg = ModelConfig(arch="deepfm", buckets=4_096, embedding_dim=8, hidden=(16,))
    model = build_model(mcfg, SCHEMA)
    registry = Registry(tmp_path / "registry")
    cfg = ExportConfig(min_samples=0, min_trained_min=0)
    exporter = Exporter(registry, mcfg, SCHEMA, cfg, delta_chain_max=2)
    kinds = []
    for step in range(5):
        with torch.no_grad():  # a few rows of every table change, as in a short window
            for p in model.parameters():
                if p.dim() == 2 and p.shape[0] >= 1_000:
                    p[step * 3 : step * 3 + 3] += 1.0
                else:
                    p += 0.01
        m = exporter.export(model, (step + 1) * 600_000, step * 100, {})
        kinds.append((m.delta_of, m.chain))
        full = m.files[m.weights_file].bytes
        _, tensors = registry.load("ctr", m.version, expected_fingerprint=None)
        for k, v in model.state_dict().items():
            assert torch.equal(tensors[k], v), k  # every version loads to the exact weights
        if m.delta_of is not None:
            first = registry.manifest("ctr", registry.versions("ctr")[0])
            assert full < first.files[first.weights_file].bytes / 10
    v = registry.versions("ctr")
    assert kinds == [(None, 0), (v[0], 1), (v[1], 2), (None, 0), (v[3], 1)]


def test_an_exporter_without_deltas_publishes_full_versions(tmp_path: Path) -> None:
    mcfg = ModelConfig(arch="lr", buckets=64)
    model = build_model(mcfg, SCHEMA)
    exporter = Exporter(Registry(tmp_path / "r"), mcfg, SCHEMA, ExportConfig(), delta_chain_max=0)
    a = exporter.export(model, 600_000, 0, {})
    b = exporter.export(model, 1_200_000, 0, {})
    assert (a.delta_of, b.delta_of) == (None, None)


def test_a_follower_sees_announcements_made_after_it_started(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = load_config(None)
    log = open_log(StreamConfig(), tmp_path)
    registry = publisher_registry(cfg, tmp_path)
    Announcer(registry, log, "model-versions")
    before = publish(registry, "ctr", torch.zeros(2)).version  # not seen
    got: list[tuple[str, str | None]] = []
    stop = threading.Event()
    thread = threading.Thread(
        target=follow_announcements,
        args=(log, "model-versions", {"ctr"}, lambda a: got.append((a.model, a.version)), stop),
        kwargs={"poll_s": 0.05},
    )
    try:
        with caplog.at_level(logging.WARNING, logger="minutely.pipeline.origin"):
            thread.start()
            time.sleep(0.3)
            log.append("model-versions", [(b"ctr", b"not json", 1)])
            publish(registry, "cvr", torch.zeros(2))  # another model: skipped
            after = publish(registry, "ctr", torch.ones(2)).version
            deadline = time.monotonic() + 10
            while not got and time.monotonic() < deadline:
                time.sleep(0.02)
    finally:
        stop.set()
        thread.join(10)
        log.close()
    assert got == [("ctr", after)]
    assert before != after
    assert any("not an announcement" in r.getMessage() for r in caplog.records)
