"""Dead letters: bad input kept whole, with its reason and source, and counted."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest

from minutely.errors import StreamError
from minutely.stream import (
    DeadLetter,
    DeadLetterSink,
    Log,
    Record,
    partition_for,
    read_dead_letters,
)

NewTopic = Callable[[str], str]


def test_letters_round_trip_in_order(log: Log, new_topic: NewTopic) -> None:
    t = new_topic("dead")
    sink = DeadLetterSink(log, t)
    sink.send(b"\x00\xffraw", "undecodable event: bad byte", "events/2@1234", 1_000)
    sink.send(b"{}", "invalid event: missing ts_ms", "events/0@7", 1_005)
    assert read_dead_letters(log, t) == [
        DeadLetter("undecodable event: bad byte", "events/2@1234", 1_000, b"\x00\xffraw"),
        DeadLetter("invalid event: missing ts_ms", "events/0@7", 1_005, b"{}"),
    ]


def test_a_letter_is_a_json_record_with_base64_payload(log: Log, new_topic: NewTopic) -> None:
    t = new_topic("dead")
    DeadLetterSink(log, t).send(b"\x01\x02", "bad: x", "events/1@5", 42)
    (record,) = log.read(t, 0, 0, 10)
    assert json.loads(record.value) == {
        "reason": "bad: x",
        "source": "events/1@5",
        "ts_ms": 42,
        "payload_b64": base64.b64encode(b"\x01\x02").decode(),
    }
    assert record.ts_ms == 42


def test_counts_group_reasons_by_their_prefix(log: Log, new_topic: NewTopic) -> None:
    sink = DeadLetterSink(log, new_topic("dead"))
    for reason in ["invalid event: a", "invalid event: b", "undecodable event: c", "too late"]:
        sink.send(b"x", reason, "events/0@1", 1)
    assert sink.count == 4
    assert sink.counts_by_reason == {"invalid event": 2, "undecodable event": 1, "too late": 1}
    sink.counts_by_reason["too late"] = 99  # a copy: the sink's counts do not change
    assert sink.counts_by_reason["too late"] == 1


def test_sink_creates_its_topic_or_uses_a_matching_one(log: Log, new_topic: NewTopic) -> None:
    t = new_topic("dead")
    DeadLetterSink(log, t, partitions=2).send(b"x", "r", "events/0@1", 1)
    again = DeadLetterSink(log, t, partitions=2)
    again.send(b"y", "r", "events/0@2", 2)
    assert [d.payload for d in read_dead_letters(log, t)] == [b"x", b"y"]
    assert again.count == 1  # counts are per sink
    with pytest.raises(StreamError, match=r"2 partitions.*\b3\b"):
        DeadLetterSink(log, t, partitions=3)


def test_letters_of_one_source_partition_share_a_partition(log: Log, new_topic: NewTopic) -> None:
    t = new_topic("dead")
    sink = DeadLetterSink(log, t, partitions=4)
    for off in range(5):
        sink.send(b"x", "r", f"events/3@{off}", off + 1)
    p = partition_for(b"events/3", 4)
    assert len(log.read(t, p, 0, 10)) == 5
    assert [d.source for d in read_dead_letters(log, t)] == [f"events/3@{i}" for i in range(5)]


def test_letters_are_routed_by_source_partition_and_read_back_by_a_consumer(
    log: Log, new_topic: NewTopic
) -> None:
    t = new_topic("dead")
    n = 3
    sink = DeadLetterSink(log, t, partitions=n)
    sources = [f"events/{p}@{off}" for off in range(4) for p in range(5)]
    for i, source in enumerate(sources):
        sink.send(f"bad {i}".encode(), "invalid event: x", source, i + 1)
    consumer = log.consumer(t)
    try:
        consumer.assign(dict.fromkeys(range(n), 0))
        records: list[Record] = []
        while len(records) < len(sources) and (got := consumer.poll(100, timeout_s=5.0)):
            records += got
    finally:
        consumer.close()
    assert len(records) == len(sources)
    for r in records:  # each letter sits in the partition of its source's key, keyed by it
        assert r.key is not None
        assert r.partition == partition_for(r.key, n)
    by_source: dict[bytes, list[str]] = {}
    for r in records:
        by_source.setdefault(r.key or b"", []).append(json.loads(r.value)["source"])
    for p in range(5):  # and letters of one source partition keep their order
        assert by_source[f"events/{p}".encode()] == [f"events/{p}@{off}" for off in range(4)]


@pytest.mark.parametrize(
    ("payload", "reason", "source", "ts_ms", "message"),
    [
        ("text", "r", "events/0@1", 1, r"payload must be bytes, got str"),
        (b"x", "  ", "events/0@1", 1, r"reason must be a non-empty string, got '  '"),
        (b"x", "r", "events/0@1", 1.5, r"ts_ms an int, got 'events/0@1' and 1.5"),
        (b"x", "r", None, 1, r"source must be a string .*got None"),
    ],
)
def test_bad_letters_are_refused(
    log: Log, new_topic: NewTopic, payload: Any, reason: Any, source: Any, ts_ms: Any, message: str
) -> None:
    t = new_topic("dead")
    sink = DeadLetterSink(log, t)
    with pytest.raises(StreamError, match=message):
        sink.send(payload, reason, source, ts_ms)
    assert sink.count == 0
    assert log.end_offset(t, 0) == 0


def test_reading_a_record_that_is_not_a_letter_names_its_place(
    log: Log, new_topic: NewTopic
) -> None:
    t = new_topic("dead")
    DeadLetterSink(log, t).send(b"x", "r", "events/0@1", 1)
    log.append(t, [(None, b'{"reason": "r"}', 2)])
    with pytest.raises(StreamError, match=rf"'{t}' partition 0 offset 1: not a dead letter"):
        read_dead_letters(log, t)


def test_a_restored_sink_keeps_counting_and_can_write_elsewhere(
    log: Log, new_topic: NewTopic
) -> None:
    topic = new_topic("dead")
    written: list[tuple[bytes | None, bytes, int]] = []
    sink = DeadLetterSink(log, topic, write=written.extend, counts_by_reason={"invalid event": 2})
    assert sink.count == 2
    sink.send(b"x", "invalid event: bad", "events/0@7", 5)
    sink.send(b"y", "undecodable event: eof", "events/1@9", 6)
    assert sink.counts_by_reason == {"invalid event": 3, "undecodable event": 1}
    assert sink.count == 4
    assert [m[0] for m in written] == [b"events/0", b"events/1"]
    assert read_dead_letters(log, topic) == []  # the custom writer got them, not the log
