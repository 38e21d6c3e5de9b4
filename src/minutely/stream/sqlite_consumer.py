"""Sequential reading of one topic of a :class:`~minutely.stream.sqlite.SqliteLog`.

A :class:`SqliteConsumer` keeps a position per assigned partition and reads forward from it with
one indexed range query per partition and poll. Without a group the caller assigns partitions;
in a group the members split the topic's partitions through tables of the same file
(:mod:`minutely.stream.sqlite_groups`), so members may live in different processes.

>>> import tempfile
>>> from pathlib import Path
>>> from minutely.stream.sqlite import SqliteLog
>>> log = SqliteLog(Path(tempfile.mkdtemp()) / "log.sqlite")
>>> log.create_topic("events", partitions=2)
>>> _ = log.append("events", [(None, b"1", 10), (None, b"2", 20)], partition=0)
>>> _ = log.append("events", [(None, b"3", 30)], partition=1)
>>> consumer = log.consumer("events", group="trainers")
>>> sorted(r.value for r in consumer.poll(10, timeout_s=1.0)), consumer.positions()
([b'1', b'2', b'3'], {0: 2, 1: 1})
>>> consumer.close()
>>> log.close()
"""

from __future__ import annotations

import math
import os
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from minutely.errors import OffsetOutOfRangeError, StreamError
from minutely.stream import sqlite_groups as groups
from minutely.stream.base import OnAssign, OnRevoke, Record

if TYPE_CHECKING:
    from minutely.stream.sqlite import SqliteLog

# While a target partition waits for its previous owner to let go, sync this often.
_RETRY_S = 0.05
# Members sync (heartbeat and notice joins and leaves) at least this often while they poll.
_MAX_HEARTBEAT_S = 1.0
# An idle poll with a timeout looks for new records this often at most.
_MAX_WAIT_STEP_S = 0.05


class SqliteConsumer:
    """A :class:`~minutely.stream.base.Consumer` of one topic of a SQLite log.

    Group members heartbeat inside :meth:`poll`, every quarter of the session timeout or every
    second, whichever is sooner; a member that does not poll for ``session_timeout_s`` is taken
    for dead and its partitions move, as with Kafka's poll interval. ``on_revoke`` also runs for
    partitions a member finds already taken when it polls again after such a pause (Kafka's
    "lost" partitions): the caller may still checkpoint them, though another member owns them.
    """

    def __init__(
        self,
        log: SqliteLog,
        topic: str,
        *,
        group: str | None,
        on_assign: OnAssign | None,
        on_revoke: OnRevoke | None,
        session_timeout_s: float,
    ) -> None:
        self._log = log
        self._topic = topic
        self._where = f"sqlite log {log.path}: consumer of topic {topic!r}"
        if group is not None and (not isinstance(group, str) or not group):
            raise StreamError(f"{self._where}: group must be a non-empty string, got {group!r}")
        if group is None and (on_assign is not None or on_revoke is not None):
            raise StreamError(
                f"{self._where}: on_assign and on_revoke need a group "
                "(without one the caller assigns partitions)"
            )
        self._topic_id, self._n = log._topic(topic)
        if group is not None:
            self._where += f" in group {group!r}"
        self._group = group
        self._on_assign = on_assign
        self._on_revoke = on_revoke
        self._session_ms = max(1, round(session_timeout_s * 1000))
        self._heartbeat_s = min(session_timeout_s / 4, _MAX_HEARTBEAT_S)
        self._member = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._pos: dict[int, int] = {}
        self._rotate = 0  # which partition a poll starts from, so none is starved
        self._next_sync = 0.0  # monotonic time of the next group sync (the first poll syncs)
        self._closed = False

    @property
    def topic(self) -> str:
        return self._topic

    @property
    def member_id(self) -> str:
        """This consumer's id in its group (members rank by it when they split partitions)."""
        return self._member

    def assign(self, positions: Mapping[int, int]) -> None:
        """Read exactly these partitions from these positions (replaces any assignment)."""
        self._check_open("assign")
        if self._group is not None:
            raise StreamError(
                f"{self._where}: assign() is for consumers without a group; the group assigns "
                "partitions"
            )
        if not isinstance(positions, Mapping):
            raise StreamError(
                f"{self._where}: assign() takes a mapping partition -> position, "
                f"got {type(positions).__name__}"
            )
        for p in positions:
            self._log._check_partition(self._topic, p, self._n)
        self._pos = self._checked(positions, self._ends(positions))
        self._rotate = 0

    def positions(self) -> dict[int, int]:
        """Per assigned partition, the offset after the last record :meth:`poll` returned."""
        return dict(self._pos)

    def poll(self, max_records: int, timeout_s: float = 0.0) -> list[Record]:
        """Up to ``max_records`` records, shared round-robin among the assigned partitions with
        data (an idle partition's share goes to the others); each partition's in offset order.

        Waits up to ``timeout_s`` for at least one record. A group member syncs with its group
        here, running ``on_revoke`` and ``on_assign`` as partitions move.
        """
        self._check_open("poll")
        if isinstance(max_records, bool) or not isinstance(max_records, int) or max_records < 1:
            raise StreamError(
                f"{self._where}: max_records must be an int >= 1, got {max_records!r}"
            )
        if (
            isinstance(timeout_s, bool)
            or not isinstance(timeout_s, int | float)
            or not timeout_s >= 0
        ):
            raise StreamError(f"{self._where}: timeout_s must be a number >= 0, got {timeout_s!r}")
        deadline = time.monotonic() + timeout_s
        step = 0.005
        while True:
            if self._group is not None and time.monotonic() >= self._next_sync:
                self._sync(self._group)
            out = self._read_round(max_records)
            now = time.monotonic()
            if out or now >= deadline:
                return out
            wake = deadline if self._group is None else min(deadline, self._next_sync)
            time.sleep(min(max(wake - now, 0.0), step))
            step = min(step * 2, _MAX_WAIT_STEP_S)

    def seek(self, partition: int, offset: int) -> None:
        """Make ``offset`` the position of an assigned ``partition``."""
        self._check_open("seek")
        if partition not in self._pos or isinstance(partition, bool):
            raise StreamError(
                f"{self._where}: seek to partition {partition!r}, which is not assigned "
                f"(assigned: {sorted(self._pos)})"
            )
        self._pos.update(self._checked({partition: offset}, self._ends([partition])))

    def end_offsets(self) -> dict[int, int]:
        """Per assigned partition, the offset after its last record."""
        self._check_open("end offsets")
        return self._ends(self._pos)

    def close(self) -> None:
        """Stop reading. A member runs ``on_revoke`` for its partitions and leaves the group, so
        the others take them at their next poll. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._group is None:
            return
        try:
            if self._pos:
                self._revoke(self._pos)
        finally:
            self._pos = {}
            with self._log._write(f"{self._where}: leave the group") as conn:
                groups.leave(conn, self._group, self._topic_id, self._member)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"positions {self._pos}"
        return f"SqliteConsumer({self._topic!r}, group={self._group!r}, {state})"

    # --- internals --------------------------------------------------------------------------

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise StreamError(f"{self._where}: {what}: the consumer is closed")

    def _read_round(self, max_records: int) -> list[Record]:
        parts = sorted(self._pos)
        if not parts:
            return []
        start = self._rotate % len(parts)
        order = parts[start:] + parts[:start]
        self._rotate = start + 1
        out: list[Record] = []
        remaining = max_records
        with self._log._read(f"{self._where}: poll") as conn:
            while remaining > 0 and order:
                share = math.ceil(remaining / len(order))  # earlier partitions take one more
                busy: list[int] = []
                for p in order:
                    want = min(share, remaining)
                    if want == 0:
                        break
                    got = self._log._fetch(conn, self._topic, self._topic_id, p, self._pos[p], want)
                    if got:
                        self._pos[p] = got[-1].offset + 1
                        out.extend(got)
                        remaining -= len(got)
                    if len(got) == want:
                        busy.append(p)
                order = busy
        return out

    def _sync(self, group: str) -> None:
        """One heartbeat in ``group``: take its view, then give up what moved away (after
        ``on_revoke``) and start what moved here (from ``on_assign``'s positions)."""
        with self._log._write(f"{self._where}: heartbeat") as conn:
            view = groups.sync(
                conn,
                group,
                self._topic_id,
                self._member,
                now_ms=int(time.time() * 1000),
                session_ms=self._session_ms,
                partitions=self._n,
            )
        held = set(self._pos)
        lost = held - view.owned
        if lost:
            self._revoke(lost)
        release = (held & view.owned) - view.target
        if release:
            self._revoke(release)
        # Partitions claimed by an earlier sync whose on_assign failed, no longer wanted.
        stray = view.owned - held - view.target
        if release or stray:
            with self._log._write(f"{self._where}: release partitions") as conn:
                groups.release(conn, group, self._topic_id, self._member, release | stray)
        gained = sorted((view.owned & view.target) - held)
        if gained:
            starts = self._on_assign(gained) if self._on_assign is not None else {}
            self._pos.update(self._start_positions(gained, starts))
        pending = view.target - view.owned
        self._next_sync = time.monotonic() + (_RETRY_S if pending else self._heartbeat_s)

    def _revoke(self, parts: Iterable[int]) -> None:
        ordered = sorted(parts)
        if self._on_revoke is not None:
            self._on_revoke(ordered)
        for p in ordered:
            self._pos.pop(p, None)

    def _start_positions(self, gained: list[int], starts: object) -> dict[int, int]:
        if not isinstance(starts, Mapping):
            raise StreamError(
                f"{self._where}: on_assign must return a mapping partition -> position, "
                f"got {type(starts).__name__}"
            )
        # Positions of partitions not gained are ignored: a caller may answer with its whole
        # checkpoint.
        return self._checked({p: starts.get(p, 0) for p in gained}, self._ends(gained))

    def _checked(self, positions: Mapping[int, object], ends: Mapping[int, int]) -> dict[int, int]:
        out: dict[int, int] = {}
        for p, off in positions.items():
            if isinstance(off, bool) or not isinstance(off, int):
                raise StreamError(
                    f"{self._where}: the position of partition {p} must be an int, got {off!r}"
                )
            if not 0 <= off <= ends[p]:
                raise OffsetOutOfRangeError(
                    f"{self._where}: position {off} of partition {p} is outside the valid range "
                    f"[0, {ends[p]}]"
                )
            out[p] = off
        return out

    def _ends(self, parts: Iterable[int]) -> dict[int, int]:
        with self._log._read(f"{self._where}: end offsets") as conn:
            return {p: self._log._end(conn, self._topic_id, p) for p in sorted(parts)}
