"""Read every partition of one topic from positions the caller owns.

A :class:`TopicReader` reads all partitions of a topic through one
:class:`~minutely.stream.base.Consumer` with manual assignment. It keeps one position per
partition: the offset after the last record it returned. ``positions()`` is the snapshot a
checkpoint stores; a reader built from it resumes right after the last record returned, so
nothing is lost and nothing is read twice. Records the consumer delivered but the reader has not
returned yet (peeked by :meth:`TopicReader.read_until`) wait in a per-partition buffer and do not
count in the positions.

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
import math
from collections.abc import Iterator, Mapping
from types import TracebackType

from minutely.errors import OffsetOutOfRangeError, StreamError
from minutely.stream.base import Log, Record

# How many records one consumer poll asks for.
_CHUNK = 5_000
# How long one consumer poll waits for records that the end offsets say exist (a broker's
# consumer may not have fetched them yet); an empty answer ends that partition's turn.
_FETCH_WAIT_S = 1.0
# Merge key of a far-future record before any record of its partition.
_FIRST = -(2**63)


class TopicReader:
    """All partitions of ``topic``, read from caller-owned ``positions`` (partition -> offset).

    Partitions missing from ``positions`` start at offset 0 (the earliest record). The reader
    owns a consumer: :meth:`close` it (or use it as a context manager) when done.
    """

    def __init__(self, log: Log, topic: str, positions: Mapping[int, int] | None = None) -> None:
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
        self._consumer = log.consumer(topic)
        self._consumer.assign(self._pos)
        # Per partition: records delivered but not returned, and the position after them.
        self._buf: dict[int, list[Record]] = {p: [] for p in range(self._n)}
        self._fetched = dict(self._pos)
        # Which partition a poll starts from rotates, so a small max_records cannot starve any.
        self._next = 0

    @property
    def topic(self) -> str:
        return self._topic

    def positions(self) -> dict[int, int]:
        """A copy of the positions: per partition, the offset after the last record returned."""
        return dict(self._pos)

    def lag(self) -> int:
        """How far the positions are behind the partitions' end offsets, over all partitions
        (the count of records not yet returned when offsets have no gaps)."""
        ends = self._consumer.end_offsets()
        return sum(max(ends[p] - off, 0) for p, off in self._pos.items())

    def poll(self, max_records: int) -> list[Record]:
        """Up to ``max_records`` records, shared round-robin among partitions with data.

        Each partition's records come in offset order; an idle partition's share goes to the
        others. Returns an empty list when every partition is read to its end.
        """
        _check_limit(self._topic, max_records)
        ends = self._consumer.end_offsets()
        order = [(self._next + i) % self._n for i in range(self._n)]
        self._next = (self._next + 1) % self._n
        out: list[Record] = []
        remaining = max_records
        while remaining > 0 and order:
            share = math.ceil(
                remaining / len(order)
            )  # earlier partitions in the turn take one more
            busy: list[int] = []
            for p in order:
                want = min(share, remaining)
                if want == 0:
                    break
                while len(self._buf[p]) < want and self._fetch(p, ends):
                    pass
                got = self._take(p, want)
                out.extend(got)
                remaining -= len(got)
                if len(got) == want:
                    busy.append(p)
            order = busy
        return out

    def read_until(
        self, ts_ms: int, max_records: int | None = None, *, horizon_ms: int | None = None
    ) -> list[Record]:
        """The records stamped before ``ts_ms``, merged across partitions in time order.

        Each partition is read in offset order up to, not including, its first record stamped at
        or after ``ts_ms``: writers append a partition in non-decreasing event time, so that
        record and all after it wait for a later call. With ``horizon_ms``, a record stamped at or
        after ``ts_ms + horizon_ms`` does not hold its partition back: it is returned now, right
        after the record before it in its partition (its stamp is wrong, and the caller rejects
        it as too far in the future), and the partition goes on; records stamped in
        ``[ts_ms, ts_ms + horizon_ms)`` still wait. With ``max_records`` only the earliest that
        many are returned (ties in time go to the lower partition) and the rest stay unread.
        """
        if max_records is not None:
            _check_limit(self._topic, max_records)
        if horizon_ms is not None and (
            isinstance(horizon_ms, bool) or not isinstance(horizon_ms, int) or horizon_ms < 0
        ):
            raise StreamError(
                f"reader of topic {self._topic!r}: horizon_ms must be an int >= 0 or None, "
                f"got {horizon_ms!r}"
            )
        far = None if horizon_ms is None else ts_ms + horizon_ms
        ends = self._consumer.end_offsets()
        ready = [self._ready(p, ts_ms, far, max_records, ends) for p in range(self._n)]
        merged = heapq.merge(*(self._keyed(p, ready[p], ts_ms) for p in range(self._n)))
        out: list[Record] = []
        taken = dict.fromkeys(range(self._n), 0)
        for _, p, i in merged:
            if max_records is not None and len(out) == max_records:
                break
            out.append(self._buf[p][i])
            taken[p] += 1
        # The merge keeps each partition's order, so what it let through is a prefix of each.
        for p, count in taken.items():
            self._take(p, count)
        return out

    def close(self) -> None:
        """Close the consumer; the positions stay readable."""
        self._consumer.close()

    def __enter__(self) -> TopicReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- internals --------------------------------------------------------------------------

    def _ready(
        self, p: int, ts_ms: int, far: int | None, limit: int | None, ends: Mapping[int, int]
    ) -> int:
        """How many records at the head of partition ``p`` ``read_until`` may return (at most
        ``limit``), fetching more as needed; nothing is taken."""
        buf = self._buf[p]
        i = 0
        while limit is None or i < limit:
            if i == len(buf):
                if not self._fetch(p, ends):
                    break
                continue
            ts = buf[i].ts_ms
            if ts >= ts_ms and (far is None or ts < far):
                break
            i += 1
        return i

    def _keyed(self, p: int, count: int, ts_ms: int) -> Iterator[tuple[int, int, int]]:
        """(merge key, partition, index) of the first ``count`` buffered records of ``p``: the
        stamp, except that a far-future record takes its predecessor's key."""
        key = _FIRST
        for i in range(count):
            ts = self._buf[p][i].ts_ms
            if ts < ts_ms:
                key = ts
            yield key, p, i

    def _fetch(self, p: int, ends: Mapping[int, int]) -> bool:
        """Poll the consumer once if partition ``p`` has records beyond what was delivered;
        whether any record (of any partition) came."""
        if self._fetched[p] >= ends[p]:
            return False
        got = self._consumer.poll(_CHUNK, timeout_s=_FETCH_WAIT_S)
        for r in got:
            self._buf[r.partition].append(r)
            self._fetched[r.partition] = r.offset + 1
        return bool(got)

    def _take(self, p: int, count: int) -> list[Record]:
        buf = self._buf[p]
        got = buf[:count]
        if got:
            del buf[:count]
            self._pos[p] = got[-1].offset + 1
        return got


def _check_limit(topic: str, max_records: int) -> None:
    if isinstance(max_records, bool) or not isinstance(max_records, int) or max_records < 1:
        raise StreamError(
            f"reader of topic {topic!r}: max_records must be an int >= 1, got {max_records!r}"
        )
