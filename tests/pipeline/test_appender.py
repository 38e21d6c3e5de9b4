"""The exactly-once writer: identities in headers, verified skips, shared topics."""

from __future__ import annotations

from pathlib import Path

import pytest

from minutely.errors import CheckpointError
from minutely.pipeline.appender import SEQ_HEADER, WRITER_HEADER, ExactlyOnceWriter, identity
from minutely.stream import SqliteLog
from minutely.stream.base import Message


def msgs(lo: int, hi: int, tag: str = "m") -> list[Message]:
    return [(i.to_bytes(8, "big"), f"{tag}{i}".encode(), i) for i in range(lo, hi)]


def values(log: SqliteLog, topic: str) -> list[bytes]:
    out: list[bytes] = []
    for p in range(log.partitions(topic)):
        out += [r.value for r in log.read(topic, p, 0, 10_000)]
    return sorted(out)


@pytest.fixture
def log(tmp_path: Path) -> SqliteLog:
    handle = SqliteLog(tmp_path / "log.sqlite")
    handle.create_topic("t", 3)
    return handle


def test_messages_written_after_the_checkpoint_are_verified_and_written_once(
    log: SqliteLog,
) -> None:
    first = ExactlyOnceWriter(log, "t", "w")
    first.append_keyed(msgs(0, 10))
    saved = first.state()
    first.append_keyed(msgs(10, 15))  # written, then the process dies before its checkpoint
    second = ExactlyOnceWriter(log, "t", "w", saved)
    assert sum(second.pending().values()) == 5
    written = second.append_keyed(msgs(10, 15)) + second.append_keyed(msgs(15, 18))
    assert written == 3
    assert values(log, "t") == sorted(f"m{i}".encode() for i in range(18))
    assert sum(second.pending().values()) == 0
    assert sum(second.sequences().values()) == 18


def test_every_message_carries_the_writer_and_a_sequence_per_partition(log: SqliteLog) -> None:
    w = ExactlyOnceWriter(log, "t", "join/events/0")
    w.append_to(1, msgs(0, 3))
    records = log.read("t", 1, 0, 10)
    assert [identity(r) for r in records] == [("join/events/0", i) for i in range(3)]
    assert {n for r in records for n, _ in r.headers} == {WRITER_HEADER, SEQ_HEADER}


def test_a_message_produced_differently_after_restore_is_refused(log: SqliteLog) -> None:
    first = ExactlyOnceWriter(log, "t", "w")
    saved = first.state()
    first.append_to(0, msgs(0, 2))
    second = ExactlyOnceWriter(log, "t", "w", saved)
    second.append_to(0, msgs(0, 1))  # the same first message: verified, skipped
    with pytest.raises(
        CheckpointError,
        match=r"writer 'w' of topic 't': the restored stage produced message 1 of partition 0 "
        r"differently from the one the log holds at offset 1",
    ):
        second.append_to(0, msgs(1, 2, tag="other"))


def test_writers_sharing_a_partition_skip_only_their_own_messages(log: SqliteLog) -> None:
    a = ExactlyOnceWriter(log, "t", "a")
    b = ExactlyOnceWriter(log, "t", "b")
    saved_a = a.state()
    a.append_to(0, msgs(0, 2, "a"))
    b.append_to(0, msgs(0, 3, "b"))  # another writer keeps writing to the same partition
    a.append_to(0, msgs(2, 3, "a"))
    restored = ExactlyOnceWriter(log, "t", "a", saved_a)
    assert restored.pending()[0] == 3
    assert restored.append_to(0, msgs(0, 4, "a")) == 1  # three verified, the fourth is new
    got = [r.value for r in log.read("t", 0, 0, 100)]
    assert got.count(b"a3") == 1
    assert sorted(got) == sorted([b"a0", b"a1", b"a2", b"a3", b"b0", b"b1", b"b2"])


def test_a_checkpoint_of_another_writer_or_topic_is_refused(log: SqliteLog) -> None:
    saved = ExactlyOnceWriter(log, "t", "a").state()
    with pytest.raises(CheckpointError, match=r"belongs to writer 'a' of topic 't'"):
        ExactlyOnceWriter(log, "t", "b", saved)


def test_a_malformed_checkpoint_is_refused(log: SqliteLog) -> None:
    with pytest.raises(CheckpointError, match=r"writer 'w' of topic 't': checkpoint is malformed"):
        ExactlyOnceWriter(log, "t", "w", {"writer": "w", "topic": "t"})
    with pytest.raises(CheckpointError, match=r"names partitions \[0\], the topic has 0\.\.2"):
        ExactlyOnceWriter(
            log, "t", "w", {"writer": "w", "topic": "t", "partitions": {"0": {"seq": 0, "from": 0}}}
        )


def test_a_checkpoint_beyond_the_log_is_refused(log: SqliteLog) -> None:
    state = ExactlyOnceWriter(log, "t", "w").state()
    state["partitions"]["2"]["from"] = 7
    with pytest.raises(CheckpointError, match=r"expects partition 2 to reach offset 7 but the log"):
        ExactlyOnceWriter(log, "t", "w", state)


def test_a_gap_in_the_writers_sequence_is_refused(log: SqliteLog) -> None:
    first = ExactlyOnceWriter(log, "t", "w")
    first.append_to(0, msgs(0, 3))
    state = first.state()
    state["partitions"]["0"] = {"seq": 1, "from": 0}  # claims only one message was confirmed
    with pytest.raises(CheckpointError, match=r"holds this writer's message 0, expected 1"):
        ExactlyOnceWriter(log, "t", "w", state)


def test_pending_messages_survive_a_second_checkpoint_and_restore(log: SqliteLog) -> None:
    first = ExactlyOnceWriter(log, "t", "w")
    saved = first.state()
    first.append_to(0, msgs(0, 4))
    second = ExactlyOnceWriter(log, "t", "w", saved)
    second.append_to(0, msgs(0, 1))
    again = second.state()  # checkpointed with three messages still unconfirmed
    third = ExactlyOnceWriter(log, "t", "w", again)
    assert third.pending()[0] == 3
    assert third.append_to(0, msgs(1, 5)) == 1
    assert [r.value for r in log.read("t", 0, 0, 10)] == [b"m0", b"m1", b"m2", b"m3", b"m4"]


def test_an_empty_writer_id_is_refused(log: SqliteLog) -> None:
    with pytest.raises(CheckpointError, match="the writer id must not be empty"):
        ExactlyOnceWriter(log, "t", "")
