"""What the SQLite backend adds for consumers: round-robin polls, group tables, its errors."""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from minutely.errors import OffsetOutOfRangeError, StreamError, TopicNotFoundError
from minutely.stream import SqliteConsumer, SqliteLog
from minutely.stream.sqlite_groups import target_range

SESSION_S = 0.8  # heartbeats every 0.2 s


@pytest.fixture
def log(tmp_path: Path) -> Iterator[SqliteLog]:
    with SqliteLog(tmp_path / "log.sqlite", session_timeout_s=SESSION_S) as handle:
        handle.create_topic("events", 4)
        for p in range(4):
            handle.append("events", [(None, f"{p}-{i}".encode(), i) for i in range(5)], p)
        yield handle


class Calls:
    """Records a member's callbacks; on_assign answers from ``starts``."""

    def __init__(self, starts: Mapping[int, Any] | None = None) -> None:
        self.starts: Mapping[int, Any] = starts or {}
        self.log: list[tuple[str, list[int]]] = []

    def on_assign(self, parts: list[int]) -> Any:
        self.log.append(("assign", parts))
        return self.starts

    def on_revoke(self, parts: list[int]) -> None:
        self.log.append(("revoke", parts))


def member(log: SqliteLog, calls: Calls, topic: str = "events") -> SqliteConsumer:
    return log.consumer(topic, group="g", on_assign=calls.on_assign, on_revoke=calls.on_revoke)


def settle(*consumers: SqliteConsumer, rounds: int = 8) -> None:
    """Let every member sync a few times (each waits out its heartbeat interval)."""
    for _ in range(rounds):
        for c in consumers:
            c.poll(1_000)
        time.sleep(SESSION_S / 4)


@pytest.mark.parametrize("partitions", [1, 4, 7])
@pytest.mark.parametrize("members", [1, 2, 3, 5])
def test_target_ranges_cover_every_partition_once_and_evenly(partitions: int, members: int) -> None:
    ranges = [list(target_range(i, members, partitions)) for i in range(members)]
    assert [p for r in ranges for p in r] == list(range(partitions))
    assert max(map(len, ranges)) - min(map(len, ranges)) <= 1


def test_poll_shares_records_round_robin_and_rotates_the_first_partition(log: SqliteLog) -> None:
    consumer = log.consumer("events")
    consumer.assign({0: 0, 1: 0, 2: 0})
    assert [(r.partition, r.offset) for r in consumer.poll(6)] == [
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
        (2, 0),
        (2, 1),
    ]
    assert [r.partition for r in consumer.poll(2)] == [1, 2]
    assert [r.partition for r in consumer.poll(1)] == [2]
    # An idle partition's share goes to the others.
    consumer.assign({0: 5, 1: 0})
    assert [r.partition for r in consumer.poll(4)] == [1, 1, 1, 1]


def test_members_split_partitions_by_rank_of_their_ids(log: SqliteLog) -> None:
    a, b = member(log, Calls()), member(log, Calls())
    settle(a, b)
    low, high = sorted([a, b], key=lambda c: c.member_id)
    assert sorted(low.positions()) == [0, 1]
    assert sorted(high.positions()) == [2, 3]
    a.close()
    b.close()


def test_a_partition_moves_only_once_its_owner_lets_it_go(log: SqliteLog) -> None:
    first_calls, second_calls = Calls(), Calls({0: 2, 1: 2, 2: 2, 3: 2})
    first = member(log, first_calls)
    first.poll(100)
    assert first_calls.log == [("assign", [0, 1, 2, 3])]
    second = member(log, second_calls)
    for _ in range(3):  # the first member has not synced since: nothing moves
        assert second.poll(100) == []
    assert second.positions() == {}
    settle(first, second)
    moved = sorted(second.positions())
    assert len(moved) == 2
    assert first_calls.log[1:] == [("revoke", moved)]
    assert second_calls.log == [("assign", moved)]
    # Started where on_assign said (its answer for other partitions is ignored), then read on.
    assert [(r.partition, r.offset) for r in second.poll(100) if r.offset < 2] == []
    assert second.positions() == dict.fromkeys(moved, 5)
    first.close()
    second.close()


def test_a_member_that_stops_heartbeating_is_dead_and_finds_its_partitions_lost(
    log: SqliteLog,
) -> None:
    old_calls = Calls()
    old = member(log, old_calls)
    old.poll(100)
    raw = sqlite3.connect(log.path)
    raw.execute("UPDATE group_members SET heartbeat_ms = heartbeat_ms - 60000")
    raw.commit()
    raw.close()
    new_calls = Calls()
    new = member(log, new_calls)
    new.poll(100)  # the stale member is reaped at once and its partitions are free
    assert new_calls.log == [("assign", [0, 1, 2, 3])]
    time.sleep(SESSION_S / 4)
    old.poll(100)
    assert old_calls.log[1] == ("revoke", [0, 1, 2, 3])  # lost: already owned by the other
    settle(old, new)  # the returning member rejoins and gets its share again
    assert sorted([*old.positions(), *new.positions()]) == [0, 1, 2, 3]
    assert old.positions()
    assert new.positions()
    old.close()
    new.close()


def test_close_leaves_the_group_and_idle_members_get_nothing(log: SqliteLog) -> None:
    log.create_topic("one", 1)
    log.append("one", [(None, b"x", 1)])
    a_calls, b_calls = Calls(), Calls()
    a, b = member(log, a_calls, "one"), member(log, b_calls, "one")
    settle(a, b)
    (owner, owner_calls), (idle, idle_calls) = sorted(
        [(a, a_calls), (b, b_calls)], key=lambda m: not m[0].positions()
    )
    assert idle.positions() == {}
    assert idle.poll(10, timeout_s=0.05) == []
    before = len(idle_calls.log)  # the partition may have moved once while both joined
    owner.close()
    assert owner_calls.log[-1] == ("revoke", [0])
    owner.close()  # idempotent
    idle.poll(10, timeout_s=SESSION_S / 2)  # well before the owner would count as dead
    assert idle_calls.log[before:] == [("assign", [0])]
    raw = sqlite3.connect(log.path)
    try:
        rows = raw.execute("SELECT member FROM group_members").fetchall()
    finally:
        raw.close()
    assert rows == [(idle.member_id,)]
    idle.close()


def test_on_assign_positions_are_checked(log: SqliteLog) -> None:
    where = r"consumer of topic 'events' in group 'g'"
    cases: list[tuple[Any, type[Exception], str]] = [
        ([1, 2], StreamError, r"on_assign must return a mapping partition -> position, got list"),
        ({1: "3"}, StreamError, r"the position of partition 1 must be an int, got '3'"),
        ({2: 6}, OffsetOutOfRangeError, r"position 6 of partition 2 .*range \[0, 5\]"),
    ]
    for starts, error, message in cases:
        consumer = member(log, Calls(starts))
        with pytest.raises(error, match=where + ".*" + message):
            consumer.poll(10)
        consumer.close()


def test_bad_calls_are_refused_with_what_was_expected(log: SqliteLog) -> None:
    where = rf"{re.escape(str(log.path))}: consumer of topic 'events'"
    with pytest.raises(StreamError, match=where + r": group must be a non-empty string, got ''"):
        log.consumer("events", group="")
    with pytest.raises(StreamError, match=where + r": on_assign and on_revoke need a group"):
        log.consumer("events", on_revoke=Calls().on_revoke)
    with pytest.raises(TopicNotFoundError, match=r"topic 'nope' does not exist"):
        log.consumer("nope")
    in_group = log.consumer("events", group="g")
    with pytest.raises(StreamError, match=r"in group 'g': assign\(\) is for consumers without"):
        in_group.assign({0: 0})
    consumer = log.consumer("events")
    bad: Any = [0]
    with pytest.raises(StreamError, match=where + r": assign\(\) takes a mapping .*got list"):
        consumer.assign(bad)
    with pytest.raises(StreamError, match=r"partitions 0\.\.3, got partition 4"):
        consumer.assign({4: 0})
    with pytest.raises(OffsetOutOfRangeError, match=where + r": position 6 of .*\[0, 5\]"):
        consumer.assign({1: 6})
    consumer.assign({1: 0})
    with pytest.raises(StreamError, match=r"seek to partition 2, which is not assigned \(.*\[1\]"):
        consumer.seek(2, 0)
    with pytest.raises(OffsetOutOfRangeError, match=r"position -1 of partition 1"):
        consumer.seek(1, -1)
    with pytest.raises(StreamError, match=where + r": max_records must be an int >= 1, got 0"):
        consumer.poll(0)
    with pytest.raises(StreamError, match=where + r": timeout_s must be a number >= 0, got -1"):
        consumer.poll(1, timeout_s=-1)
    consumer.close()
    with pytest.raises(StreamError, match=where + r": poll: the consumer is closed"):
        consumer.poll(1)
    with pytest.raises(StreamError, match=r"end offsets: the consumer is closed"):
        consumer.end_offsets()


def test_a_consumer_of_a_closed_log_fails_naming_the_log(tmp_path: Path) -> None:
    log = SqliteLog(tmp_path / "log.sqlite")
    log.create_topic("events", 1)
    consumer = log.consumer("events")
    consumer.assign({0: 0})
    log.close()
    with pytest.raises(StreamError, match=r"consumer of topic 'events': poll: the log is closed"):
        consumer.poll(1)
