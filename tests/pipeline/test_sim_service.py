"""The simulate service: a restart continues; another market is refused, never mixed in. With
feature snapshots on, every impression it publishes by reference has its snapshot."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from deltalake import DeltaTable

from minutely.clock import ReplayClock
from minutely.config import load_config
from minutely.errors import CheckpointError, ConfigError, EventError, SchemaError, StorageError
from minutely.events import EventValidator, Impression, decode_event
from minutely.features import FeatureResolver, SnapshotReader, SnapshotWriter
from minutely.pipeline.sim_service import SimulateService
from minutely.pipeline.source import SimSource, open_snapshots
from minutely.schema import FeatureSpec, Schema, default_schema
from minutely.sim import Market
from minutely.stream import SqliteLog

SMALL = {"sim": {"impressions_per_day": 12_000, "users": 1_000}, "stream": {"partitions": 2}}
SNAPSHOTS = {**SMALL, "features": {"snapshots": True}}
INLINE = {**SMALL, "features": {"snapshots": False}}


def raw_count(log: SqliteLog) -> int:
    return sum(log.end_offset("events", p) for p in range(2))


def raw_events(log: SqliteLog) -> list[Impression]:
    """The impressions in the raw topic that decode, in (partition, offset) order."""
    out = []
    for p in range(2):
        for rec in log.read("events", p, 0, 1_000_000):
            try:
                ev = decode_event(rec.value)
            except EventError:  # a malformed copy (corrupt_every)
                continue
            if isinstance(ev, Impression):
                out.append(ev)
    return out


def test_a_restart_continues_after_its_last_window(tmp_path: Path) -> None:
    cfg = load_config(None, SMALL)
    log = SqliteLog(tmp_path / "log.sqlite")
    first = SimulateService(cfg, log, tmp_path, ReplayClock(0), days=0.1)
    first.step()
    first.step()
    again = SimulateService(cfg, log, tmp_path, ReplayClock(0), days=0.1)
    assert again.next_ms == first.next_ms
    again.run(threading.Event())
    whole = tmp_path / "whole"
    whole.mkdir()
    ref_log = SqliteLog(whole / "log.sqlite")
    SimulateService(cfg, ref_log, whole, ReplayClock(0), days=0.1).run(threading.Event())
    assert raw_count(log) == raw_count(ref_log) > 0
    log.close()
    ref_log.close()


def test_another_market_is_refused_naming_the_setting(tmp_path: Path) -> None:
    log = SqliteLog(tmp_path / "log.sqlite")
    SimulateService(load_config(None, SMALL), log, tmp_path, ReplayClock(0), days=0.1).step()
    other = load_config(None, {**SMALL, "sim": {**SMALL["sim"], "seed": 8}})
    with pytest.raises(
        CheckpointError, match=r"was written with sim\.seed=7, this run has sim\.seed=8"
    ):
        SimulateService(other, log, tmp_path, ReplayClock(0), days=0.1)
    # Without its checkpoint the writer still finds its messages and refuses another market.
    shutil.rmtree(tmp_path / "checkpoints")
    with pytest.raises(CheckpointError, match=r"writer 'simulate' of topic 'events': the restored"):
        SimulateService(other, log, tmp_path, ReplayClock(0), days=0.1).step()
    log.close()


def test_a_rerun_in_the_same_place_writes_nothing_twice(tmp_path: Path) -> None:
    cfg = load_config(None, SMALL)
    log = SqliteLog(tmp_path / "log.sqlite")
    SimulateService(cfg, log, tmp_path, ReplayClock(0), days=0.05).run(threading.Event())
    n = raw_count(log)
    shutil.rmtree(tmp_path / "checkpoints")  # as if it crashed before its first checkpoint
    SimulateService(cfg, log, tmp_path, ReplayClock(0), days=0.05).run(threading.Event())
    assert raw_count(log) == n
    log.close()


def test_pace_and_span_are_checked(tmp_path: Path) -> None:
    log = SqliteLog(tmp_path / "log.sqlite")
    cfg = load_config(None, SMALL)
    with pytest.raises(ConfigError, match=r"config field '--rate': expected a number > 0"):
        SimulateService(cfg, log, tmp_path, ReplayClock(0), rate=0)
    with pytest.raises(ConfigError, match=r"config field '--days': expected a number of days > 0"):
        SimulateService(cfg, log, tmp_path, ReplayClock(0), days=-1)
    live = SimulateService(cfg, log, tmp_path, ReplayClock(1_800_000_123_456), rate=2.0, live=True)
    assert live.start_ms == 1_800_000_000_000  # the clock's now, floored to a window
    assert live.due_in_s() == pytest.approx(150.0, abs=0.2)  # a 300 s window at twice real time
    log.close()


def test_with_snapshots_every_published_impression_has_its_snapshot(tmp_path: Path) -> None:
    cfg = load_config(None, SNAPSHOTS)
    log = SqliteLog(tmp_path / "log.sqlite")
    svc = SimulateService(cfg, log, tmp_path, ReplayClock(0), days=0.02)
    try:
        svc.run(threading.Event())
        writer = svc.source.snapshots
        assert writer is not None
        stats = writer.stats()
    finally:
        svc.close()
    published = raw_events(log)
    assert len(published) > 100
    assert all(ev.by_reference and ev.request_id == ev.imp_id for ev in published)
    assert stats["rows"] == svc.source.snapshot_rows == len(published)
    windows = 6  # 0.02 days in windows of 300 s
    assert set(stats["commits"].values()) == {windows}  # one write per window, both replicas
    # The inline stream of the same market, for comparison.
    whole = tmp_path / "inline"
    whole.mkdir()
    ref_log = SqliteLog(whole / "log.sqlite")
    SimulateService(load_config(None, INLINE), ref_log, whole, ReplayClock(0), days=0.02).run(
        threading.Event()
    )
    inline = raw_events(ref_log)
    schema = default_schema()
    replicas = [str(tmp_path / "features" / name) for name in ("primary", "secondary")]
    with SnapshotReader(schema, replicas, missing_wait_s=0) as reader:
        resolver = FeatureResolver(reader, EventValidator.from_config(schema, cfg.ingest))
        out, failures = resolver.resolve(published)
    assert failures == {}
    assert resolver.stats.gets == 1
    by_id = {ev.imp_id: ev for ev in inline}
    assert len(by_id) == len(out)
    for ev in out:
        assert isinstance(ev, Impression)
        want = by_id[ev.imp_id]
        assert ev.ts_ms == want.ts_ms
        assert ev.features.keys() == want.features.keys()
        for spec in schema.features:
            got, logged = ev.features[spec.name], want.features[spec.name]
            if spec.kind == "dense":  # the logged value, as the float32 the sample log holds
                assert isinstance(got, float)
                assert isinstance(logged, float)
                assert np.float32(got) == np.float32(logged)
            else:
                assert got == logged
    log.close()
    ref_log.close()


def test_a_window_produced_again_duplicates_snapshot_rows_only(tmp_path: Path) -> None:
    cfg = load_config(None, SNAPSHOTS)
    log = SqliteLog(tmp_path / "log.sqlite")
    svc = SimulateService(cfg, log, tmp_path, ReplayClock(0), days=0.01)
    svc.run(threading.Event())
    svc.close()
    n = raw_count(log)
    shutil.rmtree(tmp_path / "checkpoints")  # as if it crashed before its first checkpoint
    again = SimulateService(cfg, log, tmp_path, ReplayClock(0), days=0.01)
    again.run(threading.Event())
    again.close()
    assert raw_count(log) == n  # the raw topic stays exactly once
    published = raw_events(log)
    primary = str(tmp_path / "features" / "primary")
    rows = DeltaTable(primary).to_pyarrow_table()
    assert rows.num_rows == 2 * len(published)  # each window's snapshots written twice
    rows = rows.sort_by("request_id")
    first, second = (rows.take(list(range(k, rows.num_rows, 2))) for k in (0, 1))
    assert first.equals(second)  # identical copies
    assert first.column("request_id").to_pylist() == sorted(ev.imp_id for ev in published)
    schema = default_schema()
    with SnapshotReader(schema, [primary, str(tmp_path / "features" / "secondary")]) as reader:
        got = reader.get([ev.imp_id for ev in published], [ev.ts_ms for ev in published])
    assert (got.pending, got.missing, got.malformed) == ([], [], {})
    assert len(got.ids) == len(published)
    log.close()


@pytest.mark.parametrize(
    ("first", "then", "message"),
    [
        (
            INLINE,
            SNAPSHOTS,
            r"was written with features\.snapshots=False, this run has "
            r"features\.snapshots=True$",
        ),
        (
            SNAPSHOTS,
            INLINE,
            r"was written with features\.snapshots=True, this run has "
            r"features\.snapshots=False$",
        ),
    ],
)
def test_turning_snapshots_on_or_off_at_a_restart_is_refused(
    tmp_path: Path, first: dict[str, object], then: dict[str, object], message: str
) -> None:
    log = SqliteLog(tmp_path / "log.sqlite")
    svc = SimulateService(load_config(None, first), log, tmp_path, ReplayClock(0), days=0.01)
    svc.step()
    svc.close()
    with pytest.raises(CheckpointError, match=r"^simulate checkpoint .*simulate\.json " + message):
        SimulateService(load_config(None, then), log, tmp_path, ReplayClock(0), days=0.01)
    log.close()


def test_a_failed_snapshot_write_publishes_nothing(tmp_path: Path) -> None:
    log = SqliteLog(tmp_path / "log.sqlite")
    svc = SimulateService(load_config(None, SNAPSHOTS), log, tmp_path, ReplayClock(0), days=0.01)
    svc.close()  # closes the snapshot writer: its next write fails
    with pytest.raises(StorageError, match=r"expected an open writer, got a closed one"):
        svc.step()
    assert raw_count(log) == 0
    log.close()


def test_a_snapshot_writer_of_another_schema_is_refused(tmp_path: Path) -> None:
    cfg = load_config(None, SMALL)
    log = SqliteLog(tmp_path / "log.sqlite")
    log.create_topic("events", 2)
    other = Schema((FeatureSpec("user_id", "sparse"),))
    market = Market(cfg.sim, default_schema())
    message = (
        rf"^SimSource: expected a snapshot writer of the market's schema "
        rf"{market.schema.fingerprint()}, got one of schema {other.fingerprint()}$"
    )
    with (
        SnapshotWriter(other, [str(tmp_path / "a"), str(tmp_path / "b")]) as writer,
        pytest.raises(SchemaError, match=message),
    ):
        SimSource(market, log, "events", snapshots=writer)
    log.close()


def test_sim_source_writes_each_windows_snapshots_with_its_messages(tmp_path: Path) -> None:
    cfg = load_config(None, SNAPSHOTS)
    schema = default_schema()
    assert open_snapshots(load_config(None, INLINE), schema, tmp_path) is None
    log = SqliteLog(tmp_path / "log.sqlite")
    log.create_topic("events", 2)
    market = Market(cfg.sim, schema)
    snapshots = open_snapshots(cfg, schema, tmp_path)
    source = SimSource(market, log, "events", corrupt_every=40, snapshots=snapshots)
    start, end = cfg.sim.start_ms, cfg.sim.start_ms + 3 * 300_000
    impressions = 0
    try:
        for lo in range(start, end, 300_000):
            impressions += source.produce(lo, lo + 300_000).count(0)
            assert source.snapshot_rows == impressions  # one write per window, all its rows
    finally:
        source.close()
    assert source.corrupted > 0  # malformed copies of by-reference messages still go out
    published = [ev for ev in raw_events(log) if start <= ev.ts_ms < end]
    assert len(published) == impressions > 0
    assert all(ev.by_reference for ev in published)
    replicas = [str(tmp_path / "features" / name) for name in ("primary", "secondary")]
    with SnapshotReader(schema, replicas, missing_wait_s=0) as reader:
        got = reader.get([ev.imp_id for ev in published], [ev.ts_ms for ev in published])
    assert (got.pending, got.missing, got.malformed) == ([], [], {})
    assert sorted(got.ids.tolist()) == sorted({ev.imp_id for ev in published})
    assert len(got.ids) == impressions
