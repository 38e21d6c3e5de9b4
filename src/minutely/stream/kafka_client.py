"""What the Kafka log and its consumers share: librdkafka client options and error translation.

Options come in three layers: defaults this package picks, then the caller's options (passed to
librdkafka as they are, e.g. ``security.protocol`` or ``sasl.*``), then the options the log
contract depends on, which a caller may not change.

>>> conf = client_options("127.0.0.1:9092", {"client.id": "join"}, "consumer", 30.0)
>>> conf["client.id"], conf["enable.auto.commit"], conf["isolation.level"]
('join', 'false', 'read_committed')
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal

from confluent_kafka import KafkaError, KafkaException, Message

from minutely.errors import StreamError

LOG = logging.getLogger("minutely.stream.kafka")

Role = Literal["admin", "producer", "consumer"]

# 64 MiB per fetch; librdkafka needs receive.message.max.bytes above fetch.max.bytes + 512, and
# a consumer of large record batches (the samples topics) needs both well above the 1 MiB that
# some brokers answer with by default.
FETCH_MAX_BYTES = 64 << 20
RECEIVE_MAX_BYTES = 128 << 20
# The largest message a producer sends (and a topic minutely creates takes).
MAX_MESSAGE_BYTES = 32 << 20

_DEFAULTS: dict[Role, dict[str, str]] = {
    "admin": {},
    # Connecting to every broker at once lets the idempotent producer get its id on its first
    # try instead of after librdkafka's 500 ms retry timer.
    "producer": {
        "linger.ms": "5",
        "enable.sparse.connections": "false",
        "message.max.bytes": str(MAX_MESSAGE_BYTES),
    },
    # librdkafka fetches only while nothing it fetched (a record, an end-of-partition event)
    # waits to be consumed, and then looks again every millisecond: a consumer that is not
    # polled stops fetching. Against a broker that answers a fetch at a partition's end at once
    # it would otherwise fetch over and over (see minutely.stream.kafka_rest). One fetch still
    # runs ahead of the caller.
    "consumer": {
        "fetch.max.bytes": str(FETCH_MAX_BYTES),
        "receive.message.max.bytes": str(RECEIVE_MAX_BYTES),
        "queued.min.messages": "1",
        "fetch.queue.backoff.ms": "1",
    },
}
# librdkafka's fetch.wait.max.ms default: how long a broker may hold a fetch without data.
_FETCH_WAIT_MS = 500
# A broker that comes back is reconnected to within a second instead of librdkafka's 10 s.
_COMMON_DEFAULTS = {"reconnect.backoff.max.ms": "1000"}

# Options the log contract depends on: topics exist only once created (never auto-created by a
# metadata request), appends are idempotent, positions belong to the callers (nothing is
# committed to the broker), consumers see committed transactions only, and a position outside a
# partition is an error rather than a silent jump to its start or end.
_FIXED: dict[Role, dict[str, str]] = {
    "admin": {"allow.auto.create.topics": "false"},
    "producer": {"allow.auto.create.topics": "false", "enable.idempotence": "true"},
    "consumer": {
        "allow.auto.create.topics": "false",
        "enable.auto.commit": "false",
        "enable.auto.offset.store": "false",
        "isolation.level": "read_committed",
        "auto.offset.reset": "error",
        "partition.assignment.strategy": "range",
    },
}
# Options the log sets per client (the session timeout from its own setting).
_OWN = ("bootstrap.servers", "group.id", "enable.partition.eof", "session.timeout.ms")


def check_options(servers: str, options: Mapping[str, str]) -> None:
    """Refuse caller options that would break the log contract, naming the option."""
    fixed = {k: v for role in _FIXED.values() for k, v in role.items()}
    for key, value in options.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise StreamError(
                f"kafka log {servers}: client options must map strings to strings, "
                f"got {key!r}: {value!r}"
            )
        if key in _OWN:
            raise StreamError(
                f"kafka log {servers}: client option {key!r} is set by the log itself, "
                f"got {value!r}"
            )
        if key in fixed and value.lower() != fixed[key]:
            raise StreamError(
                f"kafka log {servers}: client option {key!r} must be {fixed[key]!r} "
                f"(the log contract depends on it), got {value!r}"
            )


def client_options(
    servers: str, options: Mapping[str, str], role: Role, request_timeout_s: float
) -> dict[str, Any]:
    """The librdkafka configuration of one client of ``role``."""
    timeout_ms = max(1, round(request_timeout_s * 1000))
    # librdkafka wants its sockets' timeout a second above a fetch's 500 ms wait; the calls that
    # give up after the request timeout pass it themselves.
    socket_ms = max(timeout_ms, _FETCH_WAIT_MS + 1000)
    conf: dict[str, Any] = {"socket.timeout.ms": str(socket_ms), **_COMMON_DEFAULTS}
    conf.update(_DEFAULTS[role])
    if role == "producer":
        # A message that cannot be delivered fails its append after this long.
        conf["message.timeout.ms"] = str(timeout_ms)
    conf.update(options)
    conf.update(_FIXED[role])
    conf["bootstrap.servers"] = servers
    conf["logger"] = LOG
    return conf


def describe(exc: BaseException) -> str:
    """librdkafka's text and code name of ``exc`` (a KafkaException or anything else)."""
    if isinstance(exc, KafkaException) and exc.args and isinstance(exc.args[0], KafkaError):
        return describe_error(exc.args[0])
    return f"{exc} ({type(exc).__name__})"


def describe_error(err: KafkaError) -> str:
    return f"{err.str()} ({err.name()})"


def error_code(exc: BaseException) -> int | None:
    if isinstance(exc, KafkaException) and exc.args and isinstance(exc.args[0], KafkaError):
        return int(exc.args[0].code())
    return None


def record_fields(
    msg: Message,
) -> tuple[int, bytes | None, bytes, int, tuple[tuple[str, bytes], ...]]:
    """``(offset, key, value, ts_ms, headers)`` of a consumed message.

    A null value (a tombstone) reads as ``b""`` and a null header value as ``b""``: the log's
    records always carry bytes.
    """
    raw = msg.headers() or []
    pairs = raw.items() if isinstance(raw, dict) else raw
    headers = tuple(
        (name, value if isinstance(value, bytes) else (value or "").encode())
        for name, value in pairs
    )
    return (
        int(msg.offset() or 0),
        msg.key(),
        msg.value() or b"",
        msg.timestamp()[1],
        headers,
    )
