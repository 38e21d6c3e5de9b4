from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from minutely.clock import MS_PER_HOUR, ReplayClock
from minutely.config import Config
from minutely.errors import CheckpointError
from minutely.pipeline.join_stage import JoinStage
from minutely.pipeline.source import SimSource, corrupt
from minutely.schema import default_schema
from minutely.sim import Market
from minutely.stream import SqliteLog, read_dead_letters


def stage(cfg: Config, log: SqliteLog, state: dict[str, Any] | None = None) -> JoinStage:
    clock = ReplayClock(cfg.sim.start_ms + MS_PER_HOUR)
    return JoinStage(
        log,
        cfg.stream,
        cfg.ingest,
        cfg.join,
        cfg.models,
        default_schema(),
        clock,
        cfg.train.batch_size,
        state=state,
    )


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
    assert again.stats.samples == state["stats"]["samples"]
    assert again.stats.dead_letters == sum(state["dead_letters"]["counts"].values())


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s.update(raw_topic="other"), "expected raw topic 'events', got 'other'"),
        (lambda s: s.update(joiners=s["joiners"][:1]), "expected 2 partitions, got 1"),
        (lambda s: s["outputs"].pop("cvr"), r"expected models \['ctr', 'cvr'\]"),
        (lambda s: s.pop("positions"), "malformed state"),
        (lambda s: s.update(joiners=["AAAA", "AAAA"]), "join snapshot: cannot decode"),
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
        assert js.run(max_records=slice_size) == sum(source.ends().values())
        js.advance_to(small_cfg.sim.start_ms + MS_PER_HOUR)
        counts.append((js.stats.samples, js.stats.dead_letters, js.stats.events))
        log.close()
    assert counts[0] == counts[1]
