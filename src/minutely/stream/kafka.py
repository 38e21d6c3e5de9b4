"""The Kafka log backend: the :class:`~minutely.stream.base.Log` contract on Kafka brokers.

Appends go through an idempotent producer to partitions computed here (``partition_for``, the
murmur2 of Kafka's Java client), so both backends route a key to the same partition; each append
is flushed and returns ``(partition, offset)`` from the delivery reports. A batch is not atomic:
if one message fails, those before it may be written. Topics are created through the admin API,
never implicitly, and with ``retention.ms = -1``: the log is the pipeline's source of truth, and
its records carry event times (a replay's are days old) by which time-based retention would
delete them at once.

Consumers read committed records only and commit nothing: positions belong to the callers' own
checkpoints (see :mod:`minutely.stream.kafka_consumer`). A broker that cannot be reached makes a
call fail with :class:`~minutely.errors.StreamError` after about ``request_timeout_s``; librdkafka
keeps reconnecting, so a later call succeeds once the broker is back.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
import uuid
import weakref
from collections.abc import Mapping, Sequence
from functools import partial
from types import TracebackType
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from minutely.errors import OffsetOutOfRangeError, StreamError, TopicNotFoundError
from minutely.stream.base import (
    Headers,
    OnAssign,
    OnRevoke,
    Record,
    check_read_args,
    check_topic_args,
)
from minutely.stream.base import Message as LogMessage
from minutely.stream.kafka_client import (
    LOG,
    MAX_MESSAGE_BYTES,
    check_options,
    client_options,
    describe,
    describe_error,
    error_code,
    record_fields,
)
from minutely.stream.kafka_consumer import KafkaConsumer, consume_some
from minutely.stream.partitioner import partitions_for

# Topic settings the log depends on (see the module docstring).
# Topics minutely creates keep everything and take messages up to MAX_MESSAGE_BYTES: a
# micro-batch of samples is a few MB (a broker's default limit is about 1 MB).
_TOPIC_CONFIG = {"retention.ms": "-1", "max.message.bytes": str(MAX_MESSAGE_BYTES)}


class KafkaLog:
    """A :class:`~minutely.stream.base.Log` on the Kafka brokers at ``bootstrap_servers``.

    ``options`` go to every librdkafka client as they are (``security.protocol``, ``sasl.*``, ...)
    except those the contract fixes (idempotence, no auto-commit, read_committed, ...), which
    raise :class:`StreamError`. ``session_timeout_s`` is the default session timeout of group
    members (brokers refuse less than 6 s by default); ``request_timeout_s`` bounds every call
    to the brokers. The producer starts with the log (in the background: a broker that is down
    fails the first call that needs it, not the constructor); the other clients on first use.
    One instance may be shared by threads; consumers are used by one thread each.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        options: Mapping[str, str] | None = None,
        session_timeout_s: float = 10.0,
        request_timeout_s: float = 30.0,
    ) -> None:
        if not isinstance(bootstrap_servers, str) or not bootstrap_servers.strip():
            raise StreamError(
                f"kafka log: bootstrap servers must be a non-empty 'host:port[,...]' string, "
                f"got {bootstrap_servers!r}"
            )
        self._servers = bootstrap_servers
        self._where = f"kafka log {bootstrap_servers}"
        for name, value in (
            ("session_timeout_s", session_timeout_s),
            ("request_timeout_s", request_timeout_s),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise StreamError(f"{self._where}: {name} must be a number > 0, got {value!r}")
        self._options = dict(options or {})
        check_options(bootstrap_servers, self._options)
        self._session_timeout_s = float(session_timeout_s)
        self._timeout_s = float(request_timeout_s)
        self._lock = threading.RLock()
        self._admin: AdminClient | None = None
        self._producer: Producer | None = None
        self._reader: Consumer | None = None
        # A topic's partition count is fixed once created, so it is cached; misses are not.
        self._partitions: dict[str, int] = {}
        self._consumers: weakref.WeakSet[KafkaConsumer] = weakref.WeakSet()
        self._last_error = ""
        self._closed = False
        # The idempotent producer spends about half a second getting its producer id; starting
        # it now lets that overlap with the caller's first calls.
        self._producer_client("start")

    @property
    def bootstrap_servers(self) -> str:
        return self._servers

    # --- the Log protocol -------------------------------------------------------------------

    def create_topic(self, topic: str, partitions: int) -> None:
        """Create ``topic`` with ``partitions`` partitions; a no-op if it exists with as many."""
        check_topic_args(self._where, topic, partitions)
        what = f"create topic {topic!r} with {partitions} partitions"
        new = NewTopic(topic, num_partitions=partitions, config=dict(_TOPIC_CONFIG))
        with self._lock:
            admin = self._admin_client(what)
            try:
                futures = admin.create_topics(
                    [new], request_timeout=self._timeout_s, operation_timeout=self._timeout_s
                )
                futures[topic].result(timeout=2 * self._timeout_s)
            except KafkaException as exc:
                if error_code(exc) != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise StreamError(f"{self._where}: {what} failed: {describe(exc)}") from exc
            except concurrent.futures.TimeoutError as exc:
                raise self._timed_out(what) from exc
            found = self._await_topic(topic)
        if found != partitions:
            raise StreamError(
                f"{self._where}: topic {topic!r} exists with {found} partitions, "
                f"cannot create it with {partitions}"
            )

    def partitions(self, topic: str) -> int:
        cached = self._partitions.get(topic)
        if cached is not None:
            return cached
        with self._lock:
            n = self._lookup(topic)
        if n is None:
            raise TopicNotFoundError(f"{self._where}: topic {topic!r} does not exist")
        return n

    def append(
        self,
        topic: str,
        messages: Sequence[LogMessage],
        partition: int | None = None,
    ) -> list[tuple[int, int]]:
        """Append ``(key, value, ts_ms[, headers])`` messages; returns ``(partition, offset)``
        per message, in order, once every one is acknowledged.

        Not atomic: if a message fails, a :class:`StreamError` names it, and the messages before
        it may be in the log. ``ts_ms`` must be >= 1 (librdkafka stamps 0 with the current time).
        """
        n = self.partitions(topic)
        if partition is not None:
            self._check_partition(topic, partition, n)
        if not messages:
            return []
        rows = [self._checked(topic, i, m) for i, m in enumerate(messages)]
        parts = _route(rows, partition, n)
        placed: list[tuple[int, int] | None] = [None] * len(rows)
        failed: list[tuple[int, int, KafkaError]] = []
        what = f"append {len(rows)} records to topic {topic!r}"
        with self._lock:
            producer = self._producer_client(what)
            deadline = time.monotonic() + self._timeout_s
            for i, ((key, value, ts_ms, headers), p) in enumerate(zip(rows, parts, strict=True)):
                report = partial(_delivered, placed, failed, i, p)
                while True:
                    try:
                        producer.produce(
                            topic,
                            value=value,
                            key=key,
                            partition=p,
                            timestamp=ts_ms,
                            headers=list(headers) or None,
                            on_delivery=report,
                        )
                        break
                    except BufferError:
                        # The local queue is full: serve delivery reports until it drains.
                        if time.monotonic() > deadline:
                            self._abandon(producer)
                            raise self._timed_out(what) from None
                        producer.poll(0.05)
                    except KafkaException as exc:
                        self._abandon(producer)
                        raise StreamError(
                            f"{self._where}: {what}: message {i} to partition {p} was refused: "
                            f"{describe(exc)}"
                        ) from exc
            # message.timeout.ms fails undeliverable messages first; the margin covers the rest.
            if producer.flush(2 * self._timeout_s) > 0:
                self._abandon(producer)
                raise self._timed_out(what)
        if failed:
            i, p, err = min(failed, key=lambda f: f[0])
            if err.fatal():
                with self._lock:
                    self._drop_producer()
            raise StreamError(
                f"{self._where}: {what}: delivery of message {i} to partition {p} failed: "
                f"{describe_error(err)} ({len(failed)} of {len(rows)} messages failed)"
            )
        return [x for x in placed if x is not None]

    def read(self, topic: str, partition: int, offset: int, max_records: int) -> list[Record]:
        """Records with offsets ``>= offset`` of one partition, in order: at most
        ``max_records``, fewer (possibly none) at the end. Assigns a consumer and seeks: meant
        for tools and checks, not for stages (they use :meth:`consumer`)."""
        n = self.partitions(topic)
        self._check_partition(topic, partition, n)
        where = f"read topic {topic!r} partition {partition} at offset {offset}"
        check_read_args(f"{self._where}: {where}", offset, max_records)
        with self._lock:
            reader = self._reader_client(where)
            low, end = self._watermarks(reader, topic, partition)
            if not 0 <= offset <= end:
                raise OffsetOutOfRangeError(
                    f"{self._where}: topic {topic!r} partition {partition}: offset {offset} is "
                    f"outside the valid range [0, {end}]"
                )
            if max_records == 0 or offset >= end:
                return []
            start = offset if offset > low else OFFSET_BEGINNING
            try:
                reader.assign([TopicPartition(topic, partition, start)])
                return self._read_assigned(reader, topic, partition, offset, max_records, end)
            except KafkaException as exc:
                raise StreamError(f"{self._where}: {where} failed: {describe(exc)}") from exc
            finally:
                try:
                    reader.unassign()
                except KafkaException as exc:
                    LOG.warning("%s: unassign after a read failed: %s", self._where, describe(exc))

    def end_offset(self, topic: str, partition: int) -> int:
        """The offset after the last readable (committed) record: the high watermark."""
        n = self.partitions(topic)
        self._check_partition(topic, partition, n)
        with self._lock:
            reader = self._reader_client(f"end offset of topic {topic!r} partition {partition}")
            return self._watermarks(reader, topic, partition)[1]

    def consumer(
        self,
        topic: str,
        *,
        group: str | None = None,
        on_assign: OnAssign | None = None,
        on_revoke: OnRevoke | None = None,
        session_timeout_s: float | None = None,
    ) -> KafkaConsumer:
        """A sequential reader of ``topic``: assigned by the caller, or a member of ``group``
        (``session_timeout_s`` overrides the log's for this member)."""
        n = self.partitions(topic)
        if group is not None and (not isinstance(group, str) or not group):
            raise StreamError(
                f"{self._where}: consumer of topic {topic!r}: group must be a non-empty string "
                f"or None, got {group!r}"
            )
        if group is None and (on_assign is not None or on_revoke is not None):
            raise StreamError(
                f"{self._where}: consumer of topic {topic!r}: on_assign and on_revoke need a "
                "group (without one, the caller assigns partitions itself)"
            )
        session_s = self._session_timeout_s if session_timeout_s is None else session_timeout_s
        if isinstance(session_s, bool) or not isinstance(session_s, (int, float)) or session_s <= 0:
            raise StreamError(
                f"{self._where}: consumer of topic {topic!r}: session_timeout_s must be a number "
                f"> 0, got {session_s!r}"
            )
        # A group is per topic, as on SQLite: Kafka's group ids are broker-wide, and members of one
        # id that read different topics would rebalance (and wait for) one another.
        conf = self._consumer_conf(None if group is None else f"{group}@{topic}")
        session_ms = max(1, round(session_s * 1000))
        conf["session.timeout.ms"] = session_ms
        # Unless the caller chose: heartbeats this often let members notice a rebalance within a
        # fraction of a session, and librdkafka needs the poll interval above the session.
        conf.setdefault("heartbeat.interval.ms", max(1, session_ms // 6))
        conf.setdefault("max.poll.interval.ms", max(session_ms, 300_000))
        with self._lock:
            self._live(f"consumer of topic {topic!r}")
            made = KafkaConsumer(
                servers=self._servers,
                conf=conf,
                topic=topic,
                partitions=n,
                group=group,
                on_assign=on_assign,
                on_revoke=on_revoke,
                request_timeout_s=self._timeout_s,
            )
            self._consumers.add(made)
        return made

    def close(self) -> None:
        """Flush and close the clients and the consumers built here; later calls raise
        :class:`StreamError`. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            errors: list[str] = []
            for made in list(self._consumers):
                try:
                    made.close()
                except StreamError as exc:
                    errors.append(str(exc))
            if self._producer is not None:
                if self._producer.flush(self._timeout_s) > 0:
                    errors.append("messages still unsent were dropped")
                self._drop_producer()
            if self._reader is not None:
                try:
                    self._reader.close()
                except (KafkaException, RuntimeError) as exc:
                    errors.append(describe(exc))
                self._reader = None
            self._admin = None
        if errors:
            raise StreamError(f"{self._where}: close: {'; '.join(errors)}")

    def __enter__(self) -> KafkaLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KafkaLog({self._servers!r}, {'closed' if self._closed else 'open'})"

    # --- internals --------------------------------------------------------------------------

    def _read_assigned(
        self, reader: Consumer, topic: str, partition: int, offset: int, max_records: int, end: int
    ) -> list[Record]:
        out: list[Record] = []
        deadline = time.monotonic() + self._timeout_s
        while len(out) < max_records:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._timed_out(f"read topic {topic!r} partition {partition} at {offset}")
            for m in consume_some(reader, max_records - len(out), min(remaining, 0.5)):
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        return out
                    if err.code() in (KafkaError._AUTO_OFFSET_RESET, KafkaError._TRANSPORT):
                        raise StreamError(f"{self._where}: read: {describe_error(err)}")
                    continue
                off, key, value, ts, headers = record_fields(m)
                if m.partition() == partition and off >= offset and len(out) < max_records:
                    out.append(Record(topic, partition, off, key, value, ts, headers))
            # The partition's end is known: no need to wait for librdkafka's end-of-partition.
            if out and out[-1].offset + 1 >= end:
                return out
        return out

    def _checked(
        self, topic: str, i: int, m: LogMessage
    ) -> tuple[bytes | None, bytes, int, Headers]:
        bad = not isinstance(m, tuple) or len(m) not in (3, 4)
        if not bad:
            key, value, ts_ms = m[0], m[1], m[2]
            headers: Any = m[3] if len(m) == 4 else ()
            bad = (
                not isinstance(value, bytes)
                or not (key is None or isinstance(key, bytes))
                or isinstance(ts_ms, bool)
                or not isinstance(ts_ms, int)
                or not isinstance(headers, tuple)
                or not all(
                    isinstance(h, tuple)
                    and len(h) == 2
                    and isinstance(h[0], str)
                    and isinstance(h[1], bytes)
                    for h in headers
                )
            )
        if bad:
            shape = (
                "(" + ", ".join(type(x).__name__ for x in m) + ")"
                if isinstance(m, tuple)
                else type(m).__name__
            )
            raise StreamError(
                f"{self._where}: append to topic {topic!r}: message {i} must be "
                f"(bytes | None, bytes, int[, tuple[tuple[str, bytes], ...]]), got {shape}"
            )
        if ts_ms < 1:
            raise StreamError(
                f"{self._where}: append to topic {topic!r}: message {i} has ts_ms {ts_ms}, "
                "expected >= 1 (Kafka stores no earlier time; librdkafka stamps 0 as now)"
            )
        return key, value, ts_ms, headers

    def _check_partition(self, topic: str, partition: int, n: int) -> None:
        if isinstance(partition, bool) or not isinstance(partition, int) or not 0 <= partition < n:
            raise StreamError(
                f"{self._where}: topic {topic!r} has partitions 0..{n - 1}, "
                f"got partition {partition!r}"
            )

    def _lookup(self, topic: str) -> int | None:
        """The partition count of ``topic`` from the brokers' metadata; None if it does not
        exist. (Auto-creation is off, so asking never creates it.)"""
        admin = self._admin_client(f"look up topic {topic!r}")
        try:
            meta = admin.list_topics(topic, timeout=self._timeout_s)
        except KafkaException as exc:
            raise StreamError(
                f"{self._where}: look up topic {topic!r} failed: {describe(exc)}"
                + self._last_error_note()
            ) from exc
        found = meta.topics.get(topic)
        if found is None:
            return None
        if found.error is not None:
            if found.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                return None
            raise StreamError(
                f"{self._where}: look up topic {topic!r} failed: {describe_error(found.error)}"
            )
        n = len(found.partitions)
        self._partitions[topic] = n
        return n

    def _await_topic(self, topic: str) -> int:
        """The partition count of a just-created topic, once the metadata shows it."""
        deadline = time.monotonic() + self._timeout_s
        while True:
            n = self._lookup(topic)
            if n:
                return n
            if time.monotonic() > deadline:
                raise self._timed_out(f"wait for the new topic {topic!r} to appear")
            time.sleep(0.05)

    def _watermarks(self, reader: Consumer, topic: str, partition: int) -> tuple[int, int]:
        try:
            low, high = reader.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=self._timeout_s, cached=False
            )
        except KafkaException as exc:
            raise StreamError(
                f"{self._where}: end offset of topic {topic!r} partition {partition} unknown: "
                f"{describe(exc)}" + self._last_error_note()
            ) from exc
        return int(low), int(high)

    def _admin_client(self, what: str) -> AdminClient:
        self._live(what)
        if self._admin is None:
            conf = client_options(self._servers, self._options, "admin", self._timeout_s)
            conf["error_cb"] = self._on_error
            self._admin = self._client(AdminClient, conf)
        return self._admin

    def _producer_client(self, what: str) -> Producer:
        self._live(what)
        if self._producer is None:
            conf = client_options(self._servers, self._options, "producer", self._timeout_s)
            conf["error_cb"] = self._on_error
            self._producer = self._client(Producer, conf)
        return self._producer

    def _reader_client(self, what: str) -> Consumer:
        self._live(what)
        if self._reader is None:
            conf = self._consumer_conf(None)
            conf["enable.partition.eof"] = "true"
            self._reader = self._client(Consumer, conf)
        return self._reader

    def _consumer_conf(self, group: str | None) -> dict[str, Any]:
        conf = client_options(self._servers, self._options, "consumer", self._timeout_s)
        # Without a group the consumer never joins one; librdkafka still wants an id.
        conf["group.id"] = group if group is not None else f"minutely-reader-{uuid.uuid4().hex}"
        conf["error_cb"] = self._on_error
        return conf

    def _client(self, kind: Any, conf: dict[str, Any]) -> Any:
        try:
            return kind(conf)
        except (KafkaException, ValueError, TypeError) as exc:
            raise StreamError(
                f"{self._where}: cannot start a {kind.__name__}: {describe(exc)}"
            ) from exc

    def _on_error(self, err: KafkaError) -> None:
        # Called on librdkafka's client threads' behalf inside poll/flush: just remember it.
        self._last_error = describe_error(err)
        LOG.info("%s: %s", self._where, self._last_error)

    def _last_error_note(self) -> str:
        return f" (last client error: {self._last_error})" if self._last_error else ""

    def _timed_out(self, what: str) -> StreamError:
        return StreamError(
            f"{self._where}: {what}: no answer within the request timeout of "
            f"{self._timeout_s} s" + self._last_error_note()
        )

    def _abandon(self, producer: Producer) -> None:
        """Drop what an append that failed left queued, so it is not written later."""
        producer.purge(in_queue=True, in_flight=False)
        producer.poll(0)

    def _drop_producer(self) -> None:
        # A fatal error leaves a producer unusable; the next append builds a fresh one.
        if self._producer is not None:
            producer, self._producer = self._producer, None
            producer.purge(in_queue=True, in_flight=False)
            producer.flush(0)

    def _live(self, what: str) -> None:
        if self._closed:
            raise StreamError(f"{self._where}: {what}: the log is closed")


def _delivered(
    placed: list[tuple[int, int] | None],
    failed: list[tuple[int, int, KafkaError]],
    i: int,
    p: int,
    err: KafkaError | None,
    msg: Message,
) -> None:
    if err is not None:
        failed.append((i, p, err))
    else:
        placed[i] = (int(msg.partition() or p), int(msg.offset() or 0))


def _route(
    rows: list[tuple[bytes | None, bytes, int, Headers]], partition: int | None, n: int
) -> list[int]:
    if partition is not None:
        return [partition] * len(rows)
    parts = [0] * len(rows)
    keyed = [i for i, row in enumerate(rows) if row[0] is not None]
    keys = [k for k, *_ in rows if k is not None]
    for i, p in zip(keyed, partitions_for(keys, n), strict=True):
        parts[i] = p
    return parts
