"""The simulate service: a restart continues; another market is refused, never mixed in."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest

from minutely.clock import ReplayClock
from minutely.config import load_config
from minutely.errors import CheckpointError, ConfigError
from minutely.pipeline.sim_service import SimulateService
from minutely.stream import SqliteLog

SMALL = {"sim": {"impressions_per_day": 12_000, "users": 1_000}, "stream": {"partitions": 2}}


def raw_count(log: SqliteLog) -> int:
    return sum(log.end_offset("events", p) for p in range(2))


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
