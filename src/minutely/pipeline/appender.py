"""Exactly-once appends: every output message has an identity, and a restore checks what it skips.

Every producer in minutely is deterministic given its restored state and its inputs (the simulator
by seed and window, the join by its partition's records), so a stage that crashes after writing
but before its checkpoint re-produces, once restored, exactly the messages it had already written.
Each message carries its identity in two headers: the *writer id* (one logical writer, e.g.
``join/events/3``, stable across restarts and processes) and a per-partition *sequence number*.

A checkpoint stores, per partition, the next sequence number and the offset from which the
writer's unconfirmed messages can lie (the partition's end when the checkpoint was taken). A
writer without a checkpoint starts at sequence 0 from the beginning of the partition: an
incarnation that died before its first checkpoint (or a run started again in the same place)
may have written already. On start the writer reads that tail and keeps the messages bearing its
own id (any number of other writers may share the topic: their messages are passed over); then,
for each message it produces again, it compares it with the one the log holds under that
sequence number: the same key, value and time are skipped; anything else raises
:class:`~minutely.errors.CheckpointError`, because the inputs or the settings changed since the
checkpoint and appending would mix two streams. The scheme needs no transactions and works on
every log backend.

>>> import tempfile
>>> from pathlib import Path
>>> from minutely.stream.sqlite import SqliteLog
>>> log = SqliteLog(Path(tempfile.mkdtemp()) / "log.sqlite")
>>> log.create_topic("t", 1)
>>> first = ExactlyOnceWriter(log, "t", "w")
>>> first.append_to(0, [(None, b"a", 1)])
1
>>> saved = first.state()
>>> first.append_to(0, [(None, b"b", 2)])  # written, then the process dies: no checkpoint
1
>>> again = ExactlyOnceWriter(log, "t", "w", saved)
>>> again.append_to(0, [(None, b"b", 2), (None, b"c", 3)])  # b is verified and skipped
1
>>> [r.value for r in log.read("t", 0, 0, 10)]
[b'a', b'b', b'c']
>>> log.close()
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from minutely.errors import CheckpointError
from minutely.stream import Log, Record, partitions_for
from minutely.stream.base import Headers, Message

WRITER_HEADER = "minutely.writer"
SEQ_HEADER = "minutely.seq"
_READ_CHUNK = 5_000


def identity(record: Record) -> tuple[str, int] | None:
    """``(writer id, sequence number)`` of a record written by an :class:`ExactlyOnceWriter`."""
    writer: bytes | None = None
    seq: bytes | None = None
    for name, value in record.headers:
        if name == WRITER_HEADER:
            writer = value
        elif name == SEQ_HEADER:
            seq = value
    if writer is None or seq is None:
        return None
    try:
        return writer.decode(), int(seq)
    except (UnicodeDecodeError, ValueError):
        return None


class ExactlyOnceWriter:
    """Appends to one topic under one writer id; after a restore, verifies and skips what the
    previous incarnation already wrote.

    ``state`` is what :meth:`state` returned at the last checkpoint (``None``: no checkpoint, so
    every message of this writer in the topic is one to produce again).
    """

    def __init__(
        self, log: Log, topic: str, writer_id: str, state: Mapping[str, Any] | None = None
    ) -> None:
        if not writer_id:
            raise CheckpointError(f"writer of topic {topic!r}: the writer id must not be empty")
        self._log = log
        self._topic = topic
        self._id = writer_id
        self._id_bytes = writer_id.encode()
        self._n = log.partitions(topic)
        self._seq = [0] * self._n
        self._pending: list[deque[Record]] = [deque() for _ in range(self._n)]
        if state is None:
            for p in range(self._n):
                self._pending[p] = self._tail(p, 0, 0)
        else:
            self._restore(state)

    @property
    def topic(self) -> str:
        return self._topic

    @property
    def writer_id(self) -> str:
        return self._id

    def pending(self) -> dict[int, int]:
        """Messages found in the log's tail not yet produced again, per partition."""
        return {p: len(q) for p, q in enumerate(self._pending)}

    def sequences(self) -> dict[int, int]:
        """The sequence number of the next message, per partition (messages written so far)."""
        return dict(enumerate(self._seq))

    def state(self) -> dict[str, Any]:
        """JSON-able state for a checkpoint: per partition the next sequence number and where in
        the log this writer's later messages can start."""
        parts: dict[str, dict[str, int]] = {}
        for p in range(self._n):
            q = self._pending[p]
            start = q[0].offset if q else self._log.end_offset(self._topic, p)
            parts[str(p)] = {"seq": self._seq[p], "from": start}
        return {"writer": self._id, "topic": self._topic, "partitions": parts}

    def append_keyed(self, messages: Sequence[Message]) -> int:
        """Append messages routed by key (no key: partition 0); returns how many were written."""
        keys = [b"" if m[0] is None else m[0] for m in messages]
        parts = partitions_for(keys, self._n)
        by_part: dict[int, list[Message]] = {}
        for msg, p in zip(messages, parts, strict=True):
            by_part.setdefault(0 if msg[0] is None else p, []).append(msg)
        return sum(self.append_to(p, msgs) for p, msgs in sorted(by_part.items()))

    def append_to(self, partition: int, messages: Sequence[Message]) -> int:
        """Append messages to one partition; returns how many were written (not skipped)."""
        pending = self._pending[partition]
        seq = self._seq[partition]
        out: list[Message] = []
        for msg in messages:
            if pending:
                self._verify(pending.popleft(), msg, seq)
            else:
                out.append((msg[0], msg[1], msg[2], self._headers(seq, msg)))
            seq += 1
        if out:
            self._log.append(self._topic, out, partition=partition)
        self._seq[partition] = seq
        return len(out)

    # -- internals -------------------------------------------------------------------------------

    def _headers(self, seq: int, msg: Message) -> Headers:
        own: Headers = ((WRITER_HEADER, self._id_bytes), (SEQ_HEADER, str(seq).encode()))
        return own + msg[3] if len(msg) == 4 else own

    def _verify(self, logged: Record, msg: Message, seq: int) -> None:
        if (logged.key, logged.value, logged.ts_ms) != (msg[0], msg[1], msg[2]):
            raise CheckpointError(
                f"writer {self._id!r} of topic {self._topic!r}: the restored stage produced "
                f"message {seq} of partition {logged.partition} differently from the one the log "
                f"holds at offset {logged.offset} (its inputs or settings changed since the "
                "checkpoint); refusing to mix two streams in one topic"
            )

    def _restore(self, state: Mapping[str, Any]) -> None:
        where = f"writer {self._id!r} of topic {self._topic!r}: checkpoint"
        try:
            if state["writer"] != self._id or state["topic"] != self._topic:
                raise CheckpointError(
                    f"{where} belongs to writer {state['writer']!r} of topic {state['topic']!r}"
                )
            parts = {
                int(p): (int(v["seq"]), int(v["from"])) for p, v in state["partitions"].items()
            }
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"{where} is malformed ({exc!r})") from exc
        if set(parts) != set(range(self._n)):
            raise CheckpointError(
                f"{where} names partitions {sorted(parts)}, the topic has 0..{self._n - 1}"
            )
        for p, (seq, start) in parts.items():
            self._seq[p] = seq
            self._pending[p] = self._tail(p, seq, start)

    def _tail(self, p: int, seq: int, start: int) -> deque[Record]:
        """This writer's records in partition ``p`` from offset ``start`` on, checked to carry
        the sequence numbers ``seq, seq + 1, ...`` (anything else means a foreign checkpoint)."""
        end = self._log.end_offset(self._topic, p)
        if start > end:
            raise CheckpointError(
                f"writer {self._id!r} of topic {self._topic!r}: the checkpoint expects partition "
                f"{p} to reach offset {start} but the log ends at {end} (a different or "
                "truncated log)"
            )
        mine: deque[Record] = deque()
        off = start
        while off < end:
            got = self._log.read(self._topic, p, off, _READ_CHUNK)
            if not got:
                break
            for r in got:
                ident = identity(r)
                if ident is None or ident[0] != self._id:
                    continue
                want = seq + len(mine)
                if ident[1] != want:
                    raise CheckpointError(
                        f"writer {self._id!r} of topic {self._topic!r}: partition {p} offset "
                        f"{r.offset} holds this writer's message {ident[1]}, expected {want} "
                        "(the checkpoint does not belong to this log)"
                    )
                mine.append(r)
            off = got[-1].offset + 1
        return mine
