"""The pipeline with feature snapshots: impressions by reference, features from two replicas.

The in-process replay runs with ``features.snapshots`` on: the source writes each window's
features to two Delta tables before it publishes the impressions by reference, and the join
fetches them by request id. Its samples must equal those of the same replay with features inline,
also while the primary replica disappears mid-stream and comes back.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from deltalake import DeltaTable
from pipeline_helpers import SMALL, make_pipeline

from minutely.config import Config, load_config, merge_tables
from minutely.data import decode_batch
from minutely.events import Impression, encode_event
from minutely.schema import default_schema
from minutely.stream import SqliteLog

pytestmark = pytest.mark.integration

HOUR = 3_600_000


def _config(snapshots: bool, **features: Any) -> Config:
    over = {
        "features": {"snapshots": snapshots, "failback_check_s": 0.2, **features},
        "demo": {"corrupt_every": 500},
    }
    return load_config(None, merge_tables(SMALL, over))


def _samples(log: SqliteLog, cfg: Config) -> dict[str, Counter[tuple[Any, ...]]]:
    """Every sample of every model as (partition, row) values, counted."""
    schema = default_schema()
    out: dict[str, Counter[tuple[Any, ...]]] = {}
    for m in cfg.models:
        rows: Counter[tuple[Any, ...]] = Counter()
        for p in range(log.partitions(m.samples_topic)):
            for rec in log.read(m.samples_topic, p, 0, 1_000_000):
                if not rec.value:
                    continue  # a time marker
                table = pa.Table.from_batches([decode_batch(rec.value, schema)])
                for row in table.to_pylist():
                    rows[(p, *sorted((k, repr(v)) for k, v in row.items()))] += 1
        out[m.name] = rows
    return out


def _replay(
    cfg: Config, run_dir: Path, hours: int, between: Any = None
) -> tuple[dict[str, Counter[tuple[Any, ...]]], dict[str, Any], dict[str, int]]:
    pipe, log = make_pipeline(cfg, run_dir)
    try:
        for h in range(1, hours + 1):
            if between is not None:
                between(h, run_dir)
            pipe.tick(cfg.sim.start_ms + h * HOUR)
        stats = {} if pipe.resolver is None else pipe.resolver.reader.stats()
        dead = dict(pipe.join.stats.dead_letters_by_reason)
        pipe.join.flush_all()
        return _samples(log, cfg), stats, dead
    finally:
        pipe.close()
        log.close()


def test_samples_from_snapshots_equal_those_from_inline_features(tmp_path: Path) -> None:
    inline, _, inline_dead = _replay(_config(False), tmp_path / "inline", 3)
    by_ref, stats, dead = _replay(_config(True), tmp_path / "snapshots", 3)
    assert sum(inline["ctr"].values()) > 1_000  # something to compare
    assert sum(inline["cvr"].values()) > 5
    assert by_ref == inline
    assert dead == inline_dead  # the corrupted copies, and nothing else
    assert stats["found"] > 1_000
    assert stats["missing"] == stats["malformed"] == stats["failovers"] == 0
    assert (tmp_path / "snapshots" / "features" / "primary" / "_delta_log").is_dir()
    assert (tmp_path / "snapshots" / "features" / "secondary" / "_delta_log").is_dir()


def test_primary_lost_mid_stream_fails_over_and_back_building_every_sample_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The primary table is moved away after hour 2 and put back after hour 4: every sample is
    built exactly once (the samples equal an inline run's), the reader failed over within the
    configured bound and failed back once the primary answered again."""
    read_timeout_s = 2.0
    inline, _, _ = _replay(_config(False), tmp_path / "inline", 9)

    def outage(hour: int, run_dir: Path) -> None:
        primary = run_dir / "features" / "primary"
        away = run_dir / "primary-away"
        if hour == 3:
            primary.rename(away)
        if hour == 5:
            away.rename(primary)
        if hour >= 5:
            time.sleep(0.3)  # the reader checks the primary every failback_check_s

    caplog.set_level(logging.WARNING, logger="minutely.features")
    cfg = _config(True, read_timeout_s=read_timeout_s)
    by_ref, stats, dead = _replay(cfg, tmp_path / "snapshots", 9, outage)
    assert by_ref == inline
    assert not any(reason.startswith(("missing snapshot", "invalid snapshot")) for reason in dead)
    assert stats["failovers"] >= 1
    assert stats["failbacks"] >= 1, (stats["last_failure"], stats["reads"])
    assert stats["replica"].endswith("primary")
    assert 0 < stats["max_failover_s"] < read_timeout_s
    assert any("failover" in r.getMessage() for r in caplog.records)
    # the writer caught the primary up with what it missed while it was away
    tables = tmp_path / "snapshots" / "features"
    ids = [
        set(DeltaTable(str(tables / name)).to_pyarrow_table(columns=["request_id"])[0].to_pylist())
        for name in ("primary", "secondary")
    ]
    assert ids[0] == ids[1]
    impressions = sum(n for row, n in inline["ctr"].items() if ("is_correction", "False") in row)
    assert len(ids[0]) == impressions  # one snapshot per impression published, on both


def test_an_impression_whose_snapshot_never_comes_is_a_dead_letter_and_the_join_goes_on(
    tmp_path: Path,
) -> None:
    cfg = _config(True, missing_wait_s=0.0)
    pipe, log = make_pipeline(cfg, tmp_path)
    try:
        start = cfg.sim.start_ms
        pipe.tick(start + HOUR)
        samples_before = dict(pipe.join.stats.samples)
        # Three impressions by reference whose request ids no producer ever wrote.
        strays = [
            Impression(10**12 + k, start + HOUR + 60_000 * k, {}, 10**12 + k) for k in range(3)
        ]
        log.append(
            cfg.stream.raw_topic,
            [(imp.imp_id.to_bytes(8, "big"), encode_event(imp), imp.ts_ms) for imp in strays],
        )
        pipe.tick(start + 2 * HOUR)
        dead = pipe.join.stats.dead_letters_by_reason
        assert dead.get("missing snapshot") == 3
        assert pipe.join.stats.samples["ctr"] > samples_before["ctr"]  # the rest joined
        letters = [rec.value for rec in log.read(cfg.stream.dead_letter_topic, 0, 0, 10_000)]
        missing = [v for v in letters if b"missing snapshot: request_id 1000000000000" in v]
        assert len(missing) == 1
    finally:
        pipe.close()
        log.close()
