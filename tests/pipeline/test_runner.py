"""The online pipeline on a small replay: every model, checkpoints, restore, dead letters."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from pipeline_helpers import SMALL, make_pipeline

from minutely.clock import MS_PER_HOUR
from minutely.config import Config, load_config
from minutely.data import decode_batch
from minutely.errors import CheckpointError, ConfigError
from minutely.model import build_model
from minutely.pipeline.model_loop import model_extras
from minutely.pipeline.runner import OnlinePipeline
from minutely.registry import Registry
from minutely.schema import default_schema
from minutely.stream import SqliteLog, read_dead_letters
from minutely.train import (
    Trainer,
    frozen_names,
    load_latest_checkpoint,
    make_loss,
    save_checkpoint,
)

pytestmark = pytest.mark.integration

WINDOW = 300_000
MODELS = ("ctr", "cvr")


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


def lineage(run_dir: Path, model: str) -> list[tuple[str, int, str | None, int]]:
    reg = Registry(run_dir / "registry")
    out = []
    for v in reg.versions(model):
        m = reg.manifest(model, v)
        out.append((m.version, m.created_ms, m.parent, m.samples_seen))
    return out


def ticks(cfg: Config, n: int) -> list[int]:
    return [cfg.sim.start_ms + 3 * MS_PER_HOUR + (i + 1) * WINDOW for i in range(n)]


def warm_up(pipe: OnlinePipeline, cfg: Config) -> None:
    for h in range(1, 4):
        pipe.tick(cfg.sim.start_ms + h * MS_PER_HOUR, train=False, export=False)


def window_figures(pipe: OnlinePipeline, ends: list[int]) -> dict[str, list[tuple[int, float]]]:
    """Per model, (samples, AUC) of every window the ticks to ``ends`` trained."""
    out: dict[str, list[tuple[int, float]]] = {name: [] for name in pipe.models}
    for end in ends:
        for name, w in pipe.tick(end).windows.items():
            out[name].append((w.n, w.auc))
    return out


def test_crash_and_restore_loses_nothing_and_counts_nothing_twice(
    tmp_path: Path, small_cfg: Config
) -> None:
    n = 10
    # few pCVR samples arrive in an hour: a low bar lets both models export
    small_cfg = replace(small_cfg, export=replace(small_cfg.export, min_samples=5))
    ref, ref_log = make_pipeline(small_cfg, tmp_path / "ref", corrupt_every=97)
    assert list(ref.models) == list(MODELS)
    warm_up(ref, small_cfg)
    ref_windows = window_figures(ref, ticks(small_cfg, 3))
    ref_later = window_figures(ref, ticks(small_cfg, n)[3:])
    ref_keys = {m: sample_keys(ref_log, f"samples.{m}") for m in MODELS}
    ref_seen = {m: st.trainer.samples_seen for m, st in ref.models.items()}
    ref_dead = read_dead_letters(ref_log, "dead_letters")
    ref_versions = {m: lineage(tmp_path / "ref", m) for m in MODELS}
    ref_events = ref.join.stats.events
    ref_state = {
        m: {k: v.clone() for k, v in st.model.state_dict().items()} for m, st in ref.models.items()
    }
    ref_log.close()
    assert all(sum(w for w, _ in ref_windows[m] + ref_later[m]) > 0 for m in MODELS)

    run = tmp_path / "crash"
    a, a_log = make_pipeline(small_cfg, run, corrupt_every=97)
    warm_up(a, small_cfg)  # 3 windows: checkpoint after the third
    for end in ticks(small_cfg, 5):
        a.tick(end)  # checkpoint after window 6; windows 7-8 are written, then a crash
    assert a.windows_done == 8
    a_log.close()

    b, b_log = make_pipeline(small_cfg, run, corrupt_every=97, resume=True)
    assert b.windows_done == 6
    # Tick for tick the same, for every model: each window trained on what the uninterrupted
    # run trained on, although the crashed run had already logged two later windows.
    assert window_figures(b, ticks(small_cfg, n)[3:]) == ref_later
    for m in MODELS:
        keys = sample_keys(b_log, f"samples.{m}")
        assert len(keys) == len(set(keys)), f"a {m} sample was written twice"
        assert sorted(keys) == sorted(ref_keys[m])
        assert b.models[m].trainer.samples_seen == ref_seen[m] > 0
        # a version published after the checkpoint, before the crash, is adopted, not
        # published again
        assert lineage(run, m) == ref_versions[m]
        for k, v in b.models[m].model.state_dict().items():
            torch.testing.assert_close(v, ref_state[m][k], msg=f"{m} weights differ at {k}")
    assert len(ref_versions["ctr"]) >= 3
    assert len(ref_versions["cvr"]) >= 2
    assert read_dead_letters(b_log, "dead_letters") == ref_dead
    assert b.join.stats.dead_letters == ref.join.stats.dead_letters == len(ref_dead) > 0
    assert b.join.stats.events == ref_events
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
    for m in MODELS:
        assert sample_keys(dirty_log, f"samples.{m}") == sample_keys(clean_log, f"samples.{m}")
    assert clean.join.stats.dead_letters == 0
    clean_log.close()
    dirty_log.close()


def test_resume_without_checkpoint_fails_naming_the_folder(
    tmp_path: Path, small_cfg: Config
) -> None:
    with pytest.raises(CheckpointError, match="resume: no checkpoint in"):
        make_pipeline(small_cfg, tmp_path, resume=True)


def test_online_learning_exports_versions_of_every_model_with_lineage(
    tmp_path: Path, small_cfg: Config
) -> None:
    small_cfg = replace(small_cfg, export=replace(small_cfg.export, min_samples=1))
    pipe, log = make_pipeline(small_cfg, tmp_path)
    warm_up(pipe, small_cfg)
    results = [pipe.tick(end) for end in ticks(small_cfg, 8)]
    for m in MODELS:
        versions = [r.exported[m] for r in results if m in r.exported]
        assert len(versions) >= 3, m
        # Every 10 event-time minutes at most, each once a new sample was trained on.
        times = [v.created_ms for v in versions]
        assert all(b - a >= 10 * 60_000 for a, b in itertools.pairwise(times))
        for older, newer in itertools.pairwise(versions):
            assert newer.parent == older.version
            assert newer.samples_seen > older.samples_seen
        reports = [w for w in pipe.models[m].learner.metrics.windows if w.n]
        assert reports
        assert all(0.0 <= w.auc <= 1.0 for w in reports if not np.isnan(w.auc))
    log.close()


def test_the_pipeline_trains_only_the_models_it_is_given(tmp_path: Path, small_cfg: Config) -> None:
    pipe, log = make_pipeline(small_cfg, tmp_path, models=["cvr"])
    warm_up(pipe, small_cfg)
    windows = [pipe.tick(end).windows for end in ticks(small_cfg, 2)]
    assert list(pipe.models) == ["cvr"]
    assert all(set(w) == {"cvr"} for w in windows)
    assert set(pipe.join.stats.samples) == {"cvr"}
    assert pipe.models["cvr"].trainer.samples_seen > 0
    log.close()


def test_each_model_trains_with_its_configured_loss(tmp_path: Path) -> None:
    models = [dict(SMALL["models"][0], loss="bce"), dict(SMALL["models"][1], loss="pu")]
    cfg = load_config(None, {**SMALL, "models": models})
    pipe, log = make_pipeline(cfg, tmp_path)
    for m in MODELS:
        assert type(pipe.models[m].trainer.loss) is type(make_loss(cfg.model(m).loss))
    assert type(pipe.models["ctr"].trainer.loss) is not type(pipe.models["cvr"].trainer.loss)
    log.close()


def test_model_names_the_config_lacks_or_repeats_are_refused(
    tmp_path: Path, small_cfg: Config
) -> None:
    with pytest.raises(ConfigError, match=r"'models': expected a model named one of"):
        make_pipeline(small_cfg, tmp_path / "a", models=["ctr", "nope"])
    with pytest.raises(ValueError, match=r"expected distinct model names, got \['ctr', 'ctr'\]"):
        make_pipeline(small_cfg, tmp_path / "b", models=["ctr", "ctr"])
    with pytest.raises(ValueError, match="expected at least one model name, got none"):
        make_pipeline(small_cfg, tmp_path / "c", models=[])


def test_resume_from_a_checkpoint_without_pipeline_state_fails(
    tmp_path: Path, small_cfg: Config
) -> None:
    model = build_model(small_cfg.model("ctr"), default_schema())
    trainer = Trainer(model, small_cfg.train, frozen=frozen_names(model))
    save_checkpoint(tmp_path / "checkpoints", model, trainer, {})
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
    with pytest.raises(
        CheckpointError,
        match=r"written with pipeline\.models=\['ctr', 'cvr'\], this run has "
        r"pipeline\.models=\['ctr'\]",
    ):
        make_pipeline(small_cfg, tmp_path, corrupt_every=50, resume=True, models=["ctr"])


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
        (
            {"settings": pipe._settings(0), "now_ms": 5, "windows_done": 1},
            r"expected the state of model 'cvr', got no model\.cvr\.weights\.safetensors",
        ),
    ]:
        save_checkpoint(
            tmp_path / "checkpoints",
            model,
            Trainer(model, small_cfg.train, frozen=frozen_names(model)),
            {"pipeline.json": json.dumps(state).encode()},
        )
        with pytest.raises(CheckpointError, match=message):
            make_pipeline(small_cfg, tmp_path, resume=True)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("wider", r"the state of model 'cvr' does not fit it \(.*expected shape \[4096, 5\], got"),
        ("garbled", r"the state of model 'cvr' is unreadable"),
    ],
)
def test_resume_refuses_a_model_state_that_is_unreadable_or_does_not_fit(
    tmp_path: Path, small_cfg: Config, damage: str, message: str
) -> None:
    pipe, log = make_pipeline(small_cfg, tmp_path)
    warm_up(pipe, small_cfg)  # a checkpoint after the third window
    log.close()
    ctr = pipe.models["ctr"]
    extras = load_latest_checkpoint(tmp_path / "checkpoints", ctr.model, ctr.trainer)
    assert extras is not None
    wide = build_model(replace(small_cfg.model("cvr"), embedding_dim=8), default_schema())
    extras.update(
        model_extras("cvr", wide, Trainer(wide, small_cfg.train, frozen=frozen_names(wide)))
    )
    if damage == "garbled":
        extras["model.cvr.weights.safetensors"] = b"not safetensors"
    save_checkpoint(tmp_path / "checkpoints", ctr.model, ctr.trainer, extras)
    with pytest.raises(CheckpointError, match=message):
        make_pipeline(small_cfg, tmp_path, resume=True)
