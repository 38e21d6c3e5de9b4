"""The log interface that connects the stages.

Shaped after Kafka: a topic has a fixed number of partitions; each partition is an append-only
sequence of records addressed by increasing offsets. Offsets may have gaps (a Kafka broker spends
offsets on transaction markers; compaction removes records), so nothing may assume that the
record after offset ``o`` is ``o + 1``. A consumer's *position* in a partition is the offset after
the last record it consumed (``last.offset + 1``). Consumers own their positions (each stage's
checkpoint stores them): the log never tracks or auto-commits them.

Two backends implement it: the embedded SQLite log and Kafka. Both pass the same conformance
suite (``tests/stream/test_log_conformance.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from minutely.errors import StreamError

Headers = tuple[tuple[str, bytes], ...]

# A message to append: (key, value, ts_ms) or (key, value, ts_ms, headers).
Message = tuple[bytes | None, bytes, int] | tuple[bytes | None, bytes, int, Headers]

# Group callbacks: which partitions a member gains (returning the position to start each from;
# a partition missing from the answer starts at the beginning) and which it is about to lose.
OnAssign = Callable[[list[int]], Mapping[int, int]]
OnRevoke = Callable[[list[int]], None]


@dataclass(frozen=True, slots=True)
class Record:
    """One message: its place in the log, an optional key, the payload, its time and headers."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    ts_ms: int
    headers: Headers = ()


def message_headers(message: Message) -> Headers:
    """The headers of a message (empty for a 3-tuple)."""
    return message[3] if len(message) == 4 else ()


class Consumer(Protocol):
    """Sequential reader of one topic: the assigned partitions, from caller-owned positions.

    Without a group the caller assigns partitions itself (:meth:`assign`). In a group the members
    split the topic's partitions; when a member joins, leaves or dies, partitions move.
    ``on_revoke`` runs (on the polling thread, inside :meth:`poll` or :meth:`close`) before a
    member stops owning partitions, so the caller can checkpoint them; ``on_assign`` runs when a
    member gains partitions and returns the position to start each from (the caller's own
    checkpoint). After a rebalance completes, no two live members read one partition; a member
    that dies without closing loses its partitions after the session timeout.
    """

    @property
    def topic(self) -> str: ...

    def assign(self, positions: Mapping[int, int]) -> None:
        """Read exactly these partitions from these positions (replaces any assignment)."""
        ...

    def positions(self) -> dict[int, int]:
        """Per assigned partition, the offset after the last record :meth:`poll` returned."""
        ...

    def poll(self, max_records: int, timeout_s: float = 0.0) -> list[Record]:
        """Up to ``max_records`` records from the assigned partitions, each partition in offset
        order and fair across partitions; waits up to ``timeout_s`` for at least one."""
        ...

    def seek(self, partition: int, offset: int) -> None: ...

    def end_offsets(self) -> dict[int, int]:
        """Per assigned partition, the offset after its last readable record."""
        ...

    def close(self) -> None:
        """Stop reading; a group member leaves the group (its partitions move at once)."""
        ...


class Log(Protocol):
    """What every log backend (embedded SQLite, Kafka) implements.

    * ``create_topic`` is idempotent for the same partition count and raises
      :class:`~minutely.errors.StreamError` for a different one.
    * ``append`` returns ``(partition, offset)`` per message, in order; a message with a key goes
      to ``partition_for(key, n)`` (Kafka's default partitioner) unless ``partition`` is given;
      without a key or partition, to partition 0. A batch is atomic on SQLite but not on Kafka
      (a crash may leave a prefix of it written): exactly-once must not rely on batch atomicity.
    * ``read(topic, partition, offset, max_records)`` is a random-access read (tools, checking a
      log's tail): records with offsets ``>= offset`` in order, at most ``max_records``, possibly
      none at the end; an offset beyond ``end_offset`` raises
      :class:`~minutely.errors.OffsetOutOfRangeError`. Stages read through :meth:`consumer`.
    * Unknown topics raise :class:`~minutely.errors.TopicNotFoundError`.
    * A message's ``ts_ms`` is epoch milliseconds >= 1: Kafka cannot carry 0 (librdkafka stamps
      it with the current time), so the Kafka backend refuses it.
    """

    def create_topic(self, topic: str, partitions: int) -> None: ...

    def partitions(self, topic: str) -> int: ...

    def append(
        self,
        topic: str,
        messages: Sequence[Message],
        partition: int | None = None,
    ) -> list[tuple[int, int]]:
        """Append ``(key, value, ts_ms[, headers])`` messages."""
        ...

    def read(self, topic: str, partition: int, offset: int, max_records: int) -> list[Record]: ...

    def end_offset(self, topic: str, partition: int) -> int:
        """The offset after the last readable record of a partition (its high watermark)."""
        ...

    def consumer(
        self,
        topic: str,
        *,
        group: str | None = None,
        on_assign: OnAssign | None = None,
        on_revoke: OnRevoke | None = None,
    ) -> Consumer:
        """A sequential reader of ``topic``: assigned by the caller, or a member of ``group``."""
        ...

    def close(self) -> None: ...


def check_topic_args(where: str, topic: object, partitions: object) -> None:
    """The arguments of ``create_topic``, checked alike by every backend (``where`` names it)."""
    if not isinstance(topic, str) or not topic:
        raise StreamError(f"{where}: topic name must be a non-empty string, got {topic!r}")
    if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
        raise StreamError(
            f"{where}: topic {topic!r} needs an int >= 1 partitions, got {partitions!r}"
        )


def check_read_args(where: str, offset: object, max_records: object) -> None:
    """The offset and limit of ``read``, checked alike by every backend (``where`` names it)."""
    if isinstance(max_records, bool) or not isinstance(max_records, int) or max_records < 0:
        raise StreamError(f"{where}: max_records must be an int >= 0, got {max_records!r}")
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise StreamError(f"{where}: offset must be an int, got {offset!r}")


def partition_for(key: bytes, partitions: int) -> int:
    """Stable key -> partition mapping (murmur2, as Kafka's default partitioner)."""
    return (_murmur2(key) & 0x7FFFFFFF) % partitions


def _murmur2(data: bytes) -> int:
    length = len(data)
    seed = 0x9747B28C
    m = 0x5BD1E995
    r = 24
    h = (seed ^ length) & 0xFFFFFFFF
    n4 = length // 4
    for i in range(n4):
        k = int.from_bytes(data[4 * i : 4 * i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = (h * m) & 0xFFFFFFFF
        h ^= k
    rest = length & 3
    tail = data[4 * n4 :]
    if rest == 3:
        h ^= tail[2] << 16
    if rest >= 2:
        h ^= tail[1] << 8
    if rest >= 1:
        h ^= tail[0]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h
