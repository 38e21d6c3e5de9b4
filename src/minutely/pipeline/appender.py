"""Exactly-once appends for deterministic producers.

A stage that writes to the log and crashes after writing but before its checkpoint will, once
restored, produce those same messages again. Every producer in minutely is deterministic given its
restored state and inputs (the simulator by seed, the join by its input order), so the re-produced
messages are identical, in the same order, to the ones already in the log. The checkpoint records
each output partition's end offset (and the settings that shape the messages, which a restore
checks); on restore the appender drops, per partition, as many messages
as the log already holds beyond that offset. Nothing is lost and nothing is written twice, on any
backend, without transactions.
"""

from __future__ import annotations

from collections.abc import Mapping

from minutely.errors import CheckpointError
from minutely.stream import Log, partitions_for


class IdempotentAppender:
    """Appends to one topic, skipping messages a previous incarnation already wrote."""

    def __init__(self, log: Log, topic: str, checkpointed_ends: Mapping[int, int] | None = None):
        self._log = log
        self._topic = topic
        self._partitions = log.partitions(topic)
        self._skip = {p: 0 for p in range(self._partitions)}
        if checkpointed_ends is not None:
            for p, end in checkpointed_ends.items():
                have = log.end_offset(topic, int(p))
                if have < int(end):
                    raise CheckpointError(
                        f"topic {topic!r} partition {p}: the checkpoint counts {end} records "
                        f"but the log holds {have} (a different or truncated log)"
                    )
                self._skip[int(p)] = have - int(end)

    @property
    def topic(self) -> str:
        return self._topic

    def pending_skips(self) -> dict[int, int]:
        """Messages still to be dropped per partition (0 once caught up)."""
        return dict(self._skip)

    def ends(self) -> dict[int, int]:
        """End offsets to store in a checkpoint (what this producer has logically written)."""
        return {
            p: self._log.end_offset(self._topic, p) - self._skip[p] for p in range(self._partitions)
        }

    def append_keyed(self, messages: list[tuple[bytes | None, bytes, int]]) -> int:
        """Append keyed messages (partition by key); returns how many were written."""
        by_part: dict[int, list[tuple[bytes | None, bytes, int]]] = {}
        keys = [b"" if m[0] is None else m[0] for m in messages]
        parts = partitions_for(keys, self._partitions)
        for msg, p in zip(messages, parts, strict=True):
            by_part.setdefault(0 if msg[0] is None else p, []).append(msg)
        return sum(self.append_to(p, msgs) for p, msgs in sorted(by_part.items()))

    def append_to(self, partition: int, messages: list[tuple[bytes | None, bytes, int]]) -> int:
        """Append messages to one partition; returns how many were written."""
        skip = self._skip[partition]
        if skip:
            dropped = min(skip, len(messages))
            self._skip[partition] = skip - dropped
            messages = messages[dropped:]
        if messages:
            self._log.append(self._topic, messages, partition=partition)
        return len(messages)
