"""Read every partition of one topic from positions the caller owns.

A :class:`TopicReader` keeps one position per partition: the offset of the next record to
return. ``positions()`` is the snapshot a checkpoint stores; a reader built from it resumes right
after the last record returned, so nothing is lost and nothing is read twice.

>>> import tempfile
>>> from pathlib import Path
>>> from minutely.stream.sqlite import SqliteLog
>>> log = SqliteLog(Path(tempfile.mkdtemp()) / "log.sqlite")
>>> log.create_topic("events", partitions=2)
>>> _ = log.append("events", [(None, b"a", 10), (None, b"b", 20)], partition=0)
>>> _ = log.append("events", [(None, b"c", 15)], partition=1)
>>> reader = TopicReader(log, "events")
>>> [r.value for r in reader.read_until(20)]
[b'a', b'c']
>>> reader.positions(), reader.lag()
({0: 1, 1: 1}, 1)
>>> [r.value for r in TopicReader(log, "events", reader.positions()).poll(10)]
[b'b']
>>> log.close()
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

from minutely.errors import OffsetOutOfRangeError, StreamError
from minutely.stream.base import Log, Record

# How many records one backend read asks for when the caller set no limit.
_CHUNK = 5_000


class TopicReader:
    """All partitions of ``topic``, read from caller-owned ``positions`` (partition -> offset).

    Partitions missing from ``positions`` start at offset 0 (the earliest record).
    """

    def __init__(self, log: Log, topic: str, positions: dict[int, int] | None = None) -> None:
        self._log = log
        self._topic = topic
        self._n = log.partitions(topic)
        self._pos = dict.fromkeys(range(self._n), 0)
        for p, off in (positions or {}).items():
            if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < self._n:
                raise StreamError(
                    f"reader of topic {topic!r}: positions name partition {p!r}, "
                    f"expected one of 0..{self._n - 1}"
                )
            end = log.end_offset(topic, p)
            if isinstance(off, bool) or not isinstance(off, int) or not 0 <= off <= end:
                raise OffsetOutOfRangeError(
                    f"reader of topic {topic!r}: position {off!r} of partition {p} is outside "
                    f"the valid range [0, {end}]"
                )
            self._pos[p] = off
        # Which partition a poll starts from rotates, so a small max_records cannot starve any.
        self._next = 0

    @property
    def topic(self) -> str:
        return self._topic

    def positions(self) -> dict[int, int]:
        """A copy of the positions: the offsets of the next records to return, per partition."""
        return dict(self._pos)

    def lag(self) -> int:
        """How many records are in the log but not yet returned, over all partitions."""
        return sum(self._log.end_offset(self._topic, p) - off for p, off in self._pos.items())

    def poll(self, max_records: int) -> list[Record]:
        """Up to ``max_records`` records, shared round-robin among partitions with data.

        Each partition's records come in offset order; an idle partition's share goes to the
        others. Returns an empty list when every partition is read to its end.
        """
        _check_limit(self._topic, max_records)
        order = [(self._next + i) % self._n for i in range(self._n)]
        self._next = (self._next + 1) % self._n
        out: list[Record] = []
        remaining = max_records
        while remaining > 0 and order:
            share = -(
                -remaining // len(order)
            )  # ceil: earlier partitions in the turn take one more
            busy: list[int] = []
            for p in order:
                want = min(share, remaining)
                if want == 0:
                    break
                got = self._log.read(self._topic, p, self._pos[p], want)
                self._take(p, got, out)
                remaining -= len(got)
                if len(got) == want:
                    busy.append(p)
            order = busy
        return out

    def read_until(self, ts_ms: int, max_records: int | None = None) -> list[Record]:
        """The records with ``ts_ms`` before ``ts_ms``, merged across partitions in time order.

        Each partition is read in offset order up to, not including, its first record at or after
        ``ts_ms``: writers append a partition in non-decreasing event time, so that record and all
        after it wait for a later call. With ``max_records`` only the earliest that many are
        returned (ties in time go to the lower partition) and the rest stay unread.
        """
        if max_records is not None:
            _check_limit(self._topic, max_records)
        per_part = [self._before(p, ts_ms, max_records) for p in range(self._n)]
        merged: Iterable[Record] = heapq.merge(*per_part, key=_ts)
        if max_records is not None:
            merged = (r for _, r in zip(range(max_records), merged, strict=False))
        out: list[Record] = []
        for r in merged:
            self._pos[r.partition] = r.offset + 1
            out.append(r)
        return out

    def _before(self, p: int, ts_ms: int, limit: int | None) -> list[Record]:
        """Partition ``p`` from its position up to its first record at or after ``ts_ms``,
        at most ``limit`` records; the position does not move."""
        out: list[Record] = []
        off = self._pos[p]
        while limit is None or len(out) < limit:
            want = _CHUNK if limit is None else min(_CHUNK, limit - len(out))
            got = self._log.read(self._topic, p, off, want)
            for r in got:
                if r.ts_ms >= ts_ms:
                    return out
                out.append(r)
            if len(got) < want:
                break
            off += len(got)
        return out

    def _take(self, p: int, got: list[Record], out: list[Record]) -> None:
        if got:
            self._pos[p] = got[-1].offset + 1
            out.extend(got)


def _ts(r: Record) -> int:
    return r.ts_ms


def _check_limit(topic: str, max_records: int) -> None:
    if isinstance(max_records, bool) or not isinstance(max_records, int) or max_records < 1:
        raise StreamError(
            f"reader of topic {topic!r}: max_records must be an int >= 1, got {max_records!r}"
        )
