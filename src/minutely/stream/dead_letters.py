"""Bad input as data: the dead-letter topic.

A stage that meets a record it cannot use (an event that does not decode, a sample of the wrong
schema) hands it to a :class:`DeadLetterSink` with the reason and where it came from, and goes on.
Each dead letter is one JSON record ``{"reason", "source", "ts_ms", "payload_b64"}``; the original
bytes are kept whole (base64), so a fixed consumer can replay them.

>>> import tempfile
>>> from pathlib import Path
>>> from minutely.stream.sqlite import SqliteLog
>>> log = SqliteLog(Path(tempfile.mkdtemp()) / "log.sqlite")
>>> sink = DeadLetterSink(log, "dead_letters")
>>> sink.send(b"{not json", "undecodable event: expected ':'", "events/2@1234", 1_000)
>>> sink.count, sink.counts_by_reason
(1, {'undecodable event': 1})
>>> read_dead_letters(log, "dead_letters")[0].payload
b'{not json'
>>> log.close()
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import msgspec

from minutely.errors import StreamError
from minutely.stream.base import Log


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One rejected record: why, where from (``topic/partition@offset``), when, and its bytes."""

    reason: str
    source: str
    ts_ms: int
    payload: bytes


class _Wire(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    reason: str
    source: str
    ts_ms: int
    payload_b64: bytes  # msgspec writes and reads bytes as base64 strings


_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(_Wire)


class DeadLetterSink:
    """Appends dead letters to ``topic`` (created with ``partitions`` if missing) and counts them.

    ``send`` appends at once, one record per call, and buffers nothing: dead letters are rare, and
    a letter lost in a buffer at a crash would be bad input silently dropped. A letter is keyed by
    its source's ``topic/partition`` (the part of ``source`` before ``@``), so letters from one
    source partition stay in order.

    ``count`` and ``counts_by_reason`` cover the letters sent through this sink since it was
    built. Reasons are grouped by their text before the first ``:`` (``"undecodable event:
    expected ':'"`` counts as ``"undecodable event"``), so the counts stay few however detailed
    the reasons are.
    """

    def __init__(
        self,
        log: Log,
        topic: str,
        partitions: int = 1,
        *,
        write: Callable[[list[tuple[bytes | None, bytes, int]]], object] | None = None,
        counts_by_reason: Mapping[str, int] | None = None,
    ) -> None:
        """``write`` replaces the plain keyed append (e.g. by an exactly-once appender), and
        ``counts_by_reason`` restores the counts of a checkpointed sink."""
        self._log = log
        self._topic = topic
        log.create_topic(topic, partitions)
        self._write = write
        self._by_reason: dict[str, int] = dict(counts_by_reason or {})
        self._count = sum(self._by_reason.values())

    @property
    def topic(self) -> str:
        return self._topic

    @property
    def count(self) -> int:
        """Letters sent through this sink."""
        return self._count

    @property
    def counts_by_reason(self) -> dict[str, int]:
        """A copy of the letter counts per reason group (the reason up to its first ``:``)."""
        return dict(self._by_reason)

    def send(self, payload: bytes, reason: str, source: str, ts_ms: int) -> None:
        """Append one dead letter now; raises :class:`StreamError` if the log refuses it."""
        if not isinstance(payload, bytes):
            raise StreamError(
                f"dead letter to topic {self._topic!r} from {source!r}: payload must be bytes, "
                f"got {type(payload).__name__}"
            )
        if not isinstance(source, str) or isinstance(ts_ms, bool) or not isinstance(ts_ms, int):
            raise StreamError(
                f"dead letter to topic {self._topic!r}: source must be a string and ts_ms an "
                f"int, got {source!r} and {ts_ms!r}"
            )
        if not isinstance(reason, str) or not reason.strip():
            raise StreamError(
                f"dead letter to topic {self._topic!r} from {source!r}: reason must be a "
                f"non-empty string, got {reason!r}"
            )
        wire = _Wire(reason=reason, source=source, ts_ms=ts_ms, payload_b64=payload)
        key = source.split("@", 1)[0].encode()
        message: tuple[bytes | None, bytes, int] = (key, _ENCODER.encode(wire), ts_ms)
        if self._write is not None:
            self._write([message])
        else:
            self._log.append(self._topic, [message])
        self._count += 1
        group = reason_group(reason)
        self._by_reason[group] = self._by_reason.get(group, 0) + 1


def reason_group(reason: str) -> str:
    """The part of ``reason`` that dead letters are counted by: its text before the first ``:``.

    >>> reason_group("invalid event: Expected `int`, got `str` - at `$.ts_ms`")
    'invalid event'
    """
    return reason.split(":", 1)[0].strip()


def read_dead_letters(log: Log, topic: str) -> list[DeadLetter]:
    """Every dead letter in ``topic``, partition by partition, each in offset order.

    Raises :class:`StreamError` naming the partition and offset of a record that is not a dead
    letter.
    """
    out: list[DeadLetter] = []
    for p in range(log.partitions(topic)):
        off = 0
        while True:
            batch = log.read(topic, p, off, 5_000)
            if not batch:
                break
            for r in batch:
                try:
                    w = _DECODER.decode(r.value)
                except msgspec.DecodeError as exc:  # ValidationError is a subclass
                    raise StreamError(
                        f"dead-letter topic {topic!r} partition {p} offset {r.offset}: "
                        f"not a dead letter: {exc}"
                    ) from exc
                out.append(DeadLetter(w.reason, w.source, w.ts_ms, w.payload_b64))
            off = batch[-1].offset + 1
    return out
