"""Consumer-group membership in the SQLite log file.

Two tables hold a group's state, per (group, topic): ``group_members`` (one row per live member,
with its last heartbeat and its session timeout) and ``group_owners`` (which member owns each
partition). A member calls :func:`sync` from inside its ``poll``; in one write transaction it

1. forgets members whose heartbeat is older than their session timeout (dead: killed, hung or
   gone without leaving) and releases their partitions,
2. records its own heartbeat (joining if it is new or was forgotten),
3. computes its target: a contiguous range of the partitions, by its rank among the live members
   sorted by id (:func:`target_range`), the same answer in every member,
4. claims the target partitions that no member owns.

A partition owned by another live member is never claimed: that member gives it up at its own
next sync (:func:`release`, after its ``on_revoke``) or dies first. So once a rebalance completes,
no two live members own one partition.

>>> list(target_range(0, 2, 5)), list(target_range(1, 2, 5))
([0, 1, 2], [3, 4])
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass

_WHERE = "grp = ? AND topic_id = ?"


@dataclass(frozen=True, slots=True)
class GroupView:
    """What one sync found: the member's target partitions and those it owns now."""

    target: frozenset[int]
    owned: frozenset[int]
    members: int


def target_range(rank: int, members: int, partitions: int) -> range:
    """The partitions of the member at ``rank`` among ``members``: contiguous ranges, the first
    ``partitions % members`` members taking one more (Kafka's range assignor)."""
    per, extra = divmod(partitions, members)
    start = rank * per + min(rank, extra)
    return range(start, start + per + (1 if rank < extra else 0))


def sync(
    conn: sqlite3.Connection,
    group: str,
    topic_id: int,
    member: str,
    *,
    now_ms: int,
    session_ms: int,
    partitions: int,
) -> GroupView:
    """Reap dead members, heartbeat, compute the target and claim its free partitions (to be
    called inside a write transaction)."""
    key = (group, topic_id)
    conn.execute(
        f"DELETE FROM group_members WHERE {_WHERE} AND heartbeat_ms + session_ms < ?",
        (*key, now_ms),
    )
    conn.execute(
        f"DELETE FROM group_owners WHERE {_WHERE} AND member NOT IN "
        f"(SELECT member FROM group_members WHERE {_WHERE})",
        (*key, *key),
    )
    conn.execute(
        "INSERT INTO group_members (grp, topic_id, member, heartbeat_ms, session_ms)"
        " VALUES (?, ?, ?, ?, ?) ON CONFLICT (grp, topic_id, member)"
        " DO UPDATE SET heartbeat_ms = excluded.heartbeat_ms, session_ms = excluded.session_ms",
        (*key, member, now_ms, session_ms),
    )
    members = [
        m
        for (m,) in conn.execute(
            f"SELECT member FROM group_members WHERE {_WHERE} ORDER BY member", key
        )
    ]
    target = frozenset(target_range(members.index(member), len(members), partitions))
    owners = dict(conn.execute(f"SELECT part, member FROM group_owners WHERE {_WHERE}", key))
    free = sorted(p for p in target if p not in owners)
    conn.executemany(
        "INSERT INTO group_owners (grp, topic_id, part, member) VALUES (?, ?, ?, ?)",
        [(*key, p, member) for p in free],
    )
    owned = frozenset(p for p, m in owners.items() if m == member) | frozenset(free)
    return GroupView(target, owned, len(members))


def release(
    conn: sqlite3.Connection, group: str, topic_id: int, member: str, parts: Iterable[int]
) -> None:
    """Give up ``parts`` (only those this member still owns)."""
    conn.executemany(
        f"DELETE FROM group_owners WHERE {_WHERE} AND part = ? AND member = ?",
        [(group, topic_id, p, member) for p in parts],
    )


def leave(conn: sqlite3.Connection, group: str, topic_id: int, member: str) -> None:
    """Leave the group: release every partition and drop the membership at once."""
    conn.execute(
        f"DELETE FROM group_owners WHERE {_WHERE} AND member = ?", (group, topic_id, member)
    )
    conn.execute(
        f"DELETE FROM group_members WHERE {_WHERE} AND member = ?", (group, topic_id, member)
    )
