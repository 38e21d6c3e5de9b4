"""The Kafka side of :class:`~minutely.stream.base.Consumer`: one librdkafka consumer.

Positions are the caller's: nothing is committed to the broker, and a partition starts where the
caller says (``assign``, or ``on_assign`` in a group). Records that librdkafka has fetched but
:meth:`KafkaConsumer.poll` has not returned wait in a buffer per partition, so ``positions()``
counts returned records only and a poll can share its ``max_records`` fairly among partitions.

Groups use Kafka's eager protocol with the range assignor (contiguous ranges, as the SQLite
log's groups): at a rebalance every member revokes all its partitions (``on_revoke``, while it
still owns them) before any member is given its new ones (``on_assign``), so a partition a member
keeps is revoked and assigned again. (The cooperative protocol, which moves only the partitions
that change owner, stalls on the test broker when members join from separate processes.)
Partitions a member *lost* (it was deemed dead, e.g. it did not poll or heartbeat within the
session timeout) already belong to another member, so they are dropped without ``on_revoke``: a
checkpoint written then could overwrite the new owner's.

A partition read to its end rests (is paused) until a poll asks for more, and a poll that waits
looks for new records every ``_IDLE_FETCH_S``: see :mod:`minutely.stream.kafka_rest` for why.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from minutely.errors import OffsetOutOfRangeError, StreamError, TopicNotFoundError
from minutely.stream.base import OnAssign, OnRevoke, Record
from minutely.stream.kafka_client import LOG, describe, describe_error, record_fields
from minutely.stream.kafka_rest import Resting

# How many fetched records one poll moves from librdkafka's queue into the buffers at a time,
# and the buffered bytes beyond which a poll stops moving more (fairness needs only a few).
_CHUNK = 1_000
_MAX_BUFFERED_BYTES = 64 << 20
# While a poll waits and every partition rests, how often it asks whether records came (the
# latency of a record appended then), and how long it waits for that answer at most.
_IDLE_FETCH_S = 0.1
_WAKE_TIMEOUT_S = 1.0

# Events that say the broker cannot be reached right now; librdkafka keeps reconnecting.
_UNREACHABLE = {
    KafkaError._TRANSPORT,
    KafkaError._ALL_BROKERS_DOWN,
    KafkaError._RESOLVE,
    KafkaError._TIMED_OUT,
}
# Events that need nothing from the caller: librdkafka recovers by itself.
_INFORMATIONAL = {
    KafkaError._MAX_POLL_EXCEEDED,
    KafkaError._NO_OFFSET,
}
_OUT_OF_RANGE = {KafkaError._AUTO_OFFSET_RESET, KafkaError.OFFSET_OUT_OF_RANGE}
_UNKNOWN_TOPIC = {
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError._UNKNOWN_TOPIC,
    KafkaError._UNKNOWN_PARTITION,
}


def warm_up(consumer: Consumer, topic: str, timeout_s: float) -> None:
    """Fetch the topic's metadata now: a partition assigned before its leader is known starts
    only after librdkafka's 500 ms retry timer. A failure here is left to later calls."""
    try:
        consumer.list_topics(topic, timeout=timeout_s)
    except KafkaException as exc:
        LOG.info("metadata of topic %r not fetched yet: %s", topic, describe(exc))


def consume_some(consumer: Consumer, max_n: int, timeout_s: float) -> list[Message]:
    """Up to ``max_n`` messages or events: what is already fetched, else the first to arrive
    within ``timeout_s``. (librdkafka's ``consume(n, t)`` waits for all ``n`` or the whole
    ``t``.)"""
    got = consumer.consume(max_n, 0)
    if got or timeout_s <= 0:
        return got
    got = consumer.consume(1, timeout_s)
    if got and max_n > 1:
        got.extend(consumer.consume(max_n - 1, 0))
    return got


class KafkaConsumer:
    """A :class:`~minutely.stream.base.Consumer` of one Kafka topic; built by
    :meth:`minutely.stream.kafka.KafkaLog.consumer`."""

    def __init__(
        self,
        *,
        servers: str,
        conf: dict[str, Any],
        topic: str,
        partitions: int,
        group: str | None,
        on_assign: OnAssign | None,
        on_revoke: OnRevoke | None,
        request_timeout_s: float,
    ) -> None:
        self._topic = topic
        self._n = partitions
        self._group = group
        self._on_assign = on_assign
        self._on_revoke = on_revoke
        self._timeout_s = request_timeout_s
        member = f" in group {group!r}" if group is not None else ""
        self._where = f"kafka log {servers}: consumer of topic {topic!r}{member}"
        self._pos: dict[int, int] = {}
        self._buf: dict[int, deque[Record]] = {}
        self._buf_bytes = 0
        # Per assigned partition, the offset librdkafka has fetched it through: after the last
        # record delivered, or where it reported the partition's end.
        self._reached: dict[int, int] = {}
        self._rest = Resting(topic, self._where)
        self._next = 0  # which partition a poll serves first (rotates, so none starves)
        self._failure: StreamError | None = None
        self._down_since: float | None = None
        self._last_error = ""
        self._closed = False
        try:
            # End-of-partition events tell when a partition is read to its end (and may rest).
            self._c = Consumer({**conf, "enable.partition.eof": True, "error_cb": self._on_error})
            warm_up(self._c, topic, request_timeout_s)
            if group is not None:
                self._c.subscribe(
                    [topic], on_assign=self._assigned, on_revoke=self._revoked, on_lost=self._lost
                )
        except (KafkaException, ValueError, TypeError) as exc:
            raise StreamError(f"{self._where}: cannot start: {describe(exc)}") from exc

    # --- the Consumer protocol --------------------------------------------------------------

    @property
    def topic(self) -> str:
        return self._topic

    def assign(self, positions: Mapping[int, int]) -> None:
        """Read exactly these partitions from these positions (replaces any assignment)."""
        self._live("assign")
        if self._group is not None:
            raise StreamError(
                f"{self._where}: assign() is for consumers without a group; a member's "
                "partitions come from the group"
            )
        wanted = {p: self._checked_position(p, off) for p, off in positions.items()}
        try:
            self._rest.release(self._c)
            if wanted:
                self._c.assign([self._tp(p, off) for p, off in sorted(wanted.items())])
            else:
                self._c.unassign()
        except KafkaException as exc:
            raise StreamError(f"{self._where}: assign {wanted} failed: {describe(exc)}") from exc
        self._pos = wanted
        self._reached = dict(wanted)
        self._buf = {p: deque() for p in wanted}
        self._buf_bytes = 0

    def positions(self) -> dict[int, int]:
        """Per assigned partition, the offset after the last record :meth:`poll` returned."""
        return dict(self._pos)

    def poll(self, max_records: int, timeout_s: float = 0.0) -> list[Record]:
        """Up to ``max_records`` records, shared round-robin among the partitions with data;
        waits up to ``timeout_s`` for the first. A group member joins and rebalances in here."""
        self._live("poll")
        if isinstance(max_records, bool) or not isinstance(max_records, int) or max_records < 1:
            raise StreamError(
                f"{self._where}: max_records must be an int >= 1, got {max_records!r}"
            )
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or timeout_s < 0:
            raise StreamError(f"{self._where}: timeout_s must be a number >= 0, got {timeout_s!r}")
        self._check_reachable()
        deadline = time.monotonic() + timeout_s
        self._wake()
        # Partitions that came to rest in this poll are looked at again at once (the end they
        # reached may be old), but once only: after that, every _IDLE_FETCH_S.
        looked: set[int] = set()
        while True:
            left = max(0.0, deadline - time.monotonic())
            idle = self._rest.all_rest(self._pos)
            self._fill(max_records, min(left, _IDLE_FETCH_S) if idle else left)
            rested = self._settle()
            out = self._take(max_records)
            if out or time.monotonic() >= deadline:
                return out
            again = set(rested) - looked
            if again:
                looked |= again
                self._wake(again)
            elif idle:
                self._wake()

    def seek(self, partition: int, offset: int) -> None:
        """Read ``partition`` from ``offset`` next (it must be assigned to this consumer)."""
        self._live("seek")
        if partition not in self._pos:
            raise StreamError(
                f"{self._where}: cannot seek partition {partition!r}: it is not assigned to this "
                f"consumer (assigned: {sorted(self._pos)})"
            )
        offset = self._checked_position(partition, offset)
        try:
            self._c.seek(self._tp(partition, offset))
        except KafkaException as exc:
            raise StreamError(
                f"{self._where}: seek partition {partition} to {offset} failed: {describe(exc)}"
            ) from exc
        self._pos[partition] = offset
        self._reached[partition] = offset
        self._rest.forget([partition])
        self._drop_buffer(partition)
        self._buf[partition] = deque()

    def end_offsets(self) -> dict[int, int]:
        """Per assigned partition, the offset after its last readable record."""
        self._live("end_offsets")
        return {p: self._watermarks(p)[1] for p in sorted(self._pos)}

    def close(self) -> None:
        """Stop reading; a member leaves its group (``on_revoke`` runs for its partitions).
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        before = self._failure
        try:
            self._c.close()
        except (KafkaException, RuntimeError) as exc:
            raise StreamError(f"{self._where}: close failed: {describe(exc)}") from exc
        finally:
            self._pos.clear()
            self._reached.clear()
            self._buf.clear()
        if self._failure is not before:  # an on_revoke that failed while leaving
            self._raise_failure()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"positions {self._pos}"
        return f"KafkaConsumer({self._where!r}, {state})"

    # --- rebalance callbacks (run by librdkafka inside consume() and close()) ----------------

    def _assigned(self, consumer: Consumer, tps: list[TopicPartition]) -> None:
        parts = sorted(tp.partition for tp in tps)
        starts: dict[int, int] = {}
        if parts and self._on_assign is not None and self._failure is None:
            try:
                starts = self._starts(parts, self._on_assign(parts))
            except Exception as exc:
                self._failure = StreamError(
                    f"{self._where}: on_assign for partitions {parts} failed: {exc!r}"
                )
                self._failure.__cause__ = exc
        chosen = [self._tp(p, starts.get(p, 0)) for p in parts]
        try:
            consumer.assign(chosen)
            if self._failure is not None:
                # Without a position from the caller nothing may be read from them.
                consumer.pause(chosen)
                return
        except KafkaException as exc:
            self._fail(f"assigning partitions {parts} failed: {describe(exc)}", exc)
            return
        self._pos = {p: starts.get(p, 0) for p in parts}
        self._reached = dict(self._pos)
        self._buf = {p: deque() for p in parts}
        self._buf_bytes = 0

    def _revoked(self, consumer: Consumer, tps: list[TopicPartition]) -> None:
        parts = sorted(tp.partition for tp in tps if tp.partition in self._pos)
        try:
            if parts and self._on_revoke is not None and self._failure is None:
                self._on_revoke(parts)
        except Exception as exc:
            self._fail(f"on_revoke for partitions {parts} failed: {exc!r}", exc)
        finally:
            self._forget(consumer, tps)

    def _lost(self, consumer: Consumer, tps: list[TopicPartition]) -> None:
        LOG.warning(
            "%s: lost partitions %s (another member owns them now)",
            self._where,
            sorted(tp.partition for tp in tps),
        )
        self._forget(consumer, tps)

    def _forget(self, consumer: Consumer, tps: list[TopicPartition]) -> None:
        # The eager protocol revokes (or loses) the whole assignment at once.
        self._pos.clear()
        self._reached.clear()
        self._buf.clear()
        self._buf_bytes = 0
        try:
            self._rest.release(consumer)
            consumer.unassign()
        except KafkaException as exc:
            self._fail(f"giving up partitions failed: {describe(exc)}", exc)

    def _starts(self, parts: list[int], answer: Mapping[int, int]) -> dict[int, int]:
        starts: dict[int, int] = {}
        for p in parts:
            off = answer.get(p, 0)
            if isinstance(off, bool) or not isinstance(off, int) or off < 0:
                raise StreamError(f"position for partition {p} must be an int >= 0, got {off!r}")
            starts[p] = off
        return starts

    # --- internals --------------------------------------------------------------------------

    def _fill(self, max_records: int, wait_s: float) -> None:
        """Move fetched records into the buffers: until each partition has a full share, the
        fetched queue is empty or the buffers are large; waits up to ``wait_s`` when nothing
        is buffered."""
        while True:
            buffered = any(self._buf.values())
            got = consume_some(self._c, _CHUNK, 0.0 if buffered else wait_s)
            self._accept(got)
            self._raise_failure()
            if not got or self._buf_bytes >= _MAX_BUFFERED_BYTES:
                return
            if all(len(b) >= max_records for b in self._buf.values()):
                return
            wait_s = 0.0

    def _accept(self, msgs: list[Message]) -> None:
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    self._at_end(m)
                else:
                    self._event(err, m)
                continue
            p = m.partition()
            buf = self._buf.get(p) if p is not None and m.topic() == self._topic else None
            if p is None or buf is None:
                continue  # a partition revoked while this batch was fetched
            off, key, value, ts, headers = record_fields(m)
            if off < (buf[-1].offset + 1 if buf else self._pos[p]):
                continue  # fetched before a seek or a reassignment
            buf.append(Record(self._topic, p, off, key, value, ts, headers))
            self._buf_bytes += len(value)
            self._reached[p] = off + 1
            self._rest.record(p)
            self._down_since = None

    def _at_end(self, m: Message) -> None:
        """librdkafka reached the end of a partition (it reports each end once)."""
        p = m.partition()
        if p is None or p not in self._reached or m.topic() != self._topic:
            return
        off = m.offset()
        if off is not None:
            if off < self._reached[p]:
                return  # reported before a seek or a reassignment
            self._reached[p] = off
        self._rest.end(p)
        self._down_since = None

    def _settle(self) -> list[int]:
        """Rest the partitions read to their end; returns them."""
        try:
            return self._rest.settle(self._c, self._reached)
        except KafkaException as exc:
            raise StreamError(
                f"{self._where}: pausing caught-up partitions failed: {describe(exc)}"
            ) from exc

    def _wake(self, only: set[int] | None = None) -> None:
        """Resume resting partitions that have records to fetch (all, or those of ``only``)."""
        try:
            self._rest.wake(self._c, self._reached, _WAKE_TIMEOUT_S, only)
        except KafkaException as exc:
            raise StreamError(
                f"{self._where}: resuming resting partitions failed: {describe(exc)}"
            ) from exc

    def _on_error(self, err: KafkaError) -> None:
        """librdkafka's client-wide errors (served inside consume()): remember, never raise."""
        if err.code() in _UNREACHABLE:
            self._unreachable(err)
        elif err.fatal():
            self._fail(f"the client failed: {describe_error(err)}", KafkaException(err))
        else:
            LOG.info("%s: %s", self._where, describe_error(err))

    def _unreachable(self, err: KafkaError) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
        self._last_error = describe_error(err)

    def _event(self, err: KafkaError, m: Message) -> None:
        """An error delivered in place of a message."""
        code = err.code()
        p = m.partition()
        if code in _UNREACHABLE:
            self._unreachable(err)
            return
        if code in _INFORMATIONAL:
            LOG.info("%s: %s", self._where, describe_error(err))
            return
        if code in _OUT_OF_RANGE and p is not None and p in self._pos:
            raise OffsetOutOfRangeError(
                f"{self._where}: partition {p}: position {self._pos[p]} is outside the "
                f"partition's offsets: {describe_error(err)}"
            )
        if code in _UNKNOWN_TOPIC:
            raise TopicNotFoundError(f"{self._where}: the topic is gone: {describe_error(err)}")
        if err.fatal() or not err.retriable():
            raise StreamError(f"{self._where}: {describe_error(err)}")
        LOG.info("%s: %s", self._where, describe_error(err))

    def _take(self, max_records: int) -> list[Record]:
        """Up to ``max_records`` buffered records in fair shares, each partition in order."""
        parts = sorted(p for p, b in self._buf.items() if b)
        if not parts:
            return []
        k = self._next % len(parts)
        order = parts[k:] + parts[:k]
        self._next += 1
        out: list[Record] = []
        remaining = max_records
        while remaining > 0 and order:
            share = math.ceil(remaining / len(order))
            busy: list[int] = []
            for p in order:
                buf = self._buf[p]
                want = min(share, remaining)
                if want == 0:
                    break
                for _ in range(min(want, len(buf))):
                    r = buf.popleft()
                    self._buf_bytes -= len(r.value)
                    self._pos[p] = r.offset + 1
                    out.append(r)
                    remaining -= 1
                if buf:
                    busy.append(p)
            order = busy
        return out

    def _check_reachable(self) -> None:
        """Fail once the brokers have been unreachable for the request timeout (librdkafka
        reports losing them once, then keeps reconnecting quietly)."""
        if self._down_since is None:
            return
        down_s = time.monotonic() - self._down_since
        if down_s < self._timeout_s:
            return
        try:
            self._c.list_topics(self._topic, timeout=min(self._timeout_s, 2.0))
        except KafkaException as exc:
            raise StreamError(
                f"{self._where}: no broker reachable for {down_s:.1f} s "
                f"(request timeout {self._timeout_s} s): {describe(exc)}; "
                f"last error: {self._last_error}"
            ) from exc
        self._down_since = None

    def _checked_position(self, partition: int, offset: int) -> int:
        if (
            isinstance(partition, bool)
            or not isinstance(partition, int)
            or not 0 <= partition < self._n
        ):
            raise StreamError(
                f"{self._where}: topic {self._topic!r} has partitions 0..{self._n - 1}, "
                f"got partition {partition!r}"
            )
        if isinstance(offset, bool) or not isinstance(offset, int):
            raise StreamError(
                f"{self._where}: position of partition {partition} must be an int, got {offset!r}"
            )
        end = self._watermarks(partition)[1] if offset != 0 else 0
        if not 0 <= offset <= end:
            raise OffsetOutOfRangeError(
                f"{self._where}: topic {self._topic!r} partition {partition}: offset {offset} "
                f"is outside the valid range [0, {end}]"
            )
        return offset

    def _watermarks(self, partition: int) -> tuple[int, int]:
        try:
            low, high = self._c.get_watermark_offsets(
                TopicPartition(self._topic, partition), timeout=self._timeout_s, cached=False
            )
        except KafkaException as exc:
            raise StreamError(
                f"{self._where}: end offset of partition {partition} unknown: {describe(exc)}"
            ) from exc
        return int(low), int(high)

    def _tp(self, partition: int, offset: int) -> TopicPartition:
        # Position 0 is the partition's beginning, which retention may have moved past 0.
        return TopicPartition(self._topic, partition, offset if offset > 0 else OFFSET_BEGINNING)

    def _drop_buffer(self, partition: int) -> None:
        buf = self._buf.pop(partition, None)
        if buf:
            self._buf_bytes -= sum(len(r.value) for r in buf)

    def _fail(self, what: str, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = StreamError(f"{self._where}: {what}")
            self._failure.__cause__ = exc

    def _raise_failure(self) -> None:
        # A fresh error per call: the consumer stays failed, each caller sees the cause.
        if self._failure is not None:
            raise StreamError(str(self._failure)) from self._failure.__cause__

    def _live(self, what: str) -> None:
        if self._closed:
            raise StreamError(f"{self._where}: {what}: the consumer is closed")
