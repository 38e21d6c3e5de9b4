"""TopicReader over every log backend: fair polling, time-bounded reads, resumable positions.

Records are named by their partition and their index within it (offsets may have gaps), and
positions are compared with the offsets the appends returned.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

import pytest

import minutely.stream.reader as reader_module
from minutely.errors import OffsetOutOfRangeError, StreamError, TopicNotFoundError
from minutely.stream import Log, Record, TopicReader

NewTopic = Callable[[str], str]


class Placed:
    """The offsets appended to each partition of one topic, in order."""

    def __init__(self, log: Log, topic: str) -> None:
        self.log, self.topic = log, topic
        self.offsets: dict[int, list[int]] = {}

    def fill(self, partition: int, ts: list[int]) -> None:
        messages = [(None, f"p{partition}@{t}".encode(), t) for t in ts]
        placed = self.log.append(self.topic, messages, partition=partition)
        self.offsets.setdefault(partition, []).extend(off for _, off in placed)

    def where(self, records: list[Record]) -> list[tuple[int, int]]:
        """(partition, index within the partition) of each record."""
        return [(r.partition, self.offsets[r.partition].index(r.offset)) for r in records]

    def after(self, **counts: int) -> dict[int, int]:
        """Positions after the first ``counts["p<n>"]`` records of partition n (others: 0)."""
        out: dict[int, int] = {}
        for p in range(self.log.partitions(self.topic)):
            k = counts.get(f"p{p}", 0)
            out[p] = self.offsets[p][k - 1] + 1 if k else 0
        return out


@pytest.fixture
def placed(log: Log, new_topic: NewTopic) -> Placed:
    return Placed(log, new_topic("events"))


@pytest.fixture
def open_reader(log: Log) -> Iterator[Callable[..., TopicReader]]:
    """Builds readers that are closed after the test."""
    readers: list[TopicReader] = []

    def make(topic: str, positions: dict[int, int] | None = None) -> TopicReader:
        readers.append(TopicReader(log, topic, positions))
        return readers[-1]

    yield make
    for r in readers:
        r.close()


def test_poll_shares_max_records_round_robin(
    log: Log, placed: Placed, open_reader: Callable[..., TopicReader]
) -> None:
    log.create_topic(placed.topic, 3)
    for p in range(3):
        placed.fill(p, list(range(1, 11)))
    reader = open_reader(placed.topic)
    got = reader.poll(6)
    assert placed.where(got) == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    # The next poll starts one partition later, so a small budget cannot starve the last one.
    assert [r.partition for r in reader.poll(2)] == [1, 2]
    assert [r.partition for r in reader.poll(1)] == [2]
    assert reader.positions() == placed.after(p0=2, p1=3, p2=4)


def test_poll_gives_an_idle_partitions_share_to_the_others(
    log: Log, placed: Placed, open_reader: Callable[..., TopicReader]
) -> None:
    log.create_topic(placed.topic, 3)
    placed.fill(0, list(range(1, 11)))
    placed.fill(2, [1, 2])
    placed.offsets[1] = []
    reader = open_reader(placed.topic)
    got = reader.poll(9)
    assert len(got) == 9
    assert [i for p, i in placed.where(got) if p == 2] == [0, 1]
    assert [i for p, i in placed.where(got) if p == 0] == list(range(7))
    assert len(reader.poll(100)) == 3
    assert reader.poll(100) == []
    assert reader.lag() == 0


def test_read_until_stops_each_partition_at_its_first_record_not_before(
    log: Log, placed: Placed, open_reader: Callable[..., TopicReader]
) -> None:
    log.create_topic(placed.topic, 2)
    placed.fill(0, [10, 20, 20, 30])
    placed.fill(1, [5, 15, 25])
    reader = open_reader(placed.topic)
    got = reader.read_until(20)
    assert [r.ts_ms for r in got] == [5, 10, 15]  # merged in event time
    assert reader.positions() == placed.after(p0=1, p1=2)
    assert reader.read_until(20) == []  # the ts-20 records wait for a later bound
    assert [(r.partition, r.ts_ms) for r in reader.read_until(26)] == [(0, 20), (0, 20), (1, 25)]
    assert reader.lag() == placed.offsets[0][-1] + 1 - placed.offsets[0][3]
    assert [r.ts_ms for r in reader.read_until(10**15)] == [30]
    assert reader.lag() == 0


def test_read_until_with_a_limit_returns_the_earliest_and_leaves_the_rest(
    log: Log, placed: Placed, open_reader: Callable[..., TopicReader]
) -> None:
    log.create_topic(placed.topic, 3)
    placed.fill(0, [1, 4, 7, 10])
    placed.fill(1, [2, 5, 8])
    placed.fill(2, [3, 3, 9])
    reader = open_reader(placed.topic)
    first = reader.read_until(9, max_records=4)
    assert [r.ts_ms for r in first] == [1, 2, 3, 3]
    assert reader.positions() == placed.after(p0=1, p1=1, p2=2)
    assert [r.ts_ms for r in reader.read_until(9)] == [4, 5, 7, 8]
    assert reader.positions() == placed.after(p0=3, p1=3, p2=2)


def test_read_until_ties_in_time_go_to_the_lower_partition(
    log: Log, placed: Placed, open_reader: Callable[..., TopicReader]
) -> None:
    log.create_topic(placed.topic, 2)
    placed.fill(1, [5, 5])
    placed.fill(0, [5])
    got = open_reader(placed.topic).read_until(6, max_records=2)
    assert placed.where(got) == [(0, 0), (1, 0)]


def test_read_until_without_a_limit_reads_past_one_consumer_poll(
    log: Log,
    placed: Placed,
    open_reader: Callable[..., TopicReader],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(reader_module, "_CHUNK", 3)
    log.create_topic(placed.topic, 1)
    placed.fill(0, list(range(1, 12)))
    reader = open_reader(placed.topic)
    assert [r.ts_ms for r in reader.read_until(10)] == list(range(1, 10))
    assert [r.ts_ms for r in reader.read_until(100)] == [10, 11]


def test_positions_are_a_copy_and_lag_is_the_distance_to_the_end(
    log: Log, placed: Placed, open_reader: Callable[..., TopicReader]
) -> None:
    log.create_topic(placed.topic, 2)
    placed.fill(0, [1, 2, 3])
    reader = open_reader(placed.topic, {1: 0})
    snapshot = reader.positions()
    snapshot[0] = 99
    assert reader.positions() == {0: 0, 1: 0}
    assert reader.lag() == log.end_offset(placed.topic, 0)
    got = reader.poll(2)
    placed.fill(1, [4])
    ends = [log.end_offset(placed.topic, p) for p in range(2)]
    assert reader.lag() == ends[0] - (got[-1].offset + 1) + ends[1]


def test_snapshot_and_restore_resume_after_the_last_returned_record(
    log: Log, placed: Placed, open_reader: Callable[..., TopicReader]
) -> None:
    n = 3
    log.create_topic(placed.topic, n)
    rng = random.Random(11)
    for p in range(n):
        placed.fill(p, sorted(rng.randrange(1, 1_000) for _ in range(rng.randrange(20, 60))))
    everything = sorted((p, i) for p in range(n) for i in range(len(placed.offsets[p])))
    for seed in range(5):
        rng = random.Random(seed)
        reader = open_reader(placed.topic)
        seen: list[tuple[int, int]] = []
        bound = 0
        while reader.lag():
            if rng.random() < 0.5:
                seen += placed.where(reader.poll(rng.randrange(1, 12)))
            else:
                bound += rng.randrange(0, 120)
                limit = rng.choice([None, rng.randrange(1, 12)])
                seen += placed.where(reader.read_until(bound, limit))
            if rng.random() < 0.3:  # "crash": a new reader from the last snapshot
                reader = open_reader(placed.topic, reader.positions())
        assert sorted(seen) == everything


def test_bad_positions_and_limits_are_refused(
    log: Log, placed: Placed, open_reader: Callable[..., TopicReader], new_topic: NewTopic
) -> None:
    t = placed.topic
    log.create_topic(t, 2)
    placed.fill(0, [1, 2])
    end = log.end_offset(t, 0)
    with pytest.raises(StreamError, match=rf"'{t}': positions name partition 2, expected one of 0"):
        TopicReader(log, t, {2: 0})
    with pytest.raises(
        OffsetOutOfRangeError, match=rf"position {end + 1} of partition 0 .*\[0, {end}\]"
    ):
        TopicReader(log, t, {0: end + 1})
    with pytest.raises(OffsetOutOfRangeError, match=r"position -1 of partition 1 .*\[0, 0\]"):
        TopicReader(log, t, {1: -1})
    reader = open_reader(t)
    with pytest.raises(StreamError, match=r"max_records must be an int >= 1, got 0"):
        reader.poll(0)
    with pytest.raises(StreamError, match=r"max_records must be an int >= 1, got -2"):
        reader.read_until(5, max_records=-2)
    with pytest.raises(TopicNotFoundError, match="missing"):
        TopicReader(log, new_topic("missing"))


def test_read_until_does_not_stall_on_a_far_future_record(
    log: Log, placed: Placed, open_reader: Callable[..., TopicReader]
) -> None:
    now = 1_767_225_600_000
    day = 86_400_000
    log.create_topic(placed.topic, 2)
    placed.fill(0, [now - 900, now - 800, now + day, now - 700, now - 600])
    placed.fill(1, [now - 850, now - 750, now - 650, now + 1_000])
    reader = open_reader(placed.topic)
    got = reader.read_until(now, horizon_ms=300_000)
    # The skewed record comes right after the record before it in its partition, and the
    # records behind it still come; the one a second ahead waits, as it should.
    assert [(r.partition, r.ts_ms - now) for r in got] == [
        (0, -900),
        (1, -850),
        (0, -800),
        (0, day),
        (1, -750),
        (0, -700),
        (1, -650),
        (0, -600),
    ]
    assert reader.positions() == placed.after(p0=5, p1=3)
    assert reader.read_until(now, horizon_ms=300_000) == []
    assert [r.ts_ms - now for r in reader.read_until(now + 1_001, horizon_ms=300_000)] == [1_000]
    assert reader.lag() == 0


def test_read_until_returns_a_far_future_record_at_the_head_first(
    log: Log, placed: Placed, open_reader: Callable[..., TopicReader]
) -> None:
    log.create_topic(placed.topic, 2)
    placed.fill(0, [10, 20])
    placed.fill(1, [10**12, 5, 15])
    reader = open_reader(placed.topic)
    got = reader.read_until(100, max_records=3, horizon_ms=1_000)
    assert [(r.partition, r.ts_ms) for r in got] == [(1, 10**12), (1, 5), (0, 10)]
    assert reader.positions() == placed.after(p0=1, p1=2)
    # Records within the horizon wait for their time as without one.
    placed.fill(1, [500, 16])
    assert [r.ts_ms for r in reader.read_until(100, horizon_ms=1_000)] == [15, 20]


def test_read_until_refuses_a_negative_horizon(
    log: Log, placed: Placed, open_reader: Callable[..., TopicReader]
) -> None:
    log.create_topic(placed.topic, 1)
    with pytest.raises(StreamError, match=r"horizon_ms must be an int >= 0 or None, got -1"):
        open_reader(placed.topic).read_until(5, horizon_ms=-1)


def test_a_closed_reader_keeps_its_positions(log: Log, placed: Placed) -> None:
    log.create_topic(placed.topic, 1)
    placed.fill(0, [1, 2, 3])
    with TopicReader(log, placed.topic) as reader:
        assert len(reader.poll(2)) == 2
    assert reader.positions() == placed.after(p0=2)
    with TopicReader(log, placed.topic, reader.positions()) as resumed:
        assert [r.ts_ms for r in resumed.poll(10)] == [3]
