from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake
from features_helpers import HOUR_MS, T0, random_features, rows_of, table_rows

from minutely.clock import ReplayClock
from minutely.config import FeaturesConfig, SimConfig
from minutely.errors import SchemaError, StorageError
from minutely.features import SnapshotReader, SnapshotWriter, arrow_schema
from minutely.schema import FeatureSpec, Schema
from minutely.sim import Market
from minutely.sim.batch import IMPRESSION
from minutely.sim.traffic import slice_features


def test_simulated_impressions_round_trip_through_two_replicas(
    schema: Schema, replicas: tuple[str, str], tmp_path: object
) -> None:
    market = Market(SimConfig(impressions_per_day=24_000, users=2_000, delay_preset="fast"))
    start = market.day_start_ms(0) + 9 * HOUR_MS
    batch = market.events_between(start, start + 2 * HOUR_MS)
    imp = batch.kind == IMPRESSION
    ids, ts = batch.imp_id[imp], batch.ts_ms[imp]
    n = len(ids)
    assert n > 1_000
    with SnapshotWriter(schema, replicas) as writer:
        for lo in range(0, n, 400):  # a producer writes before it publishes each slice
            hi = min(lo + 400, n)
            result = writer.write(
                ids[lo:hi], ts[lo:hi], slice_features(batch.features, schema, lo, hi)
            )
            assert result.committed == replicas
            assert result.rows == hi - lo
            assert result.lagging == {}
        assert writer.stats()["rows"] == n
    with SnapshotReader(schema, replicas, missing_wait_s=60) as reader:
        got = reader.get(ids, ts)
    assert got.pending == got.missing == []
    assert got.malformed == {}
    assert got.ids.tolist() == ids.tolist()
    for spec in schema.features:
        want, have = batch.features[spec.name], got.features[spec.name]
        if spec.kind == "multi_sparse":
            assert have[0].tolist() == want[0].tolist()
            assert have[1].tolist() == want[1].tolist()
        else:
            assert have.dtype == want.dtype
            assert have.tolist() == want.tolist()
    # as dicts: the logged impressions' features, dense values as their float32
    expected = batch.feature_dicts()
    for k in (0, n // 2, n - 1):
        row = got.found[int(ids[k])]
        for spec in schema.features:
            if spec.kind == "dense":
                assert np.float32(row[spec.name]) == np.float32(expected[k][spec.name])
            else:
                assert row[spec.name] == expected[k][spec.name]


def test_both_replicas_hold_the_same_rows_one_commit_per_write(
    schema: Schema, replicas: tuple[str, str]
) -> None:
    with SnapshotWriter(schema, replicas) as writer:
        for k in range(3):
            ids = np.arange(k * 50, k * 50 + 50)
            writer.write(ids, T0 + k * HOUR_MS // 2, random_features(schema, 50, seed=k))
    a, b = table_rows(replicas[0]), table_rows(replicas[1])
    assert a.num_rows == 150
    assert a.equals(b)
    for url in replicas:
        table = DeltaTable(url)
        assert table.version() == 3  # the creation, then one commit per write
        assert table.metadata().partition_columns == ["bucket"]
        assert sorted(p["bucket"] for p in table.partitions()) == [
            str(T0 // HOUR_MS),
            str(T0 // HOUR_MS + 1),
        ]


def test_one_call_looks_up_ids_of_several_buckets_in_the_order_asked(
    schema: Schema, replicas: tuple[str, str]
) -> None:
    feats = [random_features(schema, 100, seed=h) for h in range(3)]
    with SnapshotWriter(schema, replicas) as writer:
        for h in range(3):
            writer.write(np.arange(h * 1000, h * 1000 + 100), T0 + h * HOUR_MS + 5, feats[h])
    rng = np.random.default_rng(0)
    hours = rng.integers(0, 3, 60)
    rows = rng.integers(0, 100, 60)
    _, first = np.unique(hours * 1000 + rows, return_index=True)
    hours, rows = hours[np.sort(first)], rows[np.sort(first)]
    ids = hours * 1000 + rows
    with SnapshotReader(schema, replicas, cache_buckets=1) as reader:
        got = reader.get(ids, T0 + hours * HOUR_MS + 5)
        assert got.ids.tolist() == ids.tolist()
        per_hour = [rows_of(f, schema) for f in feats]
        assert rows_of(got.features, schema) == [
            per_hour[h][r] for h, r in zip(hours, rows, strict=True)
        ]
        stats = reader.stats()
        # the three buckets were read for this call, then all but the last used evicted
        assert stats["buckets_cached"] == 1
        assert stats["evictions"] == 2
        again = reader.get(ids[:5], T0 + hours[:5] * HOUR_MS + 5)
        assert again.ids.tolist() == ids[:5].tolist()


def test_an_id_asked_twice_in_one_call_comes_back_once(
    schema: Schema, replicas: tuple[str, str]
) -> None:
    with SnapshotWriter(schema, replicas) as writer:
        writer.write(np.arange(3), T0, random_features(schema, 3, seed=0))
    with SnapshotReader(schema, replicas) as reader:
        got = reader.get([2, 0, 2, 1, 0], T0)
    assert got.ids.tolist() == [2, 0, 1]
    assert list(got.found) == [2, 0, 1]


def test_an_absent_id_is_pending_until_the_wait_then_missing(
    schema: Schema, replicas: tuple[str, str]
) -> None:
    clock = ReplayClock(T0)
    with SnapshotWriter(schema, replicas) as writer:
        writer.write(np.arange(10), T0, random_features(schema, 10, seed=0))
        with SnapshotReader(schema, replicas, missing_wait_s=30, clock=clock) as reader:
            got = reader.get([1, 99, 98], T0)
            assert got.ids.tolist() == [1]
            assert got.pending == [99, 98]
            assert got.missing == []
            clock.advance(29_999)
            got = reader.get([99, 98], T0)
            assert (got.pending, got.missing) == ([99, 98], [])
            # written late: found by the refresh that a miss triggers
            writer.write(np.array([98]), T0, random_features(schema, 1, seed=1))
            got = reader.get([99, 98], T0)
            assert got.ids.tolist() == [98]
            assert (got.pending, got.missing) == ([99], [])
            clock.advance(1)
            got = reader.get([99], T0)
            assert (got.ids.tolist(), got.pending, got.missing) == ([], [], [99])
            stats = reader.stats()
            assert stats["missing"] == 1
            assert stats["pending"] == 0
            assert stats["cross_checks"] == 1  # the other replica was asked before reporting it
            # asked again later: the wait starts over
            assert reader.get([99], T0).pending == [99]


def test_zero_wait_reports_an_absent_id_missing_at_once(
    schema: Schema, replicas: tuple[str, str]
) -> None:
    with SnapshotWriter(schema, replicas) as writer:
        writer.write(np.arange(3), T0, random_features(schema, 3, seed=0))
    with SnapshotReader(schema, replicas, missing_wait_s=0) as reader:
        got = reader.get([0, 5], [T0, T0 + 2 * HOUR_MS])
    assert got.ids.tolist() == [0]
    assert got.missing == [5]


def _foreign_table(url: str, table: pa.Table) -> None:
    """A table written by another producer: nullable columns, no checks."""
    write_deltalake(url, table, mode="append", partition_by=["bucket"])


def test_malformed_rows_come_back_with_their_reason(
    schema: Schema, replicas: tuple[str, str]
) -> None:
    good = random_features(schema, 4, seed=0)
    columns: dict[str, pa.Array] = {
        "request_id": pa.array([1, 2, 3, 4, None, 6], pa.int64()),
        "ts_ms": pa.array([T0] * 6, pa.int64()),
        "bucket": pa.array([T0 // HOUR_MS] * 6, pa.int64()),
    }
    for spec in schema.features:
        if spec.kind == "sparse":
            values = [*good[spec.name].tolist(), 7, 8]
            if spec.name == "ad_id":
                values[1] = None
            columns[spec.name] = pa.array(values, pa.int64())
        elif spec.kind == "dense":
            values = [*good[spec.name].tolist(), 0.5, 0.5]
            if spec.name == "ad_ctr_1h":
                values[2] = float("nan")
            columns[spec.name] = pa.array(values, pa.float32())
        else:
            lists = [rows_of(good, schema)[i][spec.name] for i in range(4)] + [[1], [2]]
            lists[3] = [5, None]
            columns[spec.name] = pa.array(lists, pa.list_(pa.int64()))
    for url in replicas:
        _foreign_table(url, pa.table(columns))
    with SnapshotReader(schema, replicas, missing_wait_s=0) as reader:
        got = reader.get([1, 2, 3, 4, 6], T0)
        stats = reader.stats()
    assert got.ids.tolist() == [1, 6]
    url = replicas[0]
    assert got.malformed == {
        2: f"snapshot in {url}: feature 'ad_id': expected an int64 id, got None",
        3: f"snapshot in {url}: feature 'ad_ctr_1h': expected a finite float32, got nan",
        4: f"snapshot in {url}: feature 'user_interests': expected a list of int64 ids, got a "
        "list holding a null",
    }
    assert stats["malformed"] == 3
    assert stats["unkeyed_rows"] == 1  # a row without a request id cannot be reported
    assert got.found[1] == rows_of(good, schema)[0]


def test_a_table_without_a_feature_column_makes_every_row_malformed(
    schema: Schema, replicas: tuple[str, str]
) -> None:
    feats = random_features(schema, 2, seed=0)
    columns = {
        "request_id": pa.array([1, 2], pa.int64()),
        "ts_ms": pa.array([T0, T0], pa.int64()),
        "bucket": pa.array([T0 // HOUR_MS] * 2, pa.int64()),
    }
    for spec in schema.features:
        if spec.name == "slot":
            continue  # another producer's schema
        col = feats[spec.name]
        if spec.kind == "multi_sparse":
            columns[spec.name] = pa.array([r[spec.name] for r in rows_of(feats, schema)])
        elif spec.name == "ad_ctr_1h":
            columns[spec.name] = pa.array(col.astype(np.float64))  # double, not float
        else:
            columns[spec.name] = pa.array(col)
    for url in replicas:
        _foreign_table(url, pa.table(columns))
    with SnapshotReader(schema, replicas, missing_wait_s=0) as reader:
        got = reader.get([1, 2], T0)
    assert len(got.ids) == 0
    reason = (
        f"snapshot table {replicas[0]}: no column 'slot'; column 'ad_ctr_1h' is double, "
        "expected float"
    )
    assert got.malformed == {1: reason, 2: reason}


def test_a_writer_refuses_a_table_of_another_schema(
    schema: Schema, replicas: tuple[str, str]
) -> None:
    other = Schema((FeatureSpec("user_id", "sparse"), FeatureSpec("score", "dense")))
    with SnapshotWriter(other, replicas) as writer:
        writer.write([1], T0, {"user_id": np.array([3]), "score": np.array([0.5])})
    with pytest.raises(
        SchemaError,
        match=r"feature replica .*primary: expected a snapshot table "
        r"for this schema, got a table whose columns differ: no column 'ad_id'",
    ):
        SnapshotWriter(schema, replicas)


def test_a_bad_batch_writes_nothing(schema: Schema, replicas: tuple[str, str]) -> None:
    with SnapshotWriter(schema, replicas) as writer:
        feats = random_features(schema, 2, seed=0)
        feats["ad_age_hours"] = np.array([1.0, np.inf])
        with pytest.raises(SchemaError, match=r"feature 'ad_age_hours': expected finite numbers"):
            writer.write([1, 2], T0, feats)
        assert writer.stats()["rows"] == 0
    assert DeltaTable(replicas[0]).version() == 0  # created, nothing appended


def test_readers_and_writers_are_built_from_the_config(schema: Schema, tmp_path: object) -> None:
    from pathlib import Path

    run = Path(str(tmp_path))
    cfg = FeaturesConfig(replicas=("snap/a", "snap/b"), missing_wait_s=0)
    with SnapshotWriter.from_config(schema, cfg, run) as writer:
        writer.write([5], T0, random_features(schema, 1, seed=0))
    assert DeltaTable(str(run / "snap" / "a")).version() == 1
    with SnapshotReader.from_config(schema, cfg, run) as reader:
        assert reader.get([5, 6], T0).missing == [6]
        assert reader.current == str(run / "snap" / "a")


def test_closed_readers_and_writers_refuse_calls(schema: Schema, replicas: tuple[str, str]) -> None:
    writer = SnapshotWriter(schema, replicas)
    writer.close()
    with pytest.raises(StorageError, match=r"expected an open writer, got a closed one"):
        writer.write([1], T0, random_features(schema, 1, seed=0))
    reader = SnapshotReader(schema, replicas)
    reader.close()
    with pytest.raises(StorageError, match=r"expected an open reader, got a closed one"):
        reader.get([1], T0)


def test_arguments_are_checked(schema: Schema, replicas: tuple[str, str]) -> None:
    with pytest.raises(StorageError, match=r"expected 2 different replicas, got \['a', 'a'\]"):
        SnapshotReader(schema, ["a", "a"])
    with pytest.raises(StorageError, match=r"expected 2 different replicas, got \['a'\]"):
        SnapshotWriter(schema, ["a"])
    with pytest.raises(ValueError, match=r"read_timeout_s: expected >= 1e-09, got 0"):
        SnapshotReader(schema, replicas, read_timeout_s=0)
    with pytest.raises(ValueError, match=r"max_backlog_rows: expected >= 1, got 0"):
        SnapshotWriter(schema, replicas, max_backlog_rows=0)
    with SnapshotReader(schema, replicas) as reader:
        with pytest.raises(ValueError, match=r"ts_ms: expected one integer or 2 integers, got"):
            reader.get([1, 2], [T0])
        with pytest.raises(ValueError, match=r"request_ids: expected a 1-d array of integers"):
            reader.get(np.array([1.5]), T0)
    assert arrow_schema(schema).names[0] == "request_id"
