"""Checkpoints: exact resume, atomicity under crashes, retention, and every refusal."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from minutely.config import ModelConfig, TrainConfig
from minutely.data.tensors import TensorBatch
from minutely.errors import CheckpointError, StorageError
from minutely.model import CtrModel, build_model, synthetic_batch
from minutely.schema import FeatureSpec, Schema, default_schema
from minutely.train import (
    Trainer,
    checkpoint_tensors,
    latest_checkpoint,
    load_checkpoint,
    load_latest_checkpoint,
    save_checkpoint,
)

SCHEMA = default_schema()
BUCKETS = 256


def setup(seed: int = 0, arch: str = "deepfm", buckets: int = BUCKETS) -> tuple[CtrModel, Trainer]:
    torch.manual_seed(seed)
    model = build_model(
        ModelConfig(arch=arch, buckets=buckets, embedding_dim=4, hidden=(8,)), SCHEMA
    )
    return model, Trainer(model, TrainConfig())


def batch(k: int) -> TensorBatch:
    return synthetic_batch(SCHEMA, 64, buckets=BUCKETS, seed=k, vocab=50)


def rewrite(path: Path, name: str, data: bytes) -> None:
    """Replace a file of a checkpoint and fix its manifest entry (a consistent forgery)."""
    (path / name).write_bytes(data)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_resume_from_a_checkpoint_continues_exactly_like_an_uninterrupted_trainer(
    tmp_path: Path,
) -> None:
    model, trainer = setup(seed=0)
    for k in range(5):
        trainer.train_step(batch(k))
    save_checkpoint(tmp_path, model, trainer, {"offsets": b'{"0": 5}', "join": b"\x00\x01"})
    uninterrupted = [trainer.evaluate_then_train(batch(k)) for k in range(5, 10)]

    resumed_model, resumed = setup(seed=1)  # different init: everything must come from disk
    extras = load_latest_checkpoint(tmp_path, resumed_model, resumed)
    assert extras == {"offsets": b'{"0": 5}', "join": b"\x00\x01"}
    assert (resumed.steps, resumed.samples_seen) == (5, 5 * 64)
    replayed = [resumed.evaluate_then_train(batch(k)) for k in range(5, 10)]
    for a, b in zip(uninterrupted, replayed, strict=True):
        np.testing.assert_array_equal(a, b)
    assert resumed.state() == trainer.state()


def test_no_checkpoint_gives_none(tmp_path: Path) -> None:
    model, trainer = setup()
    assert load_latest_checkpoint(tmp_path / "missing", model, trainer) is None
    assert load_latest_checkpoint(tmp_path, model, trainer) is None


def test_sequence_numbers_grow_and_only_the_last_k_are_kept(tmp_path: Path) -> None:
    model, trainer = setup()
    paths = [save_checkpoint(tmp_path, model, trainer, keep=2) for _ in range(4)]
    assert [p.name for p in paths] == [f"ckpt-0000000{i}" for i in range(1, 5)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "LATEST",
        "ckpt-00000003",
        "ckpt-00000004",
    ]
    assert (tmp_path / "LATEST").read_text() == "ckpt-00000004\n"
    assert latest_checkpoint(tmp_path) == paths[-1]


def test_an_exception_before_the_rename_leaves_the_previous_checkpoint_latest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, trainer = setup()
    first = save_checkpoint(tmp_path, model, trainer, {"n": b"1"})
    trainer.train_step(batch(0))

    def fail(*args: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "rename", fail)
    with pytest.raises(OSError, match="disk gone"):
        save_checkpoint(tmp_path, model, trainer, {"n": b"2"})
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "ckpt-00000001"]
    fresh_model, fresh = setup(seed=3)
    assert load_latest_checkpoint(tmp_path, fresh_model, fresh) == {"n": b"1"}
    assert fresh.steps == 0


def test_a_crash_after_the_rename_but_before_latest_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, trainer = setup()
    first = save_checkpoint(tmp_path, model, trainer, {"n": b"1"})

    def fail(*args: object) -> None:
        raise OSError("crash")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="crash"):
        save_checkpoint(tmp_path, model, trainer, {"n": b"2"})
    monkeypatch.undo()
    assert (tmp_path / "ckpt-00000002").is_dir()  # complete, but never committed
    assert latest_checkpoint(tmp_path) == first
    assert save_checkpoint(tmp_path, model, trainer).name == "ckpt-00000003"


CRASHING_SAVE = textwrap.dedent(
    """
    import os, sys, torch
    from pathlib import Path
    from minutely.config import ModelConfig, TrainConfig
    from minutely.model import build_model
    from minutely.schema import default_schema
    from minutely.train import Trainer, save_checkpoint

    torch.set_num_threads(1)
    model = build_model(ModelConfig(arch="lr", buckets=64), default_schema())
    trainer = Trainer(model, TrainConfig())
    root = Path(sys.argv[1])
    save_checkpoint(root, model, trainer, {"n": b"1"})
    os.rename = lambda *a: os._exit(3)  # the process dies between writing and renaming
    save_checkpoint(root, model, trainer, {"n": b"2"})
    """
)


def test_a_killed_process_leaves_the_previous_checkpoint_latest(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", CRASHING_SAVE, str(tmp_path)], capture_output=True, timeout=120
    )
    assert proc.returncode == 3, proc.stderr.decode()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-ckpt-")]
    assert len(leftovers) == 1
    # Complete, but never renamed: not a checkpoint.
    assert (tmp_path / "LATEST").read_text() == "ckpt-00000001\n"
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="lr", buckets=64), SCHEMA)
    trainer = Trainer(model, TrainConfig())
    assert load_latest_checkpoint(tmp_path, model, trainer) == {"n": b"1"}
    assert save_checkpoint(tmp_path, model, trainer).name == "ckpt-00000002"
    assert not any(p.name.startswith(".tmp-ckpt-") for p in tmp_path.iterdir())


def test_a_directory_without_manifest_is_a_partial_checkpoint(tmp_path: Path) -> None:
    model, trainer = setup()
    path = save_checkpoint(tmp_path, model, trainer)
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"ckpt-00000001: no manifest.json \(a partially"):
        load_checkpoint(path, model, trainer)
    with pytest.raises(CheckpointError, match=r"missing: expected a directory"):
        load_checkpoint(tmp_path / "missing", model, trainer)


def test_a_corrupted_file_fails_its_checksum(tmp_path: Path) -> None:
    model, trainer = setup()
    path = save_checkpoint(tmp_path, model, trainer)
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(
        CheckpointError, match=r"ckpt-00000001: file 'model.safetensors': expected sha256 [0-9a-f]+"
    ):
        load_latest_checkpoint(tmp_path, model, trainer)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    model, trainer = setup()
    path = save_checkpoint(tmp_path, model, trainer)
    (path / "optim.sparse.pt").unlink()
    with pytest.raises(CheckpointError, match=r"file 'optim.sparse.pt' is missing"):
        load_checkpoint(path, model, trainer)


def test_weights_of_another_shape_are_refused_and_nothing_changes(tmp_path: Path) -> None:
    model, trainer = setup(buckets=BUCKETS)
    trainer.train_step(batch(0))
    save_checkpoint(tmp_path, model, trainer)
    other_model, other = setup(buckets=2 * BUCKETS)
    before = {k: v.clone() for k, v in other_model.flat_state_dict().items()}
    with pytest.raises(
        CheckpointError,
        match=r"key 'embeddings.user_id.weight': expected shape \[512, 5\], got \[256, 5\]",
    ):
        load_latest_checkpoint(tmp_path, other_model, other)
    after = other_model.flat_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert other.steps == 0


def test_weights_with_other_keys_are_refused(tmp_path: Path) -> None:
    model, trainer = setup()
    save_checkpoint(tmp_path, model, trainer)
    torch.manual_seed(0)
    deeper = build_model(ModelConfig(buckets=BUCKETS, embedding_dim=4, hidden=(8, 4)), SCHEMA)
    with pytest.raises(CheckpointError, match=r"missing \['mlp.hidden.0.bias'"):
        load_latest_checkpoint(tmp_path, deeper, Trainer(deeper, TrainConfig()))


def test_a_checkpoint_of_another_architecture_or_schema_is_refused(tmp_path: Path) -> None:
    model, trainer = setup()
    save_checkpoint(tmp_path, model, trainer)
    lr_model, lr_trainer = setup(arch="lr")
    with pytest.raises(CheckpointError, match=r"expected a lr model on schema \w+, got deepfm"):
        load_latest_checkpoint(tmp_path, lr_model, lr_trainer)
    small = Schema(features=(FeatureSpec("a", "sparse"),))
    other = build_model(ModelConfig(buckets=BUCKETS, embedding_dim=4, hidden=(8,)), small)
    with pytest.raises(CheckpointError, match=f"on schema {small.fingerprint()}, got deepfm"):
        load_latest_checkpoint(tmp_path, other, Trainer(other, TrainConfig()))


def test_optimizer_files_never_unpickle_arbitrary_objects(tmp_path: Path) -> None:
    model, trainer = setup()
    path = save_checkpoint(tmp_path, model, trainer)
    buf = io.BytesIO()
    torch.save({"state": {}, "param_groups": [], "evil": Path("/")}, buf)
    rewrite(path, "optim.dense.pt", buf.getvalue())
    with pytest.raises(CheckpointError, match=r"ckpt-00000001: unreadable content \(.*Weights"):
        load_checkpoint(path, model, trainer)


def test_an_optimizer_state_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    model, trainer = setup()
    path = save_checkpoint(tmp_path, model, trainer)
    _, lr_trainer = setup(arch="lr")
    buf = io.BytesIO()
    torch.save(lr_trainer.optimizer_state_dicts()["dense"], buf)
    rewrite(path, "optim.dense.pt", buf.getvalue())
    with pytest.raises(CheckpointError, match=r"ckpt-00000001: optimizer 'dense' state: expected"):
        load_checkpoint(path, model, trainer)


def test_a_malformed_manifest_is_refused(tmp_path: Path) -> None:
    model, trainer = setup()
    path = save_checkpoint(tmp_path, model, trainer)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"malformed manifest.json"):
        load_checkpoint(path, model, trainer)
    (path / "manifest.json").write_text(
        json.dumps(
            {
                "format": 99,
                "arch": "deepfm",
                "schema_fingerprint": "x",
                "optimizers": [],
                "extras": [],
                "files": {},
            }
        )
    )
    with pytest.raises(
        CheckpointError, match=r"expected a manifest.json of format 1, got format 99"
    ):
        load_checkpoint(path, model, trainer)


def test_a_bad_latest_pointer_is_refused(tmp_path: Path) -> None:
    model, trainer = setup()
    save_checkpoint(tmp_path, model, trainer)
    (tmp_path / "LATEST").write_text("../../etc\n")
    with pytest.raises(CheckpointError, match=r"LATEST: expected a name like 'ckpt-00000001'"):
        latest_checkpoint(tmp_path)
    (tmp_path / "LATEST").write_text("ckpt-00000009\n")
    with pytest.raises(CheckpointError, match=r"LATEST: names 'ckpt-00000009', which does not"):
        latest_checkpoint(tmp_path)


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    model, trainer = setup()
    with pytest.raises(ValueError, match=r"expected extra names .* got \['../x'\]"):
        save_checkpoint(tmp_path, model, trainer, {"../x": b""})
    with pytest.raises(ValueError, match=r"expected keep >= 1, got 0"):
        save_checkpoint(tmp_path, model, trainer, keep=0)
    with pytest.raises(ValueError, match=r"expected bytes as extra values, got \{'a': 'str'\}"):
        save_checkpoint(tmp_path, model, trainer, {"a": "text"})  # type: ignore[dict-item]
    assert not (tmp_path / "LATEST").exists()


def test_checkpoint_tensors_reads_verified_weights(tmp_path: Path) -> None:
    model, trainer = setup()
    trainer.train_step(batch(0))
    path = save_checkpoint(tmp_path, model, trainer)
    tensors = checkpoint_tensors(path)
    own = model.flat_state_dict()
    assert set(tensors) == set(own)
    assert all(torch.equal(tensors[k], own[k]) for k in own)


# -- falling back to the newest valid checkpoint -----------------------------------------


def three_checkpoints(root: Path) -> list[Path]:
    """Checkpoints 1..3 of one trainer, one step apart; extra ``n`` holds the step count."""
    model, trainer = setup()
    paths = []
    for k in range(3):
        trainer.train_step(batch(k))
        paths.append(save_checkpoint(root, model, trainer, {"n": str(trainer.steps).encode()}))
    return paths


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate_manifest(path: Path) -> None:
    manifest = path / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:40])


CORRUPTIONS: dict[str, tuple[Callable[[Path], object], str]] = {
    "a file deleted": (
        lambda p: (p / "optim.dense.pt").unlink(),
        r"file 'optim\.dense\.pt' is missing",
    ),
    "a file's bytes changed": (
        lambda p: flip_last_byte(p / "model.safetensors"),
        r"file 'model\.safetensors': expected sha256",
    ),
    "a truncated manifest": (truncate_manifest, r"malformed manifest\.json"),
    "LATEST naming a missing folder": (
        lambda p: shutil.rmtree(p),
        r"LATEST: names 'ckpt-00000003', which does not exist",
    ),
}


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    paths = three_checkpoints(tmp_path)
    corrupt, reason = CORRUPTIONS[how]
    corrupt(paths[-1])
    model, trainer = setup(seed=5)
    with caplog.at_level(logging.WARNING, logger="minutely.checkpoint"):
        extras = load_latest_checkpoint(tmp_path, model, trainer)
    assert extras == {"n": b"2"}
    assert trainer.steps == 2
    warnings = [r for r in caplog.records if r.name == "minutely.checkpoint"]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    message = warnings[0].getMessage()
    assert re.search(rf"^skipped checkpoint\(s\) in {tmp_path}: .*{reason}", message)
    assert "ckpt-00000003" in message
    assert message.endswith(f"; loaded {paths[1]} instead")


def test_the_fallback_reaches_past_several_corrupt_checkpoints(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    paths = three_checkpoints(tmp_path)
    flip_last_byte(paths[2] / "trainer.json")
    (paths[1] / "manifest.json").unlink()
    model, trainer = setup(seed=5)
    with caplog.at_level(logging.WARNING, logger="minutely.checkpoint"):
        assert load_latest_checkpoint(tmp_path, model, trainer) == {"n": b"1"}
    text = caplog.text
    assert "ckpt-00000003: file 'trainer.json': expected sha256" in text
    assert "ckpt-00000002: no manifest.json" in text


def test_a_garbled_latest_pointer_falls_back_to_the_newest_valid_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    three_checkpoints(tmp_path)
    (tmp_path / "LATEST").write_text("ckpt-000")  # cut short
    model, trainer = setup(seed=5)
    with caplog.at_level(logging.WARNING, logger="minutely.checkpoint"):
        assert load_latest_checkpoint(tmp_path, model, trainer) == {"n": b"3"}
    assert "LATEST: expected a name like 'ckpt-00000001', got 'ckpt-000'" in caplog.text


def test_a_checkpoint_never_committed_by_latest_is_not_a_fallback(tmp_path: Path) -> None:
    paths = three_checkpoints(tmp_path)
    (tmp_path / "LATEST").write_text("ckpt-00000002\n")  # as if the third save died before it
    flip_last_byte(paths[1] / "model.safetensors")
    model, trainer = setup(seed=5)
    assert load_latest_checkpoint(tmp_path, model, trainer) == {"n": b"1"}


def test_no_valid_checkpoint_names_the_directory_and_every_reason(tmp_path: Path) -> None:
    paths = three_checkpoints(tmp_path)
    for p in paths:
        flip_last_byte(p / "model.safetensors")
    model, trainer = setup(seed=5)
    before = {k: v.clone() for k, v in model.flat_state_dict().items()}
    with pytest.raises(
        CheckpointError,
        match=rf"^checkpoint directory {tmp_path}: expected a valid checkpoint, got none of 3 "
        r"\(ckpt-00000003: .*expected sha256 .*; ckpt-00000002: .*; ckpt-00000001: .*\)",
    ):
        load_latest_checkpoint(tmp_path, model, trainer)
    assert all(torch.equal(before[k], v) for k, v in model.flat_state_dict().items())
    assert trainer.steps == 0


def test_latest_naming_a_missing_folder_with_nothing_else_is_refused(tmp_path: Path) -> None:
    model, trainer = setup()
    shutil.rmtree(save_checkpoint(tmp_path, model, trainer))
    with pytest.raises(
        CheckpointError,
        match=rf"^checkpoint directory {tmp_path}: expected a valid checkpoint, got none of 0 "
        r"\(LATEST: names 'ckpt-00000001', which does not exist\)",
    ):
        load_latest_checkpoint(tmp_path, model, trainer)


def test_a_valid_checkpoint_that_does_not_fit_the_model_is_refused_not_skipped(
    tmp_path: Path,
) -> None:
    three_checkpoints(tmp_path)
    lr_model, lr_trainer = setup(arch="lr")
    with pytest.raises(CheckpointError, match=r"ckpt-00000003: expected a lr model on schema"):
        load_latest_checkpoint(tmp_path, lr_model, lr_trainer)


def test_three_checkpoints_are_kept_by_default_for_the_fallback(tmp_path: Path) -> None:
    model, trainer = setup()
    for _ in range(5):
        save_checkpoint(tmp_path, model, trainer)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == [
        "ckpt-00000003",
        "ckpt-00000004",
        "ckpt-00000005",
    ]


# -- leftovers and storage errors --------------------------------------------------------


def test_loading_removes_stale_temporary_folders_but_not_fresh_ones(tmp_path: Path) -> None:
    model, trainer = setup()
    save_checkpoint(tmp_path, model, trainer, {"n": b"1"})
    stale = tmp_path / ".tmp-ckpt-crashed"
    fresh = tmp_path / ".tmp-ckpt-writing"
    for d in (stale, fresh):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    then = time.time() - 3600
    for p in (stale / "model.safetensors", stale):
        os.utime(p, (then, then))
    assert load_latest_checkpoint(tmp_path, model, trainer) == {"n": b"1"}
    assert not stale.exists()
    assert fresh.is_dir()


def test_a_checkpoint_directory_that_is_a_file_is_a_storage_error(tmp_path: Path) -> None:
    model, trainer = setup()
    target = tmp_path / "checkpoints"
    target.write_text("")
    with pytest.raises(
        StorageError, match=rf"^checkpoint folder {target}: expected a writable folder, got a file"
    ):
        save_checkpoint(target, model, trainer)


def test_loading_from_a_checkpoint_directory_that_is_a_file_names_it(tmp_path: Path) -> None:
    model, trainer = setup()
    target = tmp_path / "checkpoints"
    target.write_text("")
    with pytest.raises(
        CheckpointError,
        match=rf"^checkpoint directory {target}: expected a folder, got a file in the way",
    ):
        load_latest_checkpoint(target, model, trainer)


def test_a_full_disk_during_a_save_names_the_file_and_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, trainer = setup()
    first = save_checkpoint(tmp_path, model, trainer, {"n": b"1"})
    real_fsync = os.fsync

    def full(fd: int) -> None:
        # Delayed allocation: a full disk often shows only when the data is flushed.
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(tmp_path / ".tmp-ckpt-")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(
        StorageError, match=r"\.tmp-ckpt-\w+/model\.safetensors: expected to write \d+ bytes"
    ):
        save_checkpoint(tmp_path, model, trainer, {"n": b"2"})
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "ckpt-00000001"]
