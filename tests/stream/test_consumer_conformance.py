"""Sequential consumers with manual assignment, on every log backend."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from minutely.stream import Consumer, Headers, Log, Message, Record

NewTopic = Callable[[str], str]

_WAIT_S = 30.0


def drain(consumer: Consumer, count: int, max_records: int = 100) -> list[Record]:
    """Poll until ``count`` records came (failing after a bounded wait), then check no more."""
    out: list[Record] = []
    deadline = time.monotonic() + _WAIT_S
    while len(out) < count and time.monotonic() < deadline:
        out += consumer.poll(min(max_records, count - len(out)), timeout_s=0.5)
    assert len(out) == count, f"got {len(out)} of {count} records"
    return out


def fill(log: Log, topic: str, per_partition: int, partitions: int) -> dict[int, list[int]]:
    """``per_partition`` records in each partition; their offsets per partition."""
    offsets: dict[int, list[int]] = {}
    for p in range(partitions):
        batch: list[Message] = [(None, f"p{p}-{i}".encode(), i + 1) for i in range(per_partition)]
        offsets[p] = [off for _, off in log.append(topic, batch, partition=p)]
    return offsets


def test_a_consumer_reads_each_partition_in_offset_order(log: Log, new_topic: NewTopic) -> None:
    t = new_topic("events")
    log.create_topic(t, 3)
    keys = [f"user-{i}".encode() for i in range(30)]
    sent: dict[int, list[tuple[int, bytes]]] = {0: [], 1: [], 2: []}
    for batch in range(3):
        messages: list[Message] = [(k, k + b"#%d" % batch, batch + 1) for k in keys]
        for (p, off), m in zip(log.append(t, messages), messages, strict=True):
            sent[p].append((off, m[1]))
    consumer = log.consumer(t)
    try:
        assert consumer.topic == t
        consumer.assign(dict.fromkeys(range(3), 0))
        got = drain(consumer, len(keys) * 3, max_records=7)
        for p in range(3):
            assert [(r.offset, r.value) for r in got if r.partition == p] == sent[p]
        ends = {p: sent[p][-1][0] + 1 for p in range(3) if sent[p]}
        assert {p: off for p, off in consumer.positions().items() if sent[p]} == ends
        assert consumer.end_offsets() == consumer.positions()
        assert consumer.poll(10) == []
    finally:
        consumer.close()


def test_a_consumer_returns_headers(log: Log, new_topic: NewTopic) -> None:
    t = new_topic("events")
    log.create_topic(t, 1)
    headers: Headers = (("schema", b"v2"), ("trace", b"\x00\x01"))
    log.append(t, [(b"k", b"a", 1, headers), (None, b"b", 2)])
    consumer = log.consumer(t)
    try:
        consumer.assign({0: 0})
        assert [(r.key, r.value, r.ts_ms, r.headers) for r in drain(consumer, 2)] == [
            (b"k", b"a", 1, headers),
            (None, b"b", 2, ()),
        ]
    finally:
        consumer.close()


def test_positions_resume_after_the_last_record_returned(log: Log, new_topic: NewTopic) -> None:
    t = new_topic("events")
    log.create_topic(t, 2)
    offsets = fill(log, t, 20, 2)
    first = log.consumer(t)
    try:
        first.assign({0: 0, 1: 0})
        early = drain(first, 13, max_records=5)
        saved = first.positions()
    finally:
        first.close()
    for p in range(2):
        mine = [r.offset for r in early if r.partition == p]
        assert saved[p] == (mine[-1] + 1 if mine else 0)
    second = log.consumer(t)
    try:
        second.assign(saved)
        late = drain(second, 40 - 13)
        assert second.poll(10, timeout_s=0.2) == []
        more = log.append(t, [(None, b"new", 99)], partition=1)
        assert [(r.partition, r.offset) for r in drain(second, 1)] == more
    finally:
        second.close()
    for p in range(2):  # nothing lost, nothing read twice
        assert [r.offset for r in early + late if r.partition == p] == offsets[p]


def test_assign_replaces_the_assignment_and_seek_moves_a_position(
    log: Log, new_topic: NewTopic
) -> None:
    t = new_topic("events")
    log.create_topic(t, 2)
    offsets = fill(log, t, 5, 2)
    consumer = log.consumer(t)
    try:
        consumer.assign({0: 0})
        assert {r.partition for r in drain(consumer, 5)} == {0}
        consumer.assign({1: offsets[1][2]})
        assert consumer.positions() == {1: offsets[1][2]}
        assert [r.value for r in drain(consumer, 3)] == [b"p1-2", b"p1-3", b"p1-4"]
        consumer.seek(1, offsets[1][1])
        assert consumer.positions() == {1: offsets[1][1]}
        assert [r.value for r in drain(consumer, 4)] == [b"p1-1", b"p1-2", b"p1-3", b"p1-4"]
        assert consumer.end_offsets() == {1: offsets[1][-1] + 1}
    finally:
        consumer.close()


def test_poll_waits_for_a_record_up_to_its_timeout(log: Log, new_topic: NewTopic) -> None:
    t = new_topic("events")
    log.create_topic(t, 1)
    consumer = log.consumer(t)
    try:
        consumer.assign({0: 0})
        started = time.monotonic()
        assert consumer.poll(10, timeout_s=0.3) == []
        assert time.monotonic() - started >= 0.25
        writer = threading.Timer(0.3, lambda: log.append(t, [(None, b"late", 1)]))
        writer.start()
        started = time.monotonic()
        try:
            got = consumer.poll(10, timeout_s=_WAIT_S)
        finally:
            writer.join()
        assert [r.value for r in got] == [b"late"]
        assert time.monotonic() - started < _WAIT_S / 2
    finally:
        consumer.close()
