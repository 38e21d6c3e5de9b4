from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from minutely.clock import MS_PER_HOUR, ReplayClock
from minutely.config import Config, load_config
from minutely.errors import CheckpointError
from minutely.pipeline.join_stage import JoinStage
from minutely.pipeline.source import SimSource, corrupt
from minutely.schema import default_schema
from minutely.sim import Market
from minutely.stream import SqliteLog, read_dead_letters

WINDOW_MS = 300_000


def stage(cfg: Config, log: SqliteLog, state: dict[str, Any] | None = None) -> JoinStage:
    clock = ReplayClock(cfg.sim.start_ms + MS_PER_HOUR)
    return JoinStage.from_config(log, cfg, default_schema(), clock, state)


@pytest.fixture
def primed(tmp_path: Path, small_cfg: Config) -> tuple[SqliteLog, dict[str, Any]]:
    log = SqliteLog(tmp_path / "log.sqlite")
    js = stage(small_cfg, log)
    source = SimSource(Market(small_cfg.sim), log, small_cfg.stream.raw_topic, corrupt_every=40)
    source.produce(small_cfg.sim.start_ms, small_cfg.sim.start_ms + MS_PER_HOUR)
    js.run()
    js.advance_to(small_cfg.sim.start_ms + MS_PER_HOUR)
    assert js.stats.samples["ctr"] > 0
    assert js.stats.dead_letters == source.corrupted
    assert len(read_dead_letters(log, "dead_letters")) == source.corrupted
    return log, js.snapshot()


def test_snapshot_restores_counts(
    primed: tuple[SqliteLog, dict[str, Any]], small_cfg: Config
) -> None:
    log, state = primed
    again = stage(small_cfg, log, state)
    parts = state["partitions"]
    assert again.stats.samples == {
        m: sum(p["stats"]["samples"][m] for p in parts) for m in ("ctr", "cvr")
    }
    assert again.stats.dead_letters == sum(sum(p["dead_letter_counts"].values()) for p in parts)
    assert again.stats.dead_letters > 0


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s.update(raw_topic="other"), "expected raw topic 'events', got 'other'"),
        (lambda s: s.update(partitions=s["partitions"][:1]), "expected 2 partitions, got 1"),
        (
            lambda s: s["partitions"][1]["writers"].pop("cvr"),
            r"join checkpoint of partition 1: expected models \['ctr', 'cvr'\]",
        ),
        (
            lambda s: s["partitions"][0].update(partition=1),
            r"expected raw topic 'events' partition 0, got 'events' partition 1",
        ),
        (lambda s: s["partitions"][0].pop("position"), "partition 0: malformed state"),
        (lambda s: s.pop("partitions"), "join stage checkpoint: malformed state"),
        (lambda s: s["partitions"][0].update(joiner="AAAA"), "join snapshot: cannot decode"),
    ],
)
def test_bad_checkpoint_state_is_refused_naming_why(
    primed: tuple[SqliteLog, dict[str, Any]],
    small_cfg: Config,
    mutate: Any,
    message: str,
) -> None:
    log, state = primed
    bad = copy.deepcopy(state)
    mutate(bad)
    with pytest.raises(CheckpointError, match=message):
        stage(small_cfg, log, bad)


def test_corrupt_variants_are_each_malformed() -> None:
    from minutely.errors import EventError
    from minutely.events import Click, decode_event, encode_event, validate_event

    msg = (b"k", encode_event(Click(imp_id=5, ts_ms=1_000_000)), 1_000_000)

    def reason(value: bytes) -> str:
        try:
            validate_event(decode_event(value), default_schema(), 1_000_000, 60_000, 60_000)
        except EventError as exc:
            return str(exc)
        return "valid"

    reasons = []
    for variant in range(4):
        key, value, ts = corrupt(msg, variant)
        assert (key, ts) == (b"k", 1_000_000)
        reasons.append(reason(value))
    assert "undecodable event" in reasons[0]
    assert "missing required field `ts_ms`" in reasons[1]
    assert "Expected `int`, got `str`" in reasons[2]
    assert "in the future" in reasons[3]


def test_ids_beyond_int64_are_dead_lettered_not_fatal(tmp_path: Path, small_cfg: Config) -> None:
    import msgspec

    log = SqliteLog(tmp_path / "log.sqlite")
    js = stage(small_cfg, log)
    ts = small_cfg.sim.start_ms + 1_000
    batch = Market(small_cfg.sim).events_between(small_cfg.sim.start_ms, ts + 60_000)
    good = batch.messages()
    doc = msgspec.json.decode(good[0][1])
    big_id = msgspec.json.encode({**doc, "imp_id": 2**63})
    big_feature = msgspec.json.encode({**doc, "features": {**doc["features"], "ad_id": 2**64}})
    log.append("events", [*good, (b"x", big_id, ts), (b"x", big_feature, ts)])
    js.run()
    js.advance_to(small_cfg.sim.start_ms + MS_PER_HOUR)
    assert js.stats.dead_letters == 2
    assert js.stats.samples["ctr"] == batch.count(0)
    reasons = [d.reason for d in read_dead_letters(log, "dead_letters")]
    assert all("<= 9223372036854775807" in r for r in reasons)


def test_small_read_slices_join_the_same_as_one_read(tmp_path: Path, small_cfg: Config) -> None:
    counts = []
    for name, slice_size in (("one", 200_000), ("sliced", 37)):
        log = SqliteLog(tmp_path / f"{name}.sqlite")
        js = stage(small_cfg, log)
        source = SimSource(Market(small_cfg.sim), log, small_cfg.stream.raw_topic, corrupt_every=40)
        source.produce(small_cfg.sim.start_ms, small_cfg.sim.start_ms + MS_PER_HOUR)
        written = sum(log.end_offset(small_cfg.stream.raw_topic, p) for p in range(2))
        assert js.run(max_records=slice_size) == written
        js.advance_to(small_cfg.sim.start_ms + MS_PER_HOUR)
        counts.append((js.stats.samples, js.stats.dead_letters, js.stats.events))
        log.close()
    assert counts[0] == counts[1]


def test_a_restored_stage_reads_each_window_as_the_uninterrupted_run_did(tmp_path: Path) -> None:
    """A sample released late (its natural time just before a tick's end, released in the next
    tick) belongs to the window in which the join released it, also when a restored run finds it
    already in the log, written by the crashed run it replaces."""
    from minutely.events import Impression, encode_event
    from minutely.pipeline.learner import SampleWindows

    cfg = load_config(None, {"stream": {"partitions": 1}, "models": [{"name": "ctr"}]})
    schema = default_schema()
    model = cfg.model("ctr")
    w_ms = model.attribution_window_s * 1000
    t0 = cfg.sim.start_ms
    ends = [t0 + i * WINDOW_MS for i in range(1, 5)]
    feats = {
        f.name: (3 if f.kind == "sparse" else [1] if f.kind == "multi_sparse" else 0.5)
        for f in schema.features
    }
    # Impression 1's sample is due 10 s before the second tick's end: the watermark (30 s of
    # lateness) passes it only in the third tick. Impression 2 moves time on in the third.
    imps = [(1, ends[1] - 10_000 - w_ms), (2, ends[1] + 60_000)]

    def run(log: SqliteLog, clock: ReplayClock, js: JoinStage, upto: list[int]) -> None:
        for end in upto:
            clock.advance_to(end)
            js.run()
            js.advance_to(end)

    def window_ids(log: SqliteLog, positions: dict[int, int] | None, end: int) -> list[int]:
        sw = SampleWindows(log, model, schema, 64, positions)
        table = sw.read_table(end)
        return [] if table is None else table["sample_id"].to_pylist()

    def fresh(path: Path) -> tuple[SqliteLog, ReplayClock, JoinStage]:
        log = SqliteLog(path)
        clock = ReplayClock(t0)
        js = JoinStage(log, cfg.stream, cfg.ingest, cfg.join, [model], schema, clock, 64)
        log.append("events", [(None, encode_event(Impression(i, ts, feats)), ts) for i, ts in imps])
        return log, clock, js

    # Uninterrupted: what window 2 holds when it is read at its tick.
    ref_log, ref_clock, ref = fresh(tmp_path / "ref.sqlite")
    run(ref_log, ref_clock, ref, ends[:2])
    ref_window = window_ids(ref_log, None, ends[1])
    # Crashed: checkpoint after tick 1, then ticks 2 and 3 are logged, then the process dies.
    log, clock, crashed = fresh(tmp_path / "crash.sqlite")
    run(log, clock, crashed, ends[:1])
    saved = json.loads(json.dumps(crashed.snapshot()))
    run(log, clock, crashed, ends[1:3])
    restored_clock = ReplayClock(ends[0])
    restored = JoinStage(
        log, cfg.stream, cfg.ingest, cfg.join, [model], schema, restored_clock, 64, state=saved
    )
    run(log, restored_clock, restored, ends[1:2])
    assert window_ids(log, None, ends[1]) == ref_window == []
    assert window_ids(log, None, ends[2]) == [1]
