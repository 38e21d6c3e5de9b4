"""The feature resolver: by-reference impressions get their snapshot's features back, so the join
produces the same samples as from inline features; missing and malformed snapshots fail with a
dead-letter reason, and everything else passes through in place."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from deltalake import write_deltalake
from features_helpers import HOUR_MS, T0, random_features, rows_of

from minutely.clock import ReplayClock
from minutely.config import IngestConfig, JoinConfig, SimConfig, load_config
from minutely.data import samples_to_record_batch
from minutely.errors import StorageError
from minutely.events import (
    INVALID_SNAPSHOT,
    MISSING_SNAPSHOT,
    REASONS,
    Click,
    Conversion,
    Event,
    EventValidator,
    Impression,
)
from minutely.features import FeatureResolver, SnapshotReader, SnapshotWriter
from minutely.join import Joiner
from minutely.schema import Schema
from minutely.sim import Market
from minutely.stream.dead_letters import reason_group


def validator(schema: Schema, **bounds: int) -> EventValidator:
    return EventValidator.from_config(schema, IngestConfig(**bounds))


def by_ref(imp_id: int, ts_ms: int = T0) -> Impression:
    return Impression(imp_id, ts_ms, {}, imp_id)


def write(replicas: tuple[str, str], schema: Schema, ids: list[int], seed: int = 0) -> None:
    with SnapshotWriter(schema, replicas) as writer:
        writer.write(np.array(ids), T0, random_features(schema, len(ids), seed))


@pytest.fixture(scope="module")
def market() -> Market:
    return Market(SimConfig(impressions_per_day=24_000, users=2_000, delay_preset="fast"))


def test_resolved_impressions_join_into_the_samples_of_inline_ones(
    market: Market, schema: Schema, replicas: tuple[str, str]
) -> None:
    start = market.day_start_ms(0) + 10 * HOUR_MS - 20 * 60_000  # two hourly buckets
    batch = market.events_between(start, start + 40 * 60_000)
    with SnapshotWriter(schema, replicas) as writer:
        writer.write(*batch.snapshots())
    inline = batch.events()
    referenced = batch.events(by_reference=True)
    with SnapshotReader(schema, replicas, missing_wait_s=0) as reader:
        resolver = FeatureResolver(reader, validator(schema))
        out, failures = resolver.resolve(referenced)
        asked = reader.stats()["asked"]
    assert failures == {}
    n_imps = sum(isinstance(e, Impression) for e in inline)
    assert n_imps > 500
    assert resolver.stats.resolved == n_imps
    assert (resolver.stats.gets, asked) == (1, n_imps)  # one lookup for the whole batch
    assert len(out) == len(inline)
    dense = [f.name for f in schema.features if f.kind == "dense"]
    for got, ref, want in zip(out, referenced, inline, strict=True):
        if not isinstance(want, Impression):
            assert got is ref  # clicks and conversions pass through, in place
            continue
        assert isinstance(got, Impression)
        assert (got.imp_id, got.ts_ms, got.request_id) == (want.imp_id, want.ts_ms, want.imp_id)
        assert list(got.features) == list(want.features)
        for name, value in want.features.items():
            if name in dense:  # the snapshot holds the logged value as float32
                assert isinstance(value, float)
                assert np.float32(got.features[name]) == np.float32(value)
            else:
                assert got.features[name] == value
    # Joined either way, the samples are the same Arrow rows.
    models = load_config(None).models
    joined = []
    for events in (inline, [e for e in out if e is not None]):
        joiner = Joiner(models, JoinConfig(), schema)
        joiner.process_many(events)
        joiner.flush_all()
        joined.append(joiner.drain())
    for m in models:
        a, b = (samples_to_record_batch(j[m.name], schema) for j in joined)
        assert a.num_rows > 0
        assert a.equals(b), m.name


def test_events_without_references_need_no_lookup(
    schema: Schema, replicas: tuple[str, str]
) -> None:
    feats = rows_of(random_features(schema, 1, seed=3), schema)[0]
    events: list[Event] = [
        Impression(1, T0, feats),
        Impression(2, T0, feats, 2),  # inline features and a request id: nothing to fetch
        Click(1, T0 + 1),
        Conversion(1, T0 + 2),
    ]
    with SnapshotReader(schema, replicas) as reader:
        resolver = FeatureResolver(reader, validator(schema))
        out, failures = resolver.resolve(events)
        asked = reader.stats()["asked"]
    assert (out, failures) == (events, {})
    assert all(a is b for a, b in zip(out, events, strict=True))
    assert (resolver.stats.gets, asked) == (0, 0)


def test_a_missing_snapshot_fails_its_impression_only(
    schema: Schema, replicas: tuple[str, str]
) -> None:
    write(replicas, schema, [1, 2])
    events: list[Event] = [by_ref(1), Click(1, T0 + 5), by_ref(7), by_ref(2)]
    with SnapshotReader(schema, replicas, missing_wait_s=0) as reader:
        resolver = FeatureResolver(reader, validator(schema))
        out, failures = resolver.resolve(events)
    assert failures == {2: f"{MISSING_SNAPSHOT}: request_id 7 after 0 s (imp_id 7)"}
    assert out[2] is None
    assert out[1] is events[1]
    assert [e.imp_id for e in out if isinstance(e, Impression)] == [1, 2]
    assert all(e.features for e in out if isinstance(e, Impression))
    assert (resolver.stats.resolved, resolver.stats.missing, resolver.stats.malformed) == (2, 1, 0)
    assert reason_group(failures[2]) in REASONS


def test_a_pending_snapshot_is_asked_again_until_it_is_written(
    schema: Schema, replicas: tuple[str, str]
) -> None:
    writer = SnapshotWriter(schema, replicas)
    writer.write([1], T0, random_features(schema, 1, seed=4))
    later = random_features(schema, 1, seed=5)
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:  # the producer's write lands while the join waits
        sleeps.append(seconds)
        if len(sleeps) == 2:
            writer.write([2], T0, later)

    try:
        with SnapshotReader(schema, replicas, missing_wait_s=600) as reader:
            resolver = FeatureResolver(reader, validator(schema), poll_s=0.01, sleep=sleep)
            out, failures = resolver.resolve([by_ref(1), by_ref(2)])
    finally:
        writer.close()
    assert failures == {}
    assert sleeps == [0.01, 0.01]
    assert resolver.stats.gets == 3
    assert isinstance(out[1], Impression)
    assert out[1].features == rows_of(later, schema)[0]


def test_a_pending_snapshot_becomes_missing_after_the_readers_wait(
    schema: Schema, replicas: tuple[str, str]
) -> None:
    write(replicas, schema, [1])
    clock = ReplayClock(T0)
    with SnapshotReader(schema, replicas, missing_wait_s=10, clock=clock) as reader:
        resolver = FeatureResolver(
            reader, validator(schema), poll_s=4, sleep=lambda s: clock.advance(int(s * 1000))
        )
        out, failures = resolver.resolve([by_ref(1), by_ref(3, T0 + 1)])
    assert failures == {1: f"{MISSING_SNAPSHOT}: request_id 3 after 10 s (imp_id 3)"}
    assert resolver.stats.gets == 4  # asked at 0, 4, 8 and 12 s
    assert isinstance(out[0], Impression)


def test_a_reader_whose_clock_stands_still_is_waited_for_max_wait_s(
    schema: Schema, replicas: tuple[str, str]
) -> None:
    write(replicas, schema, [1])
    with SnapshotReader(schema, replicas, missing_wait_s=600, clock=ReplayClock(T0)) as reader:
        resolver = FeatureResolver(
            reader, validator(schema), poll_s=0.01, max_wait_s=0.05, sleep=lambda s: None
        )
        out, failures = resolver.resolve([by_ref(4)])
    assert out == [None]
    assert failures == {0: f"{MISSING_SNAPSHOT}: request_id 4 after 0.05 s (imp_id 4)"}
    assert resolver.stats.gets >= 2


def test_a_malformed_snapshot_row_is_an_invalid_snapshot(
    schema: Schema, replicas: tuple[str, str]
) -> None:
    good = rows_of(random_features(schema, 2, seed=0), schema)
    good[1]["ad_ctr_1h"] = float("nan")
    columns = {
        "request_id": pa.array([1, 2], pa.int64()),
        "ts_ms": pa.array([T0, T0], pa.int64()),
        "bucket": pa.array([T0 // HOUR_MS] * 2, pa.int64()),
    }
    types = {"sparse": pa.int64(), "dense": pa.float32(), "multi_sparse": pa.list_(pa.int64())}
    for spec in schema.features:
        columns[spec.name] = pa.array([row[spec.name] for row in good], types[spec.kind])
    for url in replicas:  # rows written by another producer, without the writer's checks
        write_deltalake(url, pa.table(columns), mode="append", partition_by=["bucket"])
    with SnapshotReader(schema, replicas, missing_wait_s=0) as reader:
        resolver = FeatureResolver(reader, validator(schema))
        out, failures = resolver.resolve([by_ref(1), by_ref(2)])
    assert failures == {
        1: f"{INVALID_SNAPSHOT}: request_id 2: snapshot in {replicas[0]}: feature 'ad_ctr_1h': "
        "expected a finite float32, got nan (imp_id 2)"
    }
    assert out[1] is None
    assert isinstance(out[0], Impression)
    assert (resolver.stats.resolved, resolver.stats.malformed) == (1, 1)


def test_features_the_validator_refuses_are_an_invalid_snapshot(
    schema: Schema, replicas: tuple[str, str]
) -> None:
    feats = random_features(schema, 2, seed=0)
    feats["user_interests"] = (np.array([1, 2, 3, 4]), np.array([0, 1, 4]))
    with SnapshotWriter(schema, replicas) as writer:
        writer.write([5, 6], T0, feats)
    with SnapshotReader(schema, replicas, missing_wait_s=0) as reader:
        resolver = FeatureResolver(reader, validator(schema, max_ids_per_feature=2))
        out, failures = resolver.resolve([Impression(50, T0, {}, 5), Impression(60, T0, {}, 6)])
    assert failures == {
        1: f"{INVALID_SNAPSHOT}: request_id 6: feature 'user_interests' expected at most 2 ids, "
        "got 3 (imp_id 60)"
    }
    assert isinstance(out[0], Impression)
    assert (out[0].imp_id, out[0].request_id) == (50, 5)
    assert reason_group(failures[1]) in REASONS
    assert resolver.stats.malformed == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"poll_s": 0}, r"^poll_s: expected a number of seconds > 0, got 0$"),
        ({"max_wait_s": -1.0}, r"^max_wait_s: expected a number of seconds >= 0, got -1\.0$"),
    ],
)
def test_bad_waits_are_refused(
    schema: Schema, replicas: tuple[str, str], kwargs: dict[str, float], message: str
) -> None:
    with SnapshotReader(schema, replicas) as reader, pytest.raises(ValueError, match=message):
        FeatureResolver(reader, validator(schema), **kwargs)


def test_the_default_wait_outlasts_the_readers_own(
    schema: Schema, replicas: tuple[str, str]
) -> None:
    with SnapshotReader(schema, replicas, missing_wait_s=30, read_timeout_s=2) as reader:
        resolver = FeatureResolver(reader, validator(schema), poll_s=0.5)
    assert resolver.max_wait_s == 30 + 2 * 2 + 0.5


def test_a_reader_that_cannot_answer_fails_the_batch_not_the_events(
    schema: Schema, replicas: tuple[str, str]
) -> None:
    reader = SnapshotReader(schema, replicas)
    resolver = FeatureResolver(reader, validator(schema))
    reader.close()
    with pytest.raises(StorageError, match=r"expected an open reader, got a closed one"):
        resolver.resolve([Click(1, T0), by_ref(1)])
    assert resolver.resolve([Click(1, T0)]) == ([Click(1, T0)], {})  # nothing to look up
