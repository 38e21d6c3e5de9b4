"""The schedule, warm start, frozen hour-level features, gated export and rollback, end to end
on the in-process pipeline (small replays)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
from pipeline_helpers import SMALL, make_pipeline

from minutely.clock import MS_PER_HOUR
from minutely.config import Config, load_config, merge_tables
from minutely.model import model_groups
from minutely.model.artifact import load_model
from minutely.pipeline.model_loop import TRAINING_STATE, cuts_between
from minutely.pipeline.monitor import read_events
from minutely.registry import Registry
from minutely.stream import SqliteLog
from minutely.train import TrainingState

WINDOW = 300_000


def _cfg(**over: object) -> Config:
    return load_config(None, merge_tables(SMALL, dict(over)))


def _keys(tables: list[pa.Table]) -> Counter[tuple[int, bool]]:
    out: Counter[tuple[int, bool]] = Counter()
    for t in tables:
        ids = t["sample_id"].to_pylist()
        corr = t["is_correction"].to_pylist()
        out.update(zip(ids, corr, strict=True))
    return out


def _topic_keys(log: SqliteLog, topic: str, before_ms: int) -> Counter[tuple[int, bool]]:
    from minutely.data import decode_batch
    from minutely.schema import default_schema

    out: Counter[tuple[int, bool]] = Counter()
    for p in range(log.partitions(topic)):
        for r in log.read(topic, p, 0, 10**9):
            if r.value and r.ts_ms < before_ms:
                out.update(
                    _keys([pa.Table.from_batches([decode_batch(r.value, default_schema())])])
                )
    return out


def test_cuts_fall_at_the_configured_time_of_each_period() -> None:
    day = load_config(None, {"schedule": {"at_s": 7_200}})
    assert cuts_between(day, 0, 3 * 86_400_000) == [7_200_000, 93_600_000, 180_000_000]
    assert cuts_between(day, 7_200_000, 93_600_000) == [93_600_000]  # (start, end]
    hour = load_config(None, {"schedule": {"cadence": "hour", "at_s": 600}})
    assert cuts_between(hour, 0, 3_600_000) == [600_000]


def test_schedule_config_errors_name_the_field() -> None:
    with pytest.raises(Exception, match=r"'schedule.at_s': expected int < 3600 \(seconds into"):
        load_config(None, {"schedule": {"cadence": "hour", "at_s": 3_600}})
    with pytest.raises(Exception, match=r"'schedule.at_s': expected a multiple of train.window_s"):
        load_config(None, {"schedule": {"at_s": 100}})


def test_the_online_model_learns_every_sample_once_across_warm_starts(tmp_path: Path) -> None:
    """Batch slices up to the last cut plus online windows after it: every sample released
    before the end, each exactly once (no sample lost or repeated at a switch)."""
    cfg = _cfg(schedule={"cadence": "hour"})
    seen: dict[str, list[tuple[int, pa.Table]]] = {"batch": [], "online": []}
    pipe, log = make_pipeline(
        cfg,
        tmp_path,
        models=["ctr"],
        on_trained=lambda _name, kind, table: seen[kind].append((pipe.now_ms, table)),
    )
    start = cfg.sim.start_ms
    ends = list(range(start + WINDOW, start + 4 * MS_PER_HOUR + 2 * WINDOW + 1, WINDOW))
    results = [pipe.tick(end) for end in ends]
    cuts = [c.cut_ms for r in results for c in r.cuts.get("ctr", [])]
    assert cuts == [start + h * MS_PER_HOUR for h in range(1, 5)]
    last_cut = cuts[-1]
    loop = pipe.models["ctr"]
    assert loop.last_cut_ms == last_cut
    lineage = _keys([t for _, t in seen["batch"]]) + _keys(
        [t for at, t in seen["online"] if at >= last_cut]
    )
    expected = _topic_keys(log, "samples.ctr", ends[-1])
    assert sum(expected.values()) > 500
    assert lineage == expected  # every sample once: nothing lost, nothing twice
    # The online model restarted at the cut from the batch model's positions.
    assert loop.samples.positions() == {
        p: o for p, o in _positions_at(log, "samples.ctr", ends[-1]).items()
    }
    log.close()


def _positions_at(log: SqliteLog, topic: str, before_ms: int) -> dict[int, int]:
    out = {}
    for p in range(log.partitions(topic)):
        nxt = 0
        for r in log.read(topic, p, 0, 10**9):
            if r.ts_ms < before_ms:
                nxt = r.offset + 1
        out[p] = nxt
    return out


def test_warm_start_versions_are_marked_and_resume_the_batch_model(tmp_path: Path) -> None:
    cfg = _cfg(schedule={"cadence": "hour"})
    pipe, log = make_pipeline(cfg, tmp_path, models=["ctr"])
    start = cfg.sim.start_ms
    for end in range(start + WINDOW, start + 2 * MS_PER_HOUR + 1, WINDOW):
        pipe.tick(end)
    registry = Registry(tmp_path / "registry")
    warm = registry.warm_start_versions("ctr")
    assert len(warm) == 2
    manifest, blobs = registry.load_resume("ctr", warm[-1])
    assert manifest.mode == "hour"
    assert manifest.created_ms == start + 2 * MS_PER_HOUR
    state = TrainingState.from_bytes(blobs[TRAINING_STATE])
    loop = pipe.models["ctr"]
    batch = loop.batch_model.flat_state_dict()
    assert all(torch.equal(state.weights[k], batch[k]) for k in batch)
    assert {int(p): o for p, o in manifest.resume_positions.items()} == (
        loop.batch_samples.positions()
    )
    log.close()


@pytest.mark.slow
def test_hour_level_parameters_keep_the_day_models_values_through_an_online_day(
    tmp_path: Path,
) -> None:
    cfg = _cfg(
        schedule={"at_s": 7_200},
        export={"every_min": 30, "min_samples": 50, "min_trained_min": 0},
    )
    pipe, log = make_pipeline(cfg, tmp_path, models=["ctr"])
    start = cfg.sim.start_ms
    for h in range(1, 3):
        pipe.tick(start + h * MS_PER_HOUR, train=False, export=False)
    first_cut = start + 2 * MS_PER_HOUR
    out = pipe.cut(first_cut)["ctr"]
    loop = pipe.models["ctr"]
    day = {k: v.clone() for k, v in loop.model.flat_state_dict().items()}
    for end in range(first_cut + WINDOW, first_cut + 24 * MS_PER_HOUR - WINDOW + 1, WINDOW):
        pipe.tick(end)
    assert loop.last_cut_ms == first_cut  # no cut during the online day
    after = loop.model.flat_state_dict()
    hour_level = model_groups(loop.model)["hour_level"]
    assert hour_level  # the default schema has an hour-level dense feature
    _, served = load_model(Registry(tmp_path / "registry"), "ctr", out.version.version)
    for name in hour_level:
        assert torch.equal(after[name], day[name]), name
        assert torch.equal(after[name], served.flat_state_dict()[name]), name
    moved = [n for n in after if n not in hour_level and not torch.equal(after[n], day[n])]
    assert sorted(moved) == sorted(n for n in after if n not in hour_level)
    frozen = set(hour_level)
    for opt in loop.trainer.optimizer_state_dicts().values():
        names = {n for g in opt["param_groups"] for n in g.get("param_names", [])}
        assert names
        assert not names & frozen
    assert loop.exporter.state.exported >= 10
    log.close()


# -- rollback -------------------------------------------------------------------------------

ROLLBACK = {
    "sim": {"impressions_per_day": 200_000, "users": 20_000},
    "export": {"every_min": 10, "min_samples": 50, "min_trained_min": 0, "gate": False},
    "monitor": {"windows": 3, "min_positives": 50, "max_auc_drop": 0.05},
}


def _rollback_run(
    tmp_path: Path, corrupt: str | None
) -> tuple[list[int], dict[str, int], Path, int, int]:
    """A replay with an optional corruption of the online samples during one hour; the tick
    ends, the rollbacks by tick end, the run folder, and the corruption's start and end."""
    cfg = _cfg(**ROLLBACK)
    start = cfg.sim.start_ms
    first_cut = start + 2 * MS_PER_HOUR
    burst = (first_cut + MS_PER_HOUR, first_cut + MS_PER_HOUR + 30 * 60_000)
    rng = np.random.default_rng(0)

    def transform(_name: str, end_ms: int, table: pa.Table) -> pa.Table:
        if corrupt is None or not burst[0] < end_ms <= burst[1]:
            return table
        labels = table["label"].to_numpy(zero_copy_only=False).astype(bool)
        # A bias shift: a third of the negatives turn positive.
        new = ~labels if corrupt == "flip" else labels | (rng.random(len(labels)) < 0.33)
        i = table.schema.get_field_index("label")
        field = table.schema.field(i)
        return table.set_column(i, field, pa.array(new, field.type))

    pipe, log = make_pipeline(cfg, tmp_path, models=["ctr"], transform=transform)
    for h in range(1, 3):
        pipe.tick(start + h * MS_PER_HOUR, train=False, export=False)
    pipe.cut(first_cut)
    ends = list(range(first_cut + WINDOW, first_cut + 3 * MS_PER_HOUR + 1, WINDOW))
    rolled: dict[str, int] = {}
    for end in ends:
        out = pipe.tick(end).outcomes["ctr"]
        if out.rolled_back_to is not None:
            rolled[out.rolled_back_to] = end
            assert out.anomaly is not None
            loop = pipe.models["ctr"]
            # Serving points to the warm-start version, training restarted from its state.
            assert Registry(tmp_path / "registry").serving_version("ctr") == out.rolled_back_to
            assert loop.live is not None
            assert loop.live.version == out.rolled_back_to
    log.close()
    return ends, rolled, tmp_path, *burst


@pytest.mark.slow
@pytest.mark.parametrize("corrupt", ["flip", "bias"])
def test_a_corrupted_burst_is_rolled_back_within_one_export_interval(
    tmp_path: Path, corrupt: str
) -> None:
    _, rolled, run, burst_start, burst_end = _rollback_run(tmp_path, corrupt)
    events = read_events(run / "events.jsonl")
    assert events, "no rollback"
    first = events[0]
    # Flipped labels make nearly every sample positive, a shifted rate a third more: the live
    # version's PCOC on the matured labels leaves its band.
    assert first.kind == "pcoc"
    assert not 0.7 <= first.evidence["live_pcoc"] <= 1.4
    assert first.evidence["live_version"] == first.from_version
    assert first.to_version == Registry(run / "registry").warm_start_versions("ctr")[0]
    assert first.from_version != first.to_version
    # Within one export interval (10 minutes) of the corruption's start.
    assert burst_start < first.at_ms <= burst_start + 10 * 60_000
    assert all(e.at_ms <= burst_end + 10 * 60_000 for e in events)
    assert set(rolled) == {first.to_version}


@pytest.mark.slow
def test_a_clean_replay_is_never_rolled_back(tmp_path: Path) -> None:
    _, rolled, run, _, _ = _rollback_run(tmp_path, None)
    assert rolled == {}
    assert not (run / "events.jsonl").exists() or read_events(run / "events.jsonl") == []


@pytest.mark.slow
def test_the_online_versions_beat_the_day_model_over_a_drifting_day(tmp_path: Path) -> None:
    """The headline: through a day of drift, the versions the online loop published (each
    scoring the windows it was live for) rank the matured samples better than the day model
    they started from, and stay calibrated."""
    from minutely.evaluate import AUC, PCOC

    cfg = _cfg(
        sim={"impressions_per_day": 60_000, "users": 20_000, "campaigns_per_hour": 6},
        models=[{"name": "ctr", "buckets": 8192, "embedding_dim": 8, "hidden": [32]}],
        export={"every_min": 10, "min_samples": 50, "min_trained_min": 0},
    )
    scores: dict[str, list[np.ndarray]] = {"live": [], "day": [], "labels": []}
    held: dict[str, Any] = {}

    def record(name: str, _end_ms: int, table: pa.Table) -> pa.Table:
        loop = held["pipe"].models[name]
        if loop.warm is not None and table.num_rows:
            keep = ~table["is_correction"].to_numpy(zero_copy_only=False)
            batches = list(loop.samples.micro_batches(table.filter(pa.array(keep))))
            live = loop.live if loop.live is not None else loop.warm
            scores["live"] += [live.model.predict(b).numpy() for b in batches]
            scores["day"] += [held["day"].predict(b).numpy() for b in batches]
            scores["labels"] += [b.labels.numpy() for b in batches]
        return table

    pipe, log = make_pipeline(cfg, tmp_path, models=["ctr"], transform=record)
    held["pipe"] = pipe
    start = cfg.sim.start_ms
    for h in range(1, 25):
        pipe.tick(start + h * MS_PER_HOUR, train=False, export=False)
    pipe.cut(start + 24 * MS_PER_HOUR)
    held["day"] = pipe.models["ctr"].warm.model  # type: ignore[union-attr]
    online_start = start + 24 * MS_PER_HOUR
    for end in range(online_start + WINDOW, online_start + 24 * MS_PER_HOUR, WINDOW):
        pipe.tick(end)
    y = np.concatenate(scores["labels"]).astype(np.float64)
    auc, pcoc = {}, {}
    for who in ("live", "day"):
        p = np.concatenate(scores[who]).astype(np.float64)
        a, c = AUC(), PCOC()
        a.update(p, y)
        c.update(p, y)
        auc[who], pcoc[who] = a.get(), c.get()
    assert y.size > 50_000
    assert pipe.models["ctr"].exporter.state.exported > 100
    assert auc["live"] > auc["day"] + 0.01, auc
    assert 0.8 < pcoc["live"] < 1.25, pcoc
    log.close()
