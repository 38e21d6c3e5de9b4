"""The join stage with its partitions' state in stores: a restore mid-stream writes what an
uninterrupted run writes, once; a store that does not fit the checkpoint is refused; the join
service keeps one store per raw partition under ``<run>/checkpoints/join/``."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from minutely.clock import MS_PER_HOUR, MS_PER_MIN, ReplayClock
from minutely.config import Config, load_config
from minutely.data import decode_batch, record_batch_to_samples
from minutely.errors import CheckpointError
from minutely.join.store import JoinStore
from minutely.pipeline.join_service import JoinService
from minutely.pipeline.join_stage import JoinStage
from minutely.pipeline.source import SimSource
from minutely.schema import default_schema
from minutely.sim import Market
from minutely.stream import SqliteLog, read_dead_letters

STEP = 5 * MS_PER_MIN


def stage(
    cfg: Config, log: SqliteLog, clock: ReplayClock, store_dir: Path | None, state: Any = None
) -> JoinStage:
    return JoinStage.from_config(log, cfg, default_schema(), clock, state, store_dir=store_dir)


def open_log(cfg: Config, path: Path) -> SqliteLog:
    log = SqliteLog(path)
    log.create_topic(cfg.stream.raw_topic, cfg.stream.partitions)
    return log


def written(cfg: Config, log: SqliteLog) -> Counter[tuple[str, int, int, bool]]:
    out: Counter[tuple[str, int, int, bool]] = Counter()
    schema = default_schema()
    for m in cfg.models:
        for p in range(log.partitions(m.samples_topic)):
            for rec in log.read(m.samples_topic, p, 0, 1_000_000):
                for s in record_batch_to_samples(decode_batch(rec.value, schema), schema):
                    out[(m.name, s.sample_id, s.label, s.is_correction)] += 1
    return out


def letters(cfg: Config, log: SqliteLog) -> list[tuple[str, str]]:
    return sorted(
        (d.reason, d.source) for d in read_dead_letters(log, cfg.stream.dead_letter_topic)
    )


def replay(js: JoinStage, clock: ReplayClock, source: SimSource, start: int, end: int) -> JoinStage:
    for t in range(start + STEP, end + 1, STEP):
        source.produce(t - STEP, t)
        clock.advance_to(t)
        js.run()
        js.advance_to(t)
    return js


def reference(cfg: Config, path: Path, hours: int) -> SqliteLog:
    log = open_log(cfg, path)
    clock = ReplayClock(cfg.sim.start_ms)
    source = SimSource(Market(cfg.sim), log, cfg.stream.raw_topic, corrupt_every=97)
    js = replay(stage(cfg, log, clock, None), clock, source, cfg.sim.start_ms, _at(cfg, hours))
    js.close()
    return log


def _at(cfg: Config, hours: float) -> int:
    return cfg.sim.start_ms + int(hours * MS_PER_HOUR)


def test_a_restore_mid_stream_writes_what_an_uninterrupted_run_writes(
    tmp_path: Path, small_cfg: Config
) -> None:
    ref = reference(small_cfg, tmp_path / "ref.sqlite", 3)
    log = open_log(small_cfg, tmp_path / "log.sqlite")
    stores = tmp_path / "checkpoints" / "join"
    t0 = small_cfg.sim.start_ms
    clock = ReplayClock(t0)
    source = SimSource(Market(small_cfg.sim), log, small_cfg.stream.raw_topic, corrupt_every=97)
    js = replay(stage(small_cfg, log, clock, stores), clock, source, t0, _at(small_cfg, 1))
    state = json.loads(json.dumps(js.snapshot()))  # as the runner's checkpoint holds it
    writer, produced = json.loads(json.dumps(source.writer_state())), source.produced
    assert state["partitions"] == [{"partition": p, "generation": 1} for p in range(2)]
    js = replay(js, clock, source, _at(small_cfg, 1), _at(small_cfg, 1.5))
    js.snapshot()  # the stores commit again; the caller's checkpoint is never written
    js = replay(js, clock, source, _at(small_cfg, 1.5), _at(small_cfg, 2))
    js.close()  # then a crash: what was joined after the second checkpoint is lost
    assert sorted(p.name for p in stores.glob("p*.sqlite")) == ["p0.sqlite", "p1.sqlite"]

    clock = ReplayClock(_at(small_cfg, 1))
    source = SimSource(Market(small_cfg.sim), log, small_cfg.stream.raw_topic, 97, writer, produced)
    again = stage(small_cfg, log, clock, stores, state)
    again = replay(again, clock, source, _at(small_cfg, 1), _at(small_cfg, 3))
    assert written(small_cfg, log) == written(small_cfg, ref)
    assert max(written(small_cfg, log).values()) == 1, "a sample was written twice"
    assert letters(small_cfg, log) == letters(small_cfg, ref)
    assert again.stats.events == sum(
        log.end_offset(small_cfg.stream.raw_topic, p) for p in range(2)
    )
    again.close()


def test_a_store_older_than_the_checkpoint_is_refused(tmp_path: Path, small_cfg: Config) -> None:
    log = open_log(small_cfg, tmp_path / "log.sqlite")
    stores = tmp_path / "join"
    clock = ReplayClock(small_cfg.sim.start_ms)
    source = SimSource(Market(small_cfg.sim), log, small_cfg.stream.raw_topic)
    js = replay(
        stage(small_cfg, log, clock, stores), clock, source, clock.now_ms(), _at(small_cfg, 1)
    )
    js.snapshot()
    shutil.copytree(stores, tmp_path / "old")
    js = replay(js, clock, source, _at(small_cfg, 1), _at(small_cfg, 1.5))
    state = js.snapshot()
    js.close()
    shutil.rmtree(stores)
    shutil.copytree(tmp_path / "old", stores)
    with pytest.raises(
        CheckpointError, match=r"p0\.sqlite: expected generation 2 \(the checkpoint's\) or the"
    ):
        stage(small_cfg, log, clock, stores, state)


def test_a_store_two_generations_ahead_is_refused(tmp_path: Path, small_cfg: Config) -> None:
    log = open_log(small_cfg, tmp_path / "log.sqlite")
    stores = tmp_path / "join"
    clock = ReplayClock(small_cfg.sim.start_ms)
    source = SimSource(Market(small_cfg.sim), log, small_cfg.stream.raw_topic)
    js = replay(
        stage(small_cfg, log, clock, stores), clock, source, clock.now_ms(), _at(small_cfg, 1)
    )
    state = js.snapshot()
    for end in (1.25, 1.5):
        js = replay(js, clock, source, clock.now_ms(), _at(small_cfg, end))
        js.snapshot()
    js.close()
    with pytest.raises(
        CheckpointError,
        match=r"expected generation 1 \(the checkpoint's\) or the one after it, got 3",
    ):
        stage(small_cfg, log, clock, stores, state)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.write_bytes(b"\x00garbage" * 512), r"p1\.sqlite: cannot open it"),
        (lambda p: p.unlink(), r"p1\.sqlite: expected a file, found none"),
    ],
)
def test_a_damaged_or_missing_store_is_refused_naming_it(
    tmp_path: Path, small_cfg: Config, damage: Any, message: str
) -> None:
    log = open_log(small_cfg, tmp_path / "log.sqlite")
    stores = tmp_path / "join"
    clock = ReplayClock(small_cfg.sim.start_ms)
    source = SimSource(Market(small_cfg.sim), log, small_cfg.stream.raw_topic)
    js = replay(
        stage(small_cfg, log, clock, stores), clock, source, clock.now_ms(), _at(small_cfg, 1)
    )
    state = js.snapshot()
    js.close()
    for suffix in ("-wal", "-shm"):
        (stores / f"p1.sqlite{suffix}").unlink(missing_ok=True)
    damage(stores / "p1.sqlite")
    with pytest.raises(CheckpointError, match=message):
        stage(small_cfg, log, clock, stores, state)


def test_a_state_without_generations_is_refused(tmp_path: Path, small_cfg: Config) -> None:
    log = open_log(small_cfg, tmp_path / "log.sqlite")
    clock = ReplayClock(small_cfg.sim.start_ms)
    full = stage(small_cfg, log, clock, None).snapshot()  # a full copy, not store generations
    with pytest.raises(CheckpointError, match=r"expected each partition's store generation"):
        stage(small_cfg, log, clock, tmp_path / "join", full)


def test_a_new_stage_starts_its_stores_afresh(tmp_path: Path, small_cfg: Config) -> None:
    log = open_log(small_cfg, tmp_path / "log.sqlite")
    stores = tmp_path / "join"
    clock = ReplayClock(small_cfg.sim.start_ms)
    source = SimSource(Market(small_cfg.sim), log, small_cfg.stream.raw_topic)
    js = replay(
        stage(small_cfg, log, clock, stores), clock, source, clock.now_ms(), _at(small_cfg, 1)
    )
    js.snapshot()
    js.close()
    fresh = stage(small_cfg, log, clock, stores)
    assert [JoinStore.open(stores / f"p{p}.sqlite").generation() for p in range(2)] == [0, 0]
    assert fresh.state_size() == 0
    fresh.close()


def test_the_stage_checkpoint_after_a_few_events_writes_little(
    tmp_path: Path, small_cfg: Config
) -> None:
    log = open_log(small_cfg, tmp_path / "log.sqlite")
    clock = ReplayClock(small_cfg.sim.start_ms)
    source = SimSource(Market(small_cfg.sim), log, small_cfg.stream.raw_topic)
    js = stage(small_cfg, log, clock, tmp_path / "join")
    js = replay(js, clock, source, clock.now_ms(), _at(small_cfg, 1))
    js.snapshot()
    full = sum(c.bytes_written for c in js.last_commits)
    js = replay(js, clock, source, _at(small_cfg, 1), _at(small_cfg, 1) + STEP)
    js.snapshot()
    step = sum(c.bytes_written for c in js.last_commits)
    assert 0 < step < full / 5, (step, full)
    js.close()


# --- the service -----------------------------------------------------------------------------


def service_config() -> Config:
    return load_config(
        None,
        {
            "sim": {"impressions_per_day": 24_000, "users": 3_000, "delay_preset": "fast"},
            "stream": {"partitions": 2},
            "models": [{"name": "ctr"}],
        },
    )


def fill(cfg: Config, run: Path) -> SqliteLog:
    log = open_log(cfg, run / "log.sqlite")
    SimSource(Market(cfg.sim), log, cfg.stream.raw_topic).produce(cfg.sim.start_ms, _at(cfg, 0.5))
    return log


def drain(svc: JoinService) -> None:
    while svc.step(0.05) or svc.lag():
        pass


def test_the_service_keeps_one_store_per_partition_and_resumes_from_it(tmp_path: Path) -> None:
    cfg = service_config()
    log = fill(cfg, tmp_path)
    svc = JoinService(cfg, log, tmp_path)
    drain(svc)
    events = sum(p.stats.events for p in svc.parts.values())
    svc.close()
    stores = tmp_path / "checkpoints" / "join"
    assert sorted(p.name for p in stores.glob("p*.sqlite")) == ["p0.sqlite", "p1.sqlite"]
    again = JoinService(cfg, log, tmp_path)
    again.step(0.05)
    assert sum(p.stats.events for p in again.parts.values()) == events
    assert again.lag() == 0
    again.close()


def test_the_service_refuses_a_damaged_store_naming_it(tmp_path: Path) -> None:
    cfg = service_config()
    log = fill(cfg, tmp_path)
    svc = JoinService(cfg, log, tmp_path)
    drain(svc)
    svc.close()
    store = tmp_path / "checkpoints" / "join" / "p0.sqlite"
    for suffix in ("-wal", "-shm"):
        Path(f"{store}{suffix}").unlink(missing_ok=True)
    store.write_bytes(b"\x00garbage" * 512)
    svc = JoinService(cfg, log, tmp_path)
    with pytest.raises(CheckpointError, match=r"join store .*p0\.sqlite: cannot open it"):
        svc.step(0.05)


def test_the_service_refuses_a_store_written_with_other_settings(tmp_path: Path) -> None:
    cfg = service_config()
    log = fill(cfg, tmp_path)
    svc = JoinService(cfg, log, tmp_path)
    drain(svc)
    svc.close()
    other = load_config(
        None,
        {
            "sim": {"impressions_per_day": 24_000, "users": 3_000, "delay_preset": "fast"},
            "stream": {"partitions": 2},
            "models": [{"name": "ctr"}],
            "join": {"allowed_lateness_s": 10, "hot_impressions": 7},
        },
    )
    svc = JoinService(other, log, tmp_path)
    with pytest.raises(
        CheckpointError, match=r"p\d\.sqlite was written with join\.allowed_lateness_s=30"
    ):
        svc.step(0.05)


def test_a_partition_without_a_store_cannot_checkpoint_into_one(
    tmp_path: Path, small_cfg: Config
) -> None:
    log = open_log(small_cfg, tmp_path / "log.sqlite")
    js = stage(small_cfg, log, ReplayClock(small_cfg.sim.start_ms), None)
    with pytest.raises(CheckpointError, match=r"join partition 0: checkpoint expected a store"):
        js.parts[0].checkpoint()


@pytest.mark.parametrize(
    ("caller", "message"),
    [
        (b"{not json", r"p0\.sqlite: the partition state does not decode"),
        (b"[1, 2]", r"p0\.sqlite: expected a partition state with a 'join' table, got list"),
    ],
)
def test_a_garbled_partition_state_in_a_store_is_refused(
    tmp_path: Path, small_cfg: Config, caller: bytes, message: str
) -> None:
    import sqlite3

    log = open_log(small_cfg, tmp_path / "log.sqlite")
    stores = tmp_path / "join"
    js = stage(small_cfg, log, ReplayClock(small_cfg.sim.start_ms), stores)
    state = js.snapshot()
    js.close()
    with sqlite3.connect(stores / "p0.sqlite") as db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'caller'", (caller,))
    with pytest.raises(CheckpointError, match=message):
        stage(small_cfg, log, ReplayClock(small_cfg.sim.start_ms), stores, state)


def test_a_store_that_never_committed_is_not_a_checkpoint(
    tmp_path: Path, small_cfg: Config
) -> None:
    log = open_log(small_cfg, tmp_path / "log.sqlite")
    stores = tmp_path / "join"
    stage(small_cfg, log, ReplayClock(small_cfg.sim.start_ms), stores).close()
    state = {
        "raw_topic": "events",
        "partitions": [{"partition": p, "generation": 0} for p in (0, 1)],
    }
    with pytest.raises(CheckpointError, match=r"p0\.sqlite: expected a checkpoint, found none"):
        stage(small_cfg, log, ReplayClock(small_cfg.sim.start_ms), stores, state)
