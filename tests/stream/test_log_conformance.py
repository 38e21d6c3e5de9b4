"""The checks every log backend passes, written against the ``Log`` protocol only.

Offsets are only assumed to increase (a backend may leave gaps), and a batch is only assumed to be
refused whole when a message in it is malformed (a crash may leave part of a batch written on a
backend without atomic batches).
"""

from __future__ import annotations

import itertools
import multiprocessing
import re
import time
from collections.abc import Callable
from multiprocessing.synchronize import Barrier, Event
from typing import Any

import pytest
from stream_backends import LogFactory

from minutely.errors import OffsetOutOfRangeError, StreamError, TopicNotFoundError
from minutely.stream import Headers, Log, Message, Record, partition_for

NewTopic = Callable[[str], str]

# spawn, not fork: a child starts clean, as a separate stage process does, and backends whose
# clients run threads (Kafka's) are not safe to fork.
_MP = multiprocessing.get_context("spawn")
_PROC_TIMEOUT_S = 60.0


def msgs(n: int, prefix: str = "m", ts0: int = 1_000) -> list[Message]:
    return [(None, f"{prefix}{i}".encode(), ts0 + i) for i in range(n)]


def read_all(log: Log, topic: str, partition: int) -> list[Record]:
    out: list[Record] = []
    while batch := log.read(topic, partition, out[-1].offset + 1 if out else 0, 1_000):
        out.extend(batch)
    return out


def increasing(offsets: list[int]) -> bool:
    return all(a < b for a, b in itertools.pairwise(offsets))


# --- topics ---------------------------------------------------------------------------------


def test_create_topic_sets_partition_count_and_starts_empty(log: Log, new_topic: NewTopic) -> None:
    t = new_topic("events")
    log.create_topic(t, 3)
    assert log.partitions(t) == 3
    assert [log.end_offset(t, p) for p in range(3)] == [0, 0, 0]


def test_create_topic_is_idempotent_for_the_same_partition_count(
    log: Log, new_topic: NewTopic
) -> None:
    t = new_topic("events")
    log.create_topic(t, 2)
    placed = log.append(t, msgs(3))
    log.create_topic(t, 2)
    assert log.partitions(t) == 2
    assert log.end_offset(t, 0) == placed[-1][1] + 1


def test_create_topic_with_another_partition_count_fails(log: Log, new_topic: NewTopic) -> None:
    t = new_topic("events")
    log.create_topic(t, 2)
    with pytest.raises(StreamError, match=rf"{re.escape(repr(t))}.*2 partitions.*\b5\b"):
        log.create_topic(t, 5)
    assert log.partitions(t) == 2


@pytest.mark.parametrize("bad", [0, -1])
def test_create_topic_needs_at_least_one_partition(log: Log, new_topic: NewTopic, bad: int) -> None:
    t = new_topic("events")
    with pytest.raises(StreamError, match=rf"{re.escape(repr(t))}.*>= 1.*got {bad}"):
        log.create_topic(t, bad)


def test_topics_are_independent(log: Log, new_topic: NewTopic) -> None:
    a, b = new_topic("a"), new_topic("b")
    log.create_topic(a, 1)
    log.create_topic(b, 1)
    log.append(a, msgs(4))
    assert [r.value for r in read_all(log, a, 0)] == [b"m0", b"m1", b"m2", b"m3"]
    assert log.end_offset(b, 0) == 0
    assert log.read(b, 0, 0, 10) == []


# --- append ---------------------------------------------------------------------------------


def test_append_gives_increasing_offsets_per_partition(log: Log, new_topic: NewTopic) -> None:
    t = new_topic("events")
    log.create_topic(t, 2)
    first = log.append(t, msgs(3), partition=1)
    zero = log.append(t, msgs(2), partition=0)
    second = log.append(t, msgs(2), partition=1)
    assert [p for p, _ in first + second] == [1] * 5
    assert [p for p, _ in zero] == [0, 0]
    ones = [off for _, off in first + second]
    assert increasing(ones)
    assert increasing([off for _, off in zero])
    # The end offset is the one after the last record, and both partitions start empty.
    assert (log.end_offset(t, 0), log.end_offset(t, 1)) == (zero[-1][1] + 1, ones[-1] + 1)


def test_unkeyed_messages_go_to_partition_zero(log: Log, new_topic: NewTopic) -> None:
    t = new_topic("events")
    log.create_topic(t, 4)
    assert [p for p, _ in log.append(t, msgs(3))] == [0, 0, 0]


def test_keyed_messages_go_to_partition_for_key(log: Log, new_topic: NewTopic) -> None:
    t = new_topic("events")
    n = 4
    log.create_topic(t, n)
    keys = [f"user-{i}".encode() for i in range(40)]
    placed = log.append(t, [(k, b"v", 1) for k in keys])
    assert [p for p, _ in placed] == [partition_for(k, n) for k in keys]
    assert len({p for p, _ in placed}) == n  # 40 keys reach every partition
    for p in range(n):  # offsets increase within each partition, in message order
        assert increasing([off for q, off in placed if q == p])
        assert [r.key for r in read_all(log, t, p)] == [k for k in keys if partition_for(k, n) == p]


def test_each_partition_keeps_the_append_order(log: Log, new_topic: NewTopic) -> None:
    t = new_topic("events")
    n = 3
    log.create_topic(t, n)
    keys = [f"user-{i}".encode() for i in range(12)]
    sent: dict[int, list[bytes]] = {p: [] for p in range(n)}
    for batch in range(5):
        messages: list[Message] = [(k, f"{k.decode()}#{batch}".encode(), batch + 1) for k in keys]
        for (p, _), (_, value, _) in zip(log.append(t, messages), messages, strict=True):
            sent[p].append(value)
        sent[1].append(f"direct#{batch}".encode())
        log.append(t, [(None, f"direct#{batch}".encode(), batch + 1)], partition=1)
    for p in range(n):
        got = read_all(log, t, p)
        assert [r.value for r in got] == sent[p]
        assert increasing([r.offset for r in got])


def test_explicit_partition_overrides_the_key(log: Log, new_topic: NewTopic) -> None:
    t = new_topic("events")
    log.create_topic(t, 4)
    key = b"user-1"
    other = (partition_for(key, 4) + 1) % 4
    [(p, off)] = log.append(t, [(key, b"v", 1)], partition=other)
    assert p == other
    assert log.read(t, other, off, 1)[0].key == key


def test_empty_append_changes_nothing(log: Log, new_topic: NewTopic) -> None:
    t = new_topic("events")
    log.create_topic(t, 1)
    assert log.append(t, []) == []
    assert log.end_offset(t, 0) == 0


def test_batch_with_a_bad_message_appends_nothing(log: Log, new_topic: NewTopic) -> None:
    t = new_topic("events")
    log.create_topic(t, 1)
    log.append(t, msgs(2))
    end = log.end_offset(t, 0)
    batch: list[Any] = [*msgs(3), (None, "not bytes", 5)]
    with pytest.raises(StreamError, match=rf"{re.escape(repr(t))}.*message 3"):
        log.append(t, batch)
    assert log.end_offset(t, 0) == end
    assert log.append(t, msgs(1, "after"))[0][1] >= end
    assert [r.value for r in read_all(log, t, 0)] == [b"m0", b"m1", b"after0"]


# --- read -----------------------------------------------------------------------------------


def test_records_round_trip_every_field(log: Log, new_topic: NewTopic) -> None:
    t = new_topic("events")
    log.create_topic(t, 2)
    (_, a), (_, b) = log.append(
        t, [(b"k\x00\xff", b"\x00\x01binary\xff", 1_767_225_600_123), (None, b"", 7)], 1
    )
    assert log.read(t, 1, 0, 10) == [
        Record(t, 1, a, b"k\x00\xff", b"\x00\x01binary\xff", 1_767_225_600_123),
        Record(t, 1, b, None, b"", 7),
    ]


def test_headers_round_trip_in_order(log: Log, new_topic: NewTopic) -> None:
    t = new_topic("events")
    log.create_topic(t, 1)
    headers: Headers = (("trace", b"\x00\xff"), ("empty", b""), ("trace", b"again"))
    log.append(t, [(b"k", b"with", 5, headers), (None, b"without", 6), (None, b"none", 7, ())])
    got = read_all(log, t, 0)
    assert [(r.value, r.headers) for r in got] == [
        (b"with", headers),
        (b"without", ()),
        (b"none", ()),
    ]
    assert [(r.key, r.ts_ms) for r in got] == [(b"k", 5), (None, 6), (None, 7)]


def test_read_returns_records_from_an_offset_up_to_max_records(
    log: Log, new_topic: NewTopic
) -> None:
    t = new_topic("events")
    log.create_topic(t, 1)
    offsets = [off for _, off in log.append(t, msgs(10))]
    got = log.read(t, 0, offsets[3], 4)
    assert [r.offset for r in got] == offsets[3:7]
    assert [r.value for r in got] == [b"m3", b"m4", b"m5", b"m6"]
    assert [r.offset for r in log.read(t, 0, offsets[8], 100)] == offsets[8:]
    end = log.end_offset(t, 0)
    assert end == offsets[-1] + 1
    assert log.read(t, 0, end, 100) == []  # at the end: nothing, no error
    assert log.read(t, 0, 0, 0) == []


@pytest.mark.parametrize("past_end", [1, 95, None])
def test_read_outside_zero_to_end_fails_naming_the_range(
    log: Log, new_topic: NewTopic, past_end: int | None
) -> None:
    t = new_topic("events")
    log.create_topic(t, 2)
    log.append(t, msgs(5), partition=1)
    end = log.end_offset(t, 1)
    offset = -1 if past_end is None else end + past_end
    pattern = rf"{re.escape(repr(t))}.*partition 1.*offset {offset}.*\[0, {end}\]"
    with pytest.raises(OffsetOutOfRangeError, match=pattern):
        log.read(t, 1, offset, 10)


def test_partition_outside_the_topic_fails(log: Log, new_topic: NewTopic) -> None:
    t = new_topic("events")
    log.create_topic(t, 2)
    expect = rf"{re.escape(repr(t))}.*partitions 0\.\.1.*got partition"
    with pytest.raises(StreamError, match=expect + " 2"):
        log.read(t, 2, 0, 1)
    with pytest.raises(StreamError, match=expect + " -1"):
        log.end_offset(t, -1)
    with pytest.raises(StreamError, match=expect + " 2"):
        log.append(t, msgs(1), partition=2)
    assert log.end_offset(t, 0) == log.end_offset(t, 1) == 0


def test_unknown_topic_fails_naming_it(log: Log, new_topic: NewTopic) -> None:
    t = new_topic("nope")
    calls: list[Callable[[], object]] = [
        lambda: log.partitions(t),
        lambda: log.end_offset(t, 0),
        lambda: log.read(t, 0, 0, 1),
        lambda: log.append(t, msgs(1)),
    ]
    for call in calls:
        with pytest.raises(TopicNotFoundError, match=re.escape(repr(t))):
            call()


# --- durability and sharing -----------------------------------------------------------------


def test_reopened_log_keeps_topics_and_records(
    log_factory: LogFactory, new_topic: NewTopic
) -> None:
    t = new_topic("events")
    first = log_factory.open()
    first.create_topic(t, 2)
    first.append(t, [(b"a", b"x", 1), (b"b", b"y", 2)])
    first.close()
    second = log_factory.open()
    try:
        assert second.partitions(t) == 2
        assert sorted(r.value for p in range(2) for r in read_all(second, t, p)) == [b"x", b"y"]
        second.create_topic(t, 2)  # still idempotent after reopening
    finally:
        second.close()


def test_two_handles_see_each_others_appends(log_factory: LogFactory, new_topic: NewTopic) -> None:
    t = new_topic("events")
    a, b = log_factory.open(), log_factory.open()
    try:
        a.create_topic(t, 1)
        assert b.partitions(t) == 1
        first = a.append(t, msgs(2))
        [(p, off)] = b.append(t, msgs(1, "b"))
        assert p == 0
        assert off > first[-1][1]
        assert [r.value for r in read_all(a, t, 0)] == [b"m0", b"m1", b"b0"]
    finally:
        a.close()
        b.close()


def _append_worker(
    factory: LogFactory, topic: str, writer: int, batches: int, size: int, start: Barrier
) -> None:
    log = factory.open()
    try:
        start.wait(_PROC_TIMEOUT_S)
        for b in range(batches):
            log.append(topic, [(None, f"{writer}:{b}:{i}".encode(), b + 1) for i in range(size)], 0)
            time.sleep(
                0.001
            )  # a writer that never pauses would hold the file lock in turn after turn
    finally:
        log.close()


@pytest.mark.integration
def test_two_writer_processes_get_disjoint_increasing_offsets(
    log_factory: LogFactory, new_topic: NewTopic
) -> None:
    t = new_topic("events")
    writers, batches, size = 2, 40, 50
    log = log_factory.open()
    log.create_topic(t, 1)
    start = _MP.Barrier(writers)
    procs = [
        _MP.Process(target=_append_worker, args=(log_factory, t, w, batches, size, start))
        for w in range(writers)
    ]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(_PROC_TIMEOUT_S)
        assert [p.exitcode for p in procs] == [0] * writers
        records = read_all(log, t, 0)
        end = log.end_offset(t, 0)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        log.close()
    assert len(records) == writers * batches * size
    assert increasing([r.offset for r in records])
    assert end == records[-1].offset + 1
    values = [r.value.decode() for r in records]
    # Writers may interleave (batches are not atomic everywhere); each keeps its own order.
    for w in range(writers):
        mine = [v for v in values if v.startswith(f"{w}:")]
        assert mine == [f"{w}:{b}:{i}" for b in range(batches) for i in range(size)]


def _tail_worker(factory: LogFactory, topic: str, total: int, ready: Event, out: Any) -> None:
    log = factory.open()
    try:
        ready.set()
        seen: list[str] = []
        position = 0
        deadline = time.monotonic() + _PROC_TIMEOUT_S
        while len(seen) < total and time.monotonic() < deadline:
            batch = log.read(topic, 0, position, 37)
            if not batch:
                time.sleep(0.002)
                continue
            seen.extend(r.value.decode() for r in batch)
            position = batch[-1].offset + 1
        out.put(seen)
    finally:
        log.close()


@pytest.mark.integration
def test_a_reader_process_sees_a_writer_processs_records(
    log_factory: LogFactory, new_topic: NewTopic
) -> None:
    t = new_topic("events")
    batches, size = 60, 20
    log = log_factory.open()
    log.create_topic(t, 1)
    ready, out = _MP.Event(), _MP.Queue()
    reader = _MP.Process(target=_tail_worker, args=(log_factory, t, batches * size, ready, out))
    try:
        reader.start()
        assert ready.wait(_PROC_TIMEOUT_S)
        for b in range(batches):
            log.append(t, [(None, f"{b}:{i}".encode(), b + 1) for i in range(size)])
            time.sleep(0.001)  # let the reader interleave with the writes
        seen = out.get(timeout=_PROC_TIMEOUT_S)
        reader.join(_PROC_TIMEOUT_S)
    finally:
        if reader.is_alive():
            reader.kill()
        log.close()
    assert reader.exitcode == 0
    assert seen == [f"{b}:{i}" for b in range(batches) for i in range(size)]
