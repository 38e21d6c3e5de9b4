"""The train service: windows cut by the join's stamps, a bad message is a dead letter once,
a resume refuses other settings and trains the same windows again."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from minutely.config import Config, load_config
from minutely.data import encode_batch, samples_to_record_batch
from minutely.data.samples import Sample
from minutely.errors import CheckpointError
from minutely.pipeline.train_service import TrainService, read_audit
from minutely.schema import default_schema
from minutely.stream import SqliteLog, read_dead_letters

W = 300_000
T0 = 1_767_225_600_000


def cfg_small() -> Config:
    return load_config(
        None,
        {
            "stream": {"partitions": 2},
            "models": [{"name": "ctr", "buckets": 64, "embedding_dim": 2, "hidden": [4]}],
            "train": {"batch_size": 8, "checkpoint_every_windows": 100},
            "export": {"min_samples": 1},
        },
    )


def batch(ids: range, stamp: int) -> tuple[None, bytes, int]:
    feats = {
        f.name: (3 if f.kind == "sparse" else [1] if f.kind == "multi_sparse" else 0.5)
        for f in default_schema().features
    }
    samples = [Sample(i, stamp - 1, stamp - 1, i % 2, False, -1, feats) for i in ids]
    return (None, encode_batch(samples_to_record_batch(samples, default_schema())), stamp)


def fill(log: SqliteLog) -> None:
    log.create_topic("samples.ctr", 2)
    for w in range(3):  # three windows of samples in each partition, then a marker past them
        for p in range(2):
            log.append(
                "samples.ctr",
                [batch(range(100 * w + 10 * p, 100 * w + 10 * p + 5), T0 + w * W + 1)],
                p,
            )
    log.append("samples.ctr", [(None, b"not arrow", T0 + W + 2)], 0)
    for p in range(2):
        log.append("samples.ctr", [(None, b"", T0 + 3 * W)], p)


def test_a_bad_message_is_a_dead_letter_once_and_training_goes_on(tmp_path: Path) -> None:
    cfg = cfg_small()
    log = SqliteLog(tmp_path / "log.sqlite")
    fill(log)
    for _ in range(2):  # the second run has no checkpoint: it trains all again, writes no letter
        svc = TrainService(cfg, "ctr", tmp_path / "run", log)
        windows = 0
        while svc.step() is not None:
            windows += 1
        assert windows == 3
        assert svc.trainer.samples_seen == 30
        svc.close()
    letters = read_dead_letters(log, "dead_letters")
    assert len(letters) == 1
    assert letters[0].reason.startswith("undecodable samples: sample batch: expected an Arrow IPC")
    assert letters[0].source == "samples.ctr/0@3"
    assert letters[0].payload == b"not arrow"
    log.close()


def test_a_resume_trains_the_same_windows_and_prunes_the_audit(tmp_path: Path) -> None:
    cfg = cfg_small()
    log = SqliteLog(tmp_path / "log.sqlite")
    fill(log)
    run = tmp_path / "run"
    svc = TrainService(cfg, "ctr", run, log, audit_dir=run / "audit")
    svc.step()
    svc.checkpoint()
    svc.step()  # trained and audited, then the process dies before the next checkpoint
    assert len(list((run / "audit").glob("*.npz"))) == 2
    svc.close()
    again = TrainService(cfg, "ctr", run, log, audit_dir=run / "audit")
    assert len(list((run / "audit").glob("*.npz"))) == 1
    while again.step() is not None:
        pass
    trained = read_audit(run / "audit")
    assert sorted(s for s, _, _ in trained) == sorted(
        i for w in range(3) for p in range(2) for i in range(100 * w + 10 * p, 100 * w + 10 * p + 5)
    )
    again.checkpoint()
    again.close()
    other = replace(cfg, train=replace(cfg.train, lr=0.5))
    with pytest.raises(
        CheckpointError, match=r"was written with train\.lr=0\.001, this run has train\.lr=0\.5"
    ):
        TrainService(other, "ctr", run, log)
    log.close()
