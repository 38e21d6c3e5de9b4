"""TopicReader over every log backend: fair polling, time-bounded reads, resumable positions."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

import minutely.stream.reader as reader_module
from minutely.errors import OffsetOutOfRangeError, StreamError, TopicNotFoundError
from minutely.stream import Log, Record, TopicReader

NewTopic = Callable[[str], str]


def fill(log: Log, topic: str, partition: int, ts: list[int]) -> None:
    log.append(topic, [(None, f"p{partition}@{t}".encode(), t) for t in ts], partition=partition)


def where(records: list[Record]) -> list[tuple[int, int]]:
    return [(r.partition, r.offset) for r in records]


def test_poll_shares_max_records_round_robin(log: Log, new_topic: NewTopic) -> None:
    t = new_topic("events")
    log.create_topic(t, 3)
    for p in range(3):
        fill(log, t, p, list(range(10)))
    reader = TopicReader(log, t)
    got = reader.poll(6)
    assert where(got) == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    # The next poll starts one partition later, so a small budget cannot starve the last one.
    assert [r.partition for r in reader.poll(2)] == [1, 2]
    assert [r.partition for r in reader.poll(1)] == [2]
    assert reader.positions() == {0: 2, 1: 3, 2: 4}


def test_poll_gives_an_idle_partitions_share_to_the_others(log: Log, new_topic: NewTopic) -> None:
    t = new_topic("events")
    log.create_topic(t, 3)
    fill(log, t, 0, list(range(10)))
    fill(log, t, 2, [1, 2])
    reader = TopicReader(log, t)
    got = reader.poll(9)
    assert len(got) == 9
    assert [r.offset for r in got if r.partition == 2] == [0, 1]
    assert [r.offset for r in got if r.partition == 0] == list(range(7))
    assert len(reader.poll(100)) == 3
    assert reader.poll(100) == []
    assert reader.lag() == 0


def test_read_until_stops_each_partition_at_its_first_record_not_before(
    log: Log, new_topic: NewTopic
) -> None:
    t = new_topic("events")
    log.create_topic(t, 2)
    fill(log, t, 0, [10, 20, 20, 30])
    fill(log, t, 1, [5, 15, 25])
    reader = TopicReader(log, t)
    got = reader.read_until(20)
    assert [r.ts_ms for r in got] == [5, 10, 15]  # merged in event time
    assert reader.positions() == {0: 1, 1: 2}
    assert reader.read_until(20) == []  # the ts-20 records wait for a later bound
    assert [(r.partition, r.ts_ms) for r in reader.read_until(26)] == [(0, 20), (0, 20), (1, 25)]
    assert reader.lag() == 1
    assert [r.ts_ms for r in reader.read_until(10**15)] == [30]


def test_read_until_with_a_limit_returns_the_earliest_and_leaves_the_rest(
    log: Log, new_topic: NewTopic
) -> None:
    t = new_topic("events")
    log.create_topic(t, 3)
    fill(log, t, 0, [1, 4, 7, 10])
    fill(log, t, 1, [2, 5, 8])
    fill(log, t, 2, [3, 3, 9])
    reader = TopicReader(log, t)
    first = reader.read_until(9, max_records=4)
    assert [r.ts_ms for r in first] == [1, 2, 3, 3]
    assert reader.positions() == {0: 1, 1: 1, 2: 2}
    assert [r.ts_ms for r in reader.read_until(9)] == [4, 5, 7, 8]
    assert reader.positions() == {0: 3, 1: 3, 2: 2}


def test_read_until_ties_in_time_go_to_the_lower_partition(log: Log, new_topic: NewTopic) -> None:
    t = new_topic("events")
    log.create_topic(t, 2)
    fill(log, t, 1, [5, 5])
    fill(log, t, 0, [5])
    assert where(TopicReader(log, t).read_until(6, max_records=2)) == [(0, 0), (1, 0)]


def test_read_until_without_a_limit_reads_past_one_backend_read(
    log: Log, new_topic: NewTopic, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reader_module, "_CHUNK", 3)
    t = new_topic("events")
    log.create_topic(t, 1)
    fill(log, t, 0, list(range(11)))
    reader = TopicReader(log, t)
    assert [r.ts_ms for r in reader.read_until(9)] == list(range(9))
    assert [r.ts_ms for r in reader.read_until(100)] == [9, 10]


def test_positions_are_a_copy_and_lag_counts_what_is_left(log: Log, new_topic: NewTopic) -> None:
    t = new_topic("events")
    log.create_topic(t, 2)
    fill(log, t, 0, [1, 2, 3])
    reader = TopicReader(log, t, {1: 0})
    snapshot = reader.positions()
    snapshot[0] = 99
    assert reader.positions() == {0: 0, 1: 0}
    assert reader.lag() == 3
    reader.poll(2)
    fill(log, t, 1, [4])
    assert reader.lag() == 2


def test_snapshot_and_restore_resume_after_the_last_returned_record(
    log: Log, new_topic: NewTopic
) -> None:
    t = new_topic("events")
    n = 3
    log.create_topic(t, n)
    rng = random.Random(11)
    for p in range(n):
        fill(log, t, p, sorted(rng.randrange(1_000) for _ in range(rng.randrange(20, 60))))
    total = sum(log.end_offset(t, p) for p in range(n))
    for seed in range(5):
        rng = random.Random(seed)
        reader = TopicReader(log, t)
        seen: list[tuple[int, int]] = []
        bound = 0
        while reader.lag():
            if rng.random() < 0.5:
                seen += where(reader.poll(rng.randrange(1, 12)))
            else:
                bound += rng.randrange(0, 120)
                limit = rng.choice([None, rng.randrange(1, 12)])
                seen += where(reader.read_until(bound, limit))
            if rng.random() < 0.3:  # "crash": a new reader from the last snapshot
                reader = TopicReader(log, t, reader.positions())
        assert len(seen) == total
        assert sorted(seen) == [(p, o) for p in range(n) for o in range(log.end_offset(t, p))]


def test_bad_positions_and_limits_are_refused(log: Log, new_topic: NewTopic) -> None:
    t = new_topic("events")
    log.create_topic(t, 2)
    fill(log, t, 0, [1, 2])
    with pytest.raises(StreamError, match=rf"'{t}': positions name partition 2, expected one of 0"):
        TopicReader(log, t, {2: 0})
    with pytest.raises(OffsetOutOfRangeError, match=r"position 3 of partition 0 .*\[0, 2\]"):
        TopicReader(log, t, {0: 3})
    with pytest.raises(OffsetOutOfRangeError, match=r"position -1 of partition 1 .*\[0, 0\]"):
        TopicReader(log, t, {1: -1})
    reader = TopicReader(log, t)
    with pytest.raises(StreamError, match=r"max_records must be an int >= 1, got 0"):
        reader.poll(0)
    with pytest.raises(StreamError, match=r"max_records must be an int >= 1, got -2"):
        reader.read_until(5, max_records=-2)
    with pytest.raises(TopicNotFoundError, match="missing"):
        TopicReader(log, new_topic("missing"))
