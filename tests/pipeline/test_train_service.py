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


def test_the_service_warm_starts_at_the_cut_and_rolls_back_when_the_stream_stalls(
    tmp_path: Path,
) -> None:
    from minutely.clock import ReplayClock
    from minutely.pipeline.monitor import read_events
    from minutely.registry import Registry

    cfg = load_config(
        None,
        {
            "stream": {"partitions": 2},
            "models": [{"name": "ctr", "buckets": 64, "embedding_dim": 2, "hidden": [4]}],
            "train": {"batch_size": 8, "checkpoint_every_windows": 100},
            "schedule": {"cadence": "hour"},
            "export": {"every_min": 5, "min_samples": 1, "min_trained_min": 0, "gate": False},
            "monitor": {"stall_timeout_s": 600},
        },
    )
    log = SqliteLog(tmp_path / "log.sqlite")
    log.create_topic("samples.ctr", 2)
    windows = 16  # 80 minutes: a cut at T0 + 1 h, then online versions
    for w in range(windows):
        for p in range(2):
            ids = range(100 * w + 10 * p, 100 * w + 10 * p + 5)
            log.append("samples.ctr", [batch(ids, T0 + w * W + 1)], p)
    for p in range(2):
        log.append("samples.ctr", [(None, b"", T0 + windows * W)], p)
    clock = ReplayClock(T0 + windows * W)
    run = tmp_path / "run"
    svc = TrainService(cfg, "ctr", run, log, clock=clock)
    for _ in range(windows):
        assert svc.step() is not None
    assert svc.next_end_ms == T0 + (windows + 1) * W
    registry = Registry(run / "registry")
    (warm,) = registry.warm_start_versions("ctr")
    assert registry.manifest("ctr", warm).created_ms == T0 + 3_600_000
    live = svc.loop.live
    assert live is not None
    assert live.version != warm
    assert registry.serving_version("ctr") == live.version
    progress = svc.loop.progress(clock.now_ms())
    assert progress["live_version"] == live.version
    assert progress["warm_version"] == warm
    assert progress["lag_s"] == 0.0  # the clock stands at the last window's end
    assert progress["live_version_age_s"] == (clock.now_ms() - live.created_ms) / 1e3 >= 0
    # Nothing more arrives: before the timeout no rollback, after it serving is rolled back.
    clock.advance(599_000)
    assert svc.step() is None
    assert registry.serving_version("ctr") == live.version
    clock.advance(2_000)
    assert svc.step() is None
    assert registry.serving_version("ctr") == warm
    (event,) = read_events(run / "events.jsonl")
    assert (event.kind, event.from_version, event.to_version) == ("stall", live.version, warm)
    assert event.evidence["stall_timeout_s"] == 600
    svc.close()
    log.close()
