"""The online pipeline on a small replay: checkpoints, restore, dead letters."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from pipeline_helpers import make_pipeline

from minutely.clock import MS_PER_HOUR
from minutely.config import Config
from minutely.data import decode_batch
from minutely.errors import CheckpointError
from minutely.registry import Registry
from minutely.schema import default_schema
from minutely.stream import SqliteLog, read_dead_letters

pytestmark = pytest.mark.integration

WINDOW = 300_000


def sample_keys(log: SqliteLog, topic: str) -> list[tuple[int, bool]]:
    schema = default_schema()
    keys: list[tuple[int, bool]] = []
    for p in range(log.partitions(topic)):
        for rec in log.read(topic, p, 0, 1_000_000):
            if not rec.value:
                continue  # a watermark message
            rb = decode_batch(rec.value, schema)
            keys += zip(
                rb.column("sample_id").to_pylist(),
                rb.column("is_correction").to_pylist(),
                strict=True,
            )
    return keys


def lineage(run_dir: Path) -> list[tuple[str, int, str | None, int]]:
    reg = Registry(run_dir / "registry")
    out = []
    for v in reg.versions("ctr"):
        m = reg.manifest("ctr", v)
        out.append((m.version, m.created_ms, m.parent, m.samples_seen))
    return out


def ticks(cfg: Config, n: int) -> list[int]:
    return [cfg.sim.start_ms + 3 * MS_PER_HOUR + (i + 1) * WINDOW for i in range(n)]


def warm_up(pipe: object, cfg: Config) -> None:
    for h in range(1, 4):
        pipe.tick(cfg.sim.start_ms + h * MS_PER_HOUR, train=False, export=False)  # type: ignore[attr-defined]


def test_crash_and_restore_loses_nothing_and_counts_nothing_twice(
    tmp_path: Path, small_cfg: Config
) -> None:
    n = 10
    ref, ref_log = make_pipeline(small_cfg, tmp_path / "ref", corrupt_every=97)
    warm_up(ref, small_cfg)
    ref_windows = [ref.tick(end).window for end in ticks(small_cfg, n)]
    ref_keys = sample_keys(ref_log, "samples.ctr")
    ref_seen = ref.trainer.samples_seen
    ref_dead = read_dead_letters(ref_log, "dead_letters")
    ref_versions = lineage(tmp_path / "ref")
    ref_events = ref.join.stats.events
    ref_state = {k: v.clone() for k, v in ref.model.state_dict().items()}
    ref_log.close()

    run = tmp_path / "crash"
    a, a_log = make_pipeline(small_cfg, run, corrupt_every=97)
    warm_up(a, small_cfg)  # 3 windows: checkpoint after the third
    for end in ticks(small_cfg, 5):
        a.tick(end)  # checkpoint after window 6; windows 7-8 are written, then a crash
    assert a.windows_done == 8
    a_log.close()

    b, b_log = make_pipeline(small_cfg, run, corrupt_every=97, resume=True)
    assert b.windows_done == 6
    windows = [b.tick(end).window for end in ticks(small_cfg, n)[3:]]
    # Tick for tick the same: each window trained on what the uninterrupted run trained on,
    # although the crashed run had already logged the samples of two later windows.
    assert [(w.n, w.auc) for w in windows if w] == [(w.n, w.auc) for w in ref_windows[3:] if w]
    assert sum(w.n for w in windows if w) > 0
    keys = sample_keys(b_log, "samples.ctr")
    assert len(keys) == len(set(keys)), "a sample was written twice"
    assert sorted(keys) == sorted(ref_keys)
    assert b.trainer.samples_seen == ref_seen
    assert read_dead_letters(b_log, "dead_letters") == ref_dead
    assert b.join.stats.dead_letters == ref.join.stats.dead_letters == len(ref_dead) > 0
    assert b.join.stats.events == ref_events
    # a version published after the checkpoint, before the crash, is adopted, not re-published
    assert lineage(run) == ref_versions
    assert len(ref_versions) >= 3
    for k, v in b.model.state_dict().items():
        torch.testing.assert_close(v, ref_state[k], msg=f"weights differ at {k}")
    b_log.close()


def test_malformed_events_go_to_dead_letters_and_lose_nothing(
    tmp_path: Path, small_cfg: Config
) -> None:
    clean, clean_log = make_pipeline(small_cfg, tmp_path / "clean")
    dirty, dirty_log = make_pipeline(small_cfg, tmp_path / "dirty", corrupt_every=50)
    for h in range(1, 3):
        end = small_cfg.sim.start_ms + h * MS_PER_HOUR
        clean.tick(end, train=False, export=False)
        dirty.tick(end, train=False, export=False)
    stats = dirty.join.stats
    assert dirty.source.corrupted > 10
    assert stats.dead_letters == dirty.source.corrupted
    assert set(stats.dead_letters_by_reason) >= {"invalid event", "undecodable event"}
    assert sample_keys(dirty_log, "samples.ctr") == sample_keys(clean_log, "samples.ctr")
    assert clean.join.stats.dead_letters == 0
    clean_log.close()
    dirty_log.close()


def test_resume_without_checkpoint_fails_naming_the_folder(
    tmp_path: Path, small_cfg: Config
) -> None:
    with pytest.raises(CheckpointError, match="resume: no checkpoint in"):
        make_pipeline(small_cfg, tmp_path, resume=True)


def test_online_learning_exports_versions_with_lineage(tmp_path: Path, small_cfg: Config) -> None:
    small_cfg = replace(small_cfg, export=replace(small_cfg.export, min_samples=1))
    pipe, log = make_pipeline(small_cfg, tmp_path)
    warm_up(pipe, small_cfg)
    exported = [r.exported for r in (pipe.tick(end) for end in ticks(small_cfg, 6))]
    versions = [m for m in exported if m is not None]
    assert len(versions) == 3  # every 10 event-time minutes
    assert versions[1].parent == versions[0].version
    reports = [w for w in pipe.learner.metrics.windows if w.n]
    assert reports
    assert versions[0].samples_seen < versions[1].samples_seen < versions[2].samples_seen
    assert all(0.0 <= w.auc <= 1.0 for w in reports if not np.isnan(w.auc))
    log.close()


def test_resume_from_a_checkpoint_without_pipeline_state_fails(
    tmp_path: Path, small_cfg: Config
) -> None:
    from minutely.model import build_model
    from minutely.train import Trainer, save_checkpoint

    model = build_model(small_cfg.model("ctr"), default_schema())
    save_checkpoint(tmp_path / "checkpoints", model, Trainer(model, small_cfg.train), {})
    with pytest.raises(CheckpointError, match=r"has no readable pipeline\.json"):
        make_pipeline(small_cfg, tmp_path, resume=True)


def test_resume_refuses_different_message_shaping_settings(
    tmp_path: Path, small_cfg: Config
) -> None:
    pipe, log = make_pipeline(small_cfg, tmp_path, corrupt_every=50)
    warm_up(pipe, small_cfg)
    log.close()
    with pytest.raises(CheckpointError, match="written with corrupt_every=50, this run has"):
        make_pipeline(small_cfg, tmp_path, corrupt_every=0, resume=True)
    other = replace(small_cfg, train=replace(small_cfg.train, batch_size=128))
    with pytest.raises(CheckpointError, match=r"written with train\.batch_size=256"):
        make_pipeline(other, tmp_path, corrupt_every=50, resume=True)


def test_resume_against_a_shorter_log_is_refused(tmp_path: Path, small_cfg: Config) -> None:
    pipe, log = make_pipeline(small_cfg, tmp_path)
    warm_up(pipe, small_cfg)
    log.close()
    (tmp_path / "log.sqlite").unlink()
    with pytest.raises(
        CheckpointError,
        match=r"the checkpoint expects partition \d to reach offset \d+ but the log ends at 0",
    ):
        make_pipeline(small_cfg, tmp_path, resume=True)


def test_resume_with_malformed_pipeline_state_is_refused(tmp_path: Path, small_cfg: Config) -> None:
    import json

    from minutely.model import build_model
    from minutely.train import Trainer, save_checkpoint

    model = build_model(small_cfg.model("ctr"), default_schema())
    pipe, log = make_pipeline(small_cfg, tmp_path)
    warm_up(pipe, small_cfg)
    log.close()
    for state, message in [
        (
            {"settings": pipe._settings(0), "now_ms": 5},
            r"has a malformed pipeline\.json \(KeyError",
        ),
        ({"now_ms": 5}, r"checkpoints records no settings \(got NoneType\)"),
    ]:
        save_checkpoint(
            tmp_path / "checkpoints",
            model,
            Trainer(model, small_cfg.train),
            {"pipeline.json": json.dumps(state).encode()},
        )
        with pytest.raises(CheckpointError, match=message):
            make_pipeline(small_cfg, tmp_path, resume=True)
