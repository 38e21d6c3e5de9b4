"""The log interface that connects the stages.

Shaped after Kafka: a topic has a fixed number of partitions; each partition is an append-only
sequence of records addressed by a dense offset starting at 0. Consumers own their positions
(the checkpoint stores them), so the log never tracks or auto-commits them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Record:
    """One message: its place in the log, an optional key, the payload and its event time."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    ts_ms: int


class Log(Protocol):
    """What every log backend (embedded SQLite, Kafka) implements.

    * ``create_topic`` is idempotent for the same partition count and raises
      :class:`~minutely.errors.StreamError` for a different one.
    * ``append`` returns ``(partition, offset)`` per message, in order; a message with a key goes
      to ``partition_for(key, n)`` unless ``partition`` is given; without a key or partition, to
      partition 0.
    * ``read(topic, partition, offset, max_records)`` returns records with offsets
      ``offset, offset + 1, ...`` (fewer, possibly none, at the end); an offset beyond
      ``end_offset`` raises :class:`~minutely.errors.OffsetOutOfRangeError`.
    * Unknown topics raise :class:`~minutely.errors.TopicNotFoundError`.
    """

    def create_topic(self, topic: str, partitions: int) -> None: ...

    def partitions(self, topic: str) -> int: ...

    def append(
        self,
        topic: str,
        messages: list[tuple[bytes | None, bytes, int]],
        partition: int | None = None,
    ) -> list[tuple[int, int]]:
        """Append ``(key, value, ts_ms)`` messages atomically."""
        ...

    def read(self, topic: str, partition: int, offset: int, max_records: int) -> list[Record]: ...

    def end_offset(self, topic: str, partition: int) -> int:
        """The offset the next appended record will get (the count of records)."""
        ...

    def close(self) -> None: ...


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
