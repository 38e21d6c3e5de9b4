"""The file-system registry: publish/load round trip, atomicity, verification, rollback pointer."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from minutely.errors import (
    ArtifactError,
    ChecksumMismatchError,
    SchemaMismatchError,
    StorageError,
)
from minutely.registry import (
    MANIFEST_FILE,
    POINTER_FILE,
    WEIGHTS_FILE,
    Manifest,
    Registry,
    file_entry,
)
from minutely.schema import FeatureSpec, Schema

SCHEMA = Schema((FeatureSpec("user_id", "sparse"), FeatureSpec("x", "dense")))
OTHER_SCHEMA = Schema((FeatureSpec("ad_id", "sparse"),))
FP = SCHEMA.fingerprint()


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "bias": torch.randn(1, generator=g),
        "first_order.user_id.weight": torch.randn(16, 1, generator=g),
        "dense_linear.weight": torch.randn(1, 1, generator=g),
    }


def _publish(reg: Registry, model: str = "ctr", seed: int = 0, **kw: Any) -> Manifest:
    args: dict[str, Any] = {
        "created_ms": 1_000 + seed,
        "arch": "lr",
        "model_config": {"name": model, "arch": "lr", "hidden": (8, 4)},
        "schema": SCHEMA,
        "metrics": {"auc": 0.7},
        "samples_seen": 100 * seed,
    }
    args.update(kw)
    return reg.publish(model, _tensors(seed), **args)


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry")


def test_publish_then_load_round_trips(reg: Registry) -> None:
    m = _publish(reg, seed=3, parent="v00000002", base="v00000001")
    assert m.version == "v00000001"
    assert (m.model, m.arch, m.created_ms, m.samples_seen) == ("ctr", "lr", 1_003, 300)
    assert (m.parent, m.base) == ("v00000002", "v00000001")
    assert m.model_config == {"name": "ctr", "arch": "lr", "hidden": [8, 4]}
    assert m.feature_schema == SCHEMA.to_dict()
    assert m.schema_fingerprint == FP
    assert m.metrics == {"auc": 0.7}
    entry = m.files[WEIGHTS_FILE]
    assert entry.bytes == (reg.root / "ctr" / m.version / WEIGHTS_FILE).stat().st_size

    loaded, tensors = reg.load("ctr", m.version, expected_fingerprint=FP)
    assert loaded == m
    assert reg.manifest("ctr", m.version) == m
    want = _tensors(3)
    assert sorted(tensors) == sorted(want)
    for name, t in want.items():
        assert torch.equal(tensors[name], t)


def test_versions_are_numbered_in_order(reg: Registry) -> None:
    assert reg.versions("ctr") == []
    assert reg.latest("ctr") is None
    assert reg.serving_version("ctr") is None
    made = [_publish(reg, seed=i).version for i in range(3)]
    assert made == ["v00000001", "v00000002", "v00000003"]
    assert reg.versions("ctr") == made
    latest = reg.latest("ctr")
    assert latest is not None
    assert latest.version == "v00000003"
    assert reg.serving_version("ctr") == "v00000003"
    # Models are independent.
    assert _publish(reg, model="cvr").version == "v00000001"


def test_no_temporary_directory_is_left_after_publish(reg: Registry) -> None:
    _publish(reg)
    assert sorted(p.name for p in (reg.root / "ctr").iterdir()) == ["v00000001"]
    assert sorted(p.name for p in (reg.root / "ctr" / "v00000001").iterdir()) == [
        MANIFEST_FILE,
        WEIGHTS_FILE,
    ]


def test_leftover_temporary_directory_is_ignored(reg: Registry) -> None:
    _publish(reg)
    # What a publisher that crashed mid-write leaves behind.
    tmp = reg.root / "ctr" / ".tmp-crashed"
    tmp.mkdir()
    (tmp / WEIGHTS_FILE).write_bytes(b"partial")
    assert reg.versions("ctr") == ["v00000001"]
    latest = reg.latest("ctr")
    assert latest is not None
    assert latest.version == "v00000001"
    assert _publish(reg, seed=1).version == "v00000002"


def test_latest_skips_a_version_whose_manifest_does_not_parse(reg: Registry) -> None:
    _publish(reg)
    broken = _publish(reg, seed=1)
    (reg.root / "ctr" / broken.version / MANIFEST_FILE).write_text("{ not json")
    latest = reg.latest("ctr")
    assert latest is not None
    assert latest.version == "v00000001"
    assert reg.serving_version("ctr") == "v00000001"
    # Its number is never reused.
    assert _publish(reg, seed=2).version == "v00000003"


def test_concurrent_publishers_get_distinct_versions(reg: Registry) -> None:
    got: list[str] = []
    lock = threading.Lock()

    def publish(seed: int) -> None:
        v = _publish(reg, seed=seed).version
        with lock:
            got.append(v)

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == [f"v{i:08d}" for i in range(1, 7)]
    for v in got:
        reg.load("ctr", v, expected_fingerprint=FP)
    assert not [p for p in (reg.root / "ctr").iterdir() if p.name.startswith(".")]


def test_shared_and_noncontiguous_tensors_are_stored(reg: Registry) -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    m = reg.publish(
        "ctr",
        {"a": base, "tied": base, "t": base.t(), "view": base[1]},
        created_ms=0,
        arch="lr",
        model_config={},
        schema=SCHEMA,
        metrics={},
        samples_seen=0,
    )
    _, tensors = reg.load("ctr", m.version, expected_fingerprint=None)
    assert torch.equal(tensors["a"], base)
    assert torch.equal(tensors["tied"], base)
    assert torch.equal(tensors["t"], base.t())
    assert torch.equal(tensors["view"], base[1])


# --- verification on load --------------------------------------------------------------------


def test_tampered_weights_byte_raises_checksum_mismatch(reg: Registry) -> None:
    m = _publish(reg)
    path = reg.root / "ctr" / m.version / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    expected = m.files[WEIGHTS_FILE].sha256
    with pytest.raises(
        ChecksumMismatchError,
        match=rf"{WEIGHTS_FILE}: expected sha256 {expected}, got [0-9a-f]{{64}}$",
    ):
        reg.load("ctr", m.version, expected_fingerprint=FP)


def test_truncated_weights_raise_checksum_mismatch_with_sizes(reg: Registry) -> None:
    m = _publish(reg)
    path = reg.root / "ctr" / m.version / WEIGHTS_FILE
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    size = m.files[WEIGHTS_FILE].bytes
    with pytest.raises(
        ChecksumMismatchError,
        match=rf"expected {size} bytes with sha256 [0-9a-f]+, got {size - 10} bytes with sha256",
    ):
        reg.load("ctr", m.version, expected_fingerprint=FP)


def test_missing_weights_file_is_named(reg: Registry) -> None:
    m = _publish(reg)
    (reg.root / "ctr" / m.version / WEIGHTS_FILE).unlink()
    with pytest.raises(
        ArtifactError, match=rf"{WEIGHTS_FILE}: listed in the manifest, got no such"
    ):
        reg.load("ctr", m.version, expected_fingerprint=FP)


def _rewrite_manifest(reg: Registry, m: Manifest, **changes: Any) -> Path:
    path = reg.root / "ctr" / m.version / MANIFEST_FILE
    doc = json.loads(path.read_bytes())
    doc.update(changes)
    path.write_text(json.dumps(doc))
    return path


def _entry_doc(data: bytes, chunk_bytes: int) -> dict[str, Any]:
    return dataclasses.asdict(file_entry(data, chunk_bytes))


def test_unreadable_safetensors_with_matching_checksum_is_an_artifact_error(
    reg: Registry,
) -> None:
    m = _publish(reg)
    garbage = b"\x00" * 64
    (reg.root / "ctr" / m.version / WEIGHTS_FILE).write_bytes(garbage)
    _rewrite_manifest(reg, m, files={WEIGHTS_FILE: _entry_doc(garbage, m.chunk_bytes)})
    with pytest.raises(ArtifactError, match=r"expected safetensors data, got an unreadable file"):
        reg.load("ctr", m.version, expected_fingerprint=FP)


def test_manifest_without_weights_entry_is_refused(reg: Registry) -> None:
    m = _publish(reg)
    _rewrite_manifest(reg, m, files={})
    with pytest.raises(ArtifactError, match=r"files: expected an entry for 'weights.safetensors'"):
        reg.load("ctr", m.version, expected_fingerprint=FP)


def test_manifest_file_names_cannot_escape_the_version(reg: Registry) -> None:
    m = _publish(reg)
    entry = dataclasses.asdict(m.files[WEIGHTS_FILE])
    _rewrite_manifest(reg, m, files={WEIGHTS_FILE: entry, "../../etc": entry})
    with pytest.raises(
        ArtifactError, match=r"files: expected plain file names, got '\.\./\.\./etc'"
    ):
        reg.load("ctr", m.version, expected_fingerprint=FP)


def test_wrong_expected_fingerprint_names_both(reg: Registry) -> None:
    m = _publish(reg)
    other = OTHER_SCHEMA.fingerprint()
    with pytest.raises(
        SchemaMismatchError,
        match=rf"manifest\.json: expected schema fingerprint '{other}', got '{FP}'",
    ):
        reg.load("ctr", m.version, expected_fingerprint=other)
    # None skips the comparison.
    reg.load("ctr", m.version, expected_fingerprint=None)


def test_fingerprint_inconsistent_with_feature_schema_is_refused(reg: Registry) -> None:
    m = _publish(reg)
    _rewrite_manifest(reg, m, feature_schema=OTHER_SCHEMA.to_dict())
    with pytest.raises(
        SchemaMismatchError,
        match=rf"schema_fingerprint '{FP}' does not match its feature_schema, which "
        rf"fingerprints to '{OTHER_SCHEMA.fingerprint()}'",
    ):
        reg.load("ctr", m.version, expected_fingerprint=None)


def test_malformed_feature_schema_is_refused(reg: Registry) -> None:
    m = _publish(reg)
    _rewrite_manifest(reg, m, feature_schema={"features": "nope"})
    with pytest.raises(SchemaMismatchError, match=r"feature_schema: schema: malformed schema"):
        reg.load("ctr", m.version, expected_fingerprint=FP)


def test_bad_manifest_json_names_the_file(reg: Registry) -> None:
    m = _publish(reg)
    path = reg.root / "ctr" / m.version / MANIFEST_FILE
    path.write_text('{"manifest_version": 1, "model": ')
    with pytest.raises(
        ArtifactError, match=rf"^{path}: expected a JSON manifest, got invalid JSON"
    ):
        reg.load("ctr", m.version, expected_fingerprint=FP)
    with pytest.raises(ArtifactError, match=rf"^{path}: expected a JSON manifest"):
        reg.manifest("ctr", m.version)


def test_unsupported_manifest_version_names_the_file(reg: Registry) -> None:
    m = _publish(reg)
    path = _rewrite_manifest(reg, m, manifest_version=99)
    with pytest.raises(
        ArtifactError,
        match=rf"^{path}: unsupported manifest_version: expected one of \[1, 2, 3\], got 99",
    ):
        reg.load("ctr", m.version, expected_fingerprint=FP)


def test_manifest_of_another_version_is_refused(reg: Registry) -> None:
    m = _publish(reg)
    _rewrite_manifest(reg, m, version="v00000009")
    with pytest.raises(
        ArtifactError,
        match=r"expected model 'ctr' version 'v00000001', got model 'ctr' version 'v00000009'",
    ):
        reg.load("ctr", m.version, expected_fingerprint=FP)


def test_missing_version_is_an_artifact_error(reg: Registry) -> None:
    with pytest.raises(
        ArtifactError, match=r"v00000004/manifest\.json: expected a manifest, got no"
    ):
        reg.load("ctr", "v00000004", expected_fingerprint=FP)


@pytest.mark.parametrize("model", ["", "../x", ".hidden", "a/b", "-x"])
def test_unsafe_model_names_are_refused(reg: Registry, model: str) -> None:
    with pytest.raises(ArtifactError, match=rf"model name: expected letters, .* got {model!r}"):
        reg.versions(model)


def test_unsafe_version_names_are_refused(reg: Registry) -> None:
    with pytest.raises(
        ArtifactError, match=r"version: expected 'v' and at least 8 digits, got '\.\.'"
    ):
        reg.manifest("ctr", "..")


# --- publish validation ----------------------------------------------------------------------


def test_non_finite_metric_is_refused_at_publish(reg: Registry) -> None:
    with pytest.raises(ArtifactError, match=r"metrics\['auc'\]: expected a finite float, got nan"):
        _publish(reg, metrics={"auc": float("nan")})
    assert reg.versions("ctr") == []


def test_bad_lineage_reference_is_refused_at_publish(reg: Registry) -> None:
    with pytest.raises(ArtifactError, match=r"parent: expected a version, got 'latest'"):
        _publish(reg, parent="latest")
    with pytest.raises(ArtifactError, match=r"base: expected a version, got '7'"):
        _publish(reg, base="7")


def test_negative_samples_seen_is_refused(reg: Registry) -> None:
    with pytest.raises(ArtifactError, match=r"samples_seen: expected >= 0, got -1"):
        _publish(reg, samples_seen=-1)


def test_unserializable_model_config_is_refused(reg: Registry) -> None:
    with pytest.raises(ArtifactError, match=r"model_config: expected JSON-serializable values"):
        _publish(reg, model_config={"f": object()})


def test_non_tensor_is_refused(reg: Registry) -> None:
    with pytest.raises(ArtifactError, match=r"tensors\['w'\]: expected a torch.Tensor, got list"):
        reg.publish(
            "ctr",
            {"w": [1.0]},  # type: ignore[dict-item]
            created_ms=0,
            arch="lr",
            model_config={},
            schema=SCHEMA,
            metrics={},
            samples_seen=0,
        )
    assert not (reg.root / "ctr").exists() or not list((reg.root / "ctr").iterdir())


# --- rollback pointer --------------------------------------------------------------------------


def test_pin_and_unpin_move_the_serving_version(reg: Registry) -> None:
    for i in range(3):
        _publish(reg, seed=i)
    assert reg.pinned("ctr") is None
    reg.pin("ctr", "v00000001")
    assert reg.pinned("ctr") == "v00000001"
    assert reg.serving_version("ctr") == "v00000001"
    _publish(reg, seed=3)  # new versions do not move a pin
    assert reg.serving_version("ctr") == "v00000001"
    assert json.loads((reg.root / "ctr" / POINTER_FILE).read_bytes()) == {"pinned": "v00000001"}
    reg.unpin("ctr")
    assert reg.pinned("ctr") is None
    assert reg.serving_version("ctr") == "v00000004"
    # Only the pointer file sits next to the versions: no temporary file is left.
    assert sorted(p.name for p in (reg.root / "ctr").iterdir() if not p.name.startswith("v")) == [
        POINTER_FILE
    ]


def test_pin_of_unknown_version_is_refused(reg: Registry) -> None:
    _publish(reg)
    with pytest.raises(ArtifactError, match=r"v00000005/manifest\.json: expected a manifest"):
        reg.pin("ctr", "v00000005")
    assert reg.pinned("ctr") is None


def test_unpin_without_versions_is_harmless(reg: Registry) -> None:
    reg.unpin("ctr")
    assert reg.serving_version("ctr") is None


def test_corrupt_pointer_file_is_an_artifact_error(reg: Registry) -> None:
    _publish(reg)
    path = reg.root / "ctr" / POINTER_FILE
    path.write_text("garbage")
    with pytest.raises(ArtifactError, match=rf'^{path}: expected {{"pinned": <version or null>}}'):
        reg.serving_version("ctr")
    path.write_text('{"pinned": "../../x"}')
    with pytest.raises(ArtifactError, match=r"pinned: expected a version, got '\.\./\.\./x'"):
        reg.pinned("ctr")


# --- pruning -------------------------------------------------------------------------------------


def test_prune_keeps_newest_pinned_and_bases(reg: Registry) -> None:
    _publish(reg, seed=0)  # v1: the day model
    for i in range(1, 6):  # v2..v6 descend from v1
        _publish(reg, seed=i, base="v00000001")
    reg.pin("ctr", "v00000003")
    removed = reg.prune("ctr", keep=2)
    assert removed == ["v00000002", "v00000004"]
    assert reg.versions("ctr") == ["v00000001", "v00000003", "v00000005", "v00000006"]
    assert not [p for p in (reg.root / "ctr").iterdir() if p.name.startswith(".")]
    assert _publish(reg, seed=9).version == "v00000007"
    with pytest.raises(ArtifactError, match=r"keep: expected an int >= 1, got 0"):
        reg.prune("ctr", keep=0)


# --- leftovers and storage errors ----------------------------------------------------------------


def _leftover(mdir: Path, name: str, age_s: float) -> Path:
    d = mdir / name
    d.mkdir(parents=True)
    (d / WEIGHTS_FILE).write_bytes(b"partial")
    then = time.time() - age_s
    for p in (d / WEIGHTS_FILE, d):
        os.utime(p, (then, then))
    return d


def test_opening_a_registry_removes_stale_leftovers_of_crashes(tmp_path: Path) -> None:
    root = tmp_path / "registry"
    _publish(Registry(root))
    stale = [
        _leftover(root / "ctr", ".tmp-crashed", 3600),
        _leftover(root / "ctr", ".trash-v00000009-abc", 3600),
        _leftover(root / "cvr", ".tmp-old", 3600),
    ]
    in_progress = _leftover(root / "ctr", ".tmp-publishing", 1)  # another publisher, now
    reg = Registry(root)
    assert [d.exists() for d in stale] == [False, False, False]
    assert in_progress.is_dir()
    assert reg.versions("ctr") == ["v00000001"]


def test_publish_and_prune_remove_stale_leftovers_too(reg: Registry) -> None:
    _publish(reg)
    old_tmp = _leftover(reg.root / "ctr", ".tmp-crashed", 3600)
    _publish(reg, seed=1)
    assert not old_tmp.exists()
    old_trash = _leftover(reg.root / "ctr", ".trash-v00000001-x", 3600)
    reg.prune("ctr", keep=5)
    assert not old_trash.exists()


def test_opening_a_missing_registry_creates_nothing(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "registry")
    assert not reg.root.exists()
    assert reg.versions("ctr") == []


def test_a_leftover_that_cannot_be_removed_does_not_stop_a_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "registry"
    _publish(Registry(root))
    stale = _leftover(root / "ctr", ".tmp-crashed", 3600)

    def read_only(path: object, *args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(shutil, "rmtree", read_only)
    with caplog.at_level(logging.WARNING):
        reg = Registry(root)
    assert stale.is_dir()
    assert f"cannot remove stale {stale}" in caplog.text
    assert "Read-only file system" in caplog.text
    assert reg.serving_version("ctr") == "v00000001"


def test_publishing_into_a_root_that_is_a_file_names_it(tmp_path: Path) -> None:
    root = tmp_path / "registry"
    root.write_text("")
    with pytest.raises(
        StorageError,
        match=rf"^registry folder of 'ctr' {root / 'ctr'}: expected a writable folder, got a file "
        r"where a parent folder should be",
    ):
        _publish(Registry(root))


def test_a_full_disk_during_publish_names_the_file_and_leaves_nothing(
    reg: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    _publish(reg)
    real_fsync = os.fsync

    def full(fd: int) -> None:
        if "/.tmp-" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(
        StorageError,
        match=r"/\.tmp-\w+/weights\.safetensors: expected to write \d+ bytes durably, got a full "
        r"file system \(ENOSPC",
    ):
        _publish(reg, seed=1)
    monkeypatch.undo()
    assert sorted(p.name for p in (reg.root / "ctr").iterdir()) == ["v00000001"]


def test_a_prune_on_a_read_only_file_system_names_the_version(
    reg: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(2):
        _publish(reg, seed=i)

    def read_only(src: object, dst: object) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, "rename", read_only)
    with pytest.raises(
        StorageError,
        match=rf"^{reg.root / 'ctr' / 'v00000001'}: expected to move it to \.trash-v00000001-\w+ "
        r"for removal, got a read-only file system \(EROFS",
    ):
        reg.prune("ctr", keep=1)
    monkeypatch.undo()
    assert reg.versions("ctr") == ["v00000001", "v00000002"]


def test_warm_start_version_carries_its_resume_state(reg: Registry) -> None:
    plain = _publish(reg, seed=1, mode="online")
    warm = _publish(
        reg,
        seed=2,
        mode="day",
        warm_start=True,
        resume={"training_state.bin": b"state-bytes"},
        resume_positions={0: 12, 3: 40},
    )
    assert (warm.mode, warm.warm_start, warm.resume_positions) == ("day", True, {"0": 12, "3": 40})
    assert reg.manifest("ctr", warm.version) == warm
    manifest, blobs = reg.load_resume("ctr", warm.version)
    assert manifest == warm
    assert blobs == {"training_state.bin": b"state-bytes"}
    assert reg.warm_start_versions("ctr") == [warm.version]
    # Serving reads the weights only; the resume files are not among the served files.
    assert set(reg.load("ctr", warm.version, expected_fingerprint=FP)[0].files) == {WEIGHTS_FILE}
    with pytest.raises(ArtifactError, match=r"resume: expected the trainer state .* got none"):
        reg.load_resume("ctr", plain.version)


def test_changed_resume_file_is_refused(reg: Registry) -> None:
    warm = _publish(reg, warm_start=True, resume={"training_state.bin": b"state-bytes"})
    path = reg.root / "ctr" / warm.version / "training_state.bin"
    path.write_bytes(b"state-bytez")
    with pytest.raises(ChecksumMismatchError, match=rf"^{path}: expected sha256 "):
        reg.load_resume("ctr", warm.version)


@pytest.mark.parametrize("name", [WEIGHTS_FILE, MANIFEST_FILE, "../x", ".hidden", "a/b"])
def test_resume_file_names_must_be_plain(reg: Registry, name: str) -> None:
    with pytest.raises(ArtifactError, match=r"resume: expected plain file names other than"):
        _publish(reg, resume={name: b"x"})
    assert reg.versions("ctr") == []
