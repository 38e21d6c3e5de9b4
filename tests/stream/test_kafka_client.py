"""Unit tests of the Kafka backend that need no broker: client options, argument checks, and the
error paths of librdkafka answers that a real broker does not produce on demand (stand-ins for
the librdkafka clients)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from minutely.config import StreamConfig
from minutely.errors import StreamError, TopicNotFoundError
from minutely.stream import open_log
from minutely.stream.kafka import KafkaLog
from minutely.stream.kafka_client import client_options
from minutely.stream.kafka_consumer import KafkaConsumer

# Nothing listens here: clients start, and every request to the broker fails.
NOWHERE = "127.0.0.1:1"


def test_client_options_lay_the_callers_between_defaults_and_the_contracts() -> None:
    mine = {"security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN", "linger.ms": "50"}
    producer = client_options("h:9092", mine, "producer", 3.0)
    assert producer["bootstrap.servers"] == "h:9092"
    assert producer["security.protocol"] == "SASL_SSL"
    assert producer["sasl.mechanism"] == "PLAIN"
    assert producer["linger.ms"] == "50"  # the caller's value wins over the default
    assert producer["enable.idempotence"] == "true"
    assert producer["message.timeout.ms"] == producer["socket.timeout.ms"] == "3000"
    consumer = client_options("h:9092", {"fetch.max.bytes": "1000"}, "consumer", 0.5)
    assert consumer["fetch.max.bytes"] == "1000"
    assert consumer["socket.timeout.ms"] == "1500"  # above a fetch's wait, as librdkafka wants
    assert int(consumer["receive.message.max.bytes"]) >= 64 << 20
    fixed = {
        "enable.auto.commit": "false",
        "enable.auto.offset.store": "false",
        "isolation.level": "read_committed",
        "auto.offset.reset": "error",
        "allow.auto.create.topics": "false",
    }
    assert {k: consumer[k] for k in fixed} == fixed
    assert "message.timeout.ms" not in consumer


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"enable.auto.commit": "true"},
            r"client option 'enable.auto.commit' must be 'false' \(the log contract depends on "
            r"it\), got 'true'",
        ),
        (
            {"isolation.level": "read_uncommitted"},
            r"client option 'isolation.level' must be 'read_committed'",
        ),
        ({"enable.idempotence": "false"}, r"client option 'enable.idempotence' must be 'true'"),
        ({"auto.offset.reset": "earliest"}, r"client option 'auto.offset.reset' must be 'error'"),
        ({"group.id": "mine"}, r"client option 'group.id' is set by the log itself, got 'mine'"),
        ({"bootstrap.servers": "b:1"}, r"client option 'bootstrap.servers' is set by the log"),
        ({"session.timeout.ms": "6000"}, r"client option 'session.timeout.ms' is set by the log"),
        ({"linger.ms": 5}, r"client options must map strings to strings, got 'linger.ms': 5"),
    ],
)
def test_options_that_would_break_the_contract_are_refused(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(StreamError, match=rf"^kafka log {NOWHERE}: {message}"):
        KafkaLog(NOWHERE, options=options)


def test_fixed_options_may_be_restated() -> None:
    log = KafkaLog(NOWHERE, options={"enable.auto.commit": "False", "enable.idempotence": "true"})
    log.close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bootstrap_servers": " "}, r"kafka log: bootstrap servers must be a non-empty"),
        ({"session_timeout_s": 0}, rf"kafka log {NOWHERE}: session_timeout_s must be a number > 0"),
        ({"request_timeout_s": -1.0}, r"request_timeout_s must be a number > 0, got -1.0"),
        ({"request_timeout_s": True}, r"request_timeout_s must be a number > 0, got True"),
    ],
)
def test_bad_constructor_arguments_are_refused(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"bootstrap_servers": NOWHERE, **kwargs}
    with pytest.raises(StreamError, match=message):
        KafkaLog(**args)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"no.such.option": "1"}, r'No such configuration property: "no.such.option"'),
        ({"linger.ms": "soon"}, r"Invalid value for configuration property"),
    ],
)
def test_options_librdkafka_rejects_fail_the_constructor(
    options: dict[str, str], message: str
) -> None:
    pattern = rf"kafka log {NOWHERE}: cannot start a Producer: .*{message}"
    with pytest.raises(StreamError, match=pattern):
        KafkaLog(NOWHERE, options=options)


def test_open_log_builds_a_kafka_log_from_the_stream_config(tmp_path: Path) -> None:
    cfg = StreamConfig(
        backend="kafka",
        bootstrap_servers=NOWHERE,
        kafka={"client.id": "minutely-test"},
        session_timeout_s=7.0,
        request_timeout_s=0.5,
    )
    log = open_log(cfg, tmp_path)
    try:
        assert isinstance(log, KafkaLog)
        assert log.bootstrap_servers == NOWHERE
        # The request timeout reached the client: a lookup fails after it, naming the servers.
        with pytest.raises(StreamError, match=rf"kafka log {NOWHERE}: look up topic 'events'"):
            log.partitions("events")
    finally:
        log.close()
    assert list(tmp_path.iterdir()) == []  # nothing on disk for a Kafka log


# --- stand-ins for librdkafka clients ---------------------------------------------------------


class FakeProducer:
    """Accepts messages and never delivers them."""

    def __init__(self) -> None:
        self.queued = 0
        self.purged = False

    def produce(self, *args: Any, **kwargs: Any) -> None:
        self.queued += 1

    def flush(self, timeout: float = -1) -> int:
        return self.queued

    def purge(self, in_queue: bool = True, in_flight: bool = True) -> None:
        self.purged = True
        self.queued = 0

    def poll(self, timeout: float = -1) -> int:
        return 0


class FakeConsumer:
    """Answers consume() from a script of messages; the partition's offsets are [0, 5]."""

    def __init__(self, script: list[list[Message]]) -> None:
        self.script = script
        self.assigned: list[TopicPartition] = []
        self.paused: set[int] = set()
        self.end_requests = 0  # end offsets asked of the broker (not the cached ones)

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Message]:
        return self.script.pop(0) if self.script else []

    def get_watermark_offsets(self, tp: TopicPartition, **kwargs: Any) -> tuple[int, int]:
        if not kwargs.get("cached"):
            self.end_requests += 1
        return 0, 5

    def assign(self, tps: list[TopicPartition]) -> None:
        self.assigned = tps

    def unassign(self) -> None:
        self.assigned = []

    def pause(self, tps: list[TopicPartition]) -> None:
        self.paused.update(tp.partition for tp in tps)

    def resume(self, tps: list[TopicPartition]) -> None:
        self.paused.difference_update(tp.partition for tp in tps)

    def seek(self, tp: TopicPartition) -> None:
        pass

    def close(self) -> None:
        pass


class Refusing(FakeConsumer):
    """A client whose every assignment change, seek and close fails."""

    def _refuse(self, *args: Any) -> None:
        raise KafkaException(KafkaError(KafkaError._STATE))

    assign = unassign = seek = close = _refuse  # type: ignore[assignment]


@pytest.fixture
def log() -> Iterator[KafkaLog]:
    handle = KafkaLog(NOWHERE, request_timeout_s=0.2)
    handle._partitions["t"] = 2  # as if looked up before the broker went away
    yield handle
    handle._producer = None
    handle._reader = None
    handle.close()


def error(code: int, *, fatal: bool = False, partition: int = 0) -> Message:
    return Message(topic="t", partition=partition, error=KafkaError(code, fatal=fatal))


def test_an_append_the_producer_cannot_flush_is_abandoned_and_fails(log: KafkaLog) -> None:
    fake = FakeProducer()
    log._producer = fake  # type: ignore[assignment]
    pattern = r"append 2 records to topic 't': no answer within the request timeout of 0.2 s"
    with pytest.raises(StreamError, match=pattern):
        log.append("t", [(None, b"a", 1), (None, b"b", 2)])
    assert fake.purged  # nothing left queued to be written later


def test_close_reports_messages_it_could_not_send(log: KafkaLog) -> None:
    fake = FakeProducer()
    fake.queued = 3
    log._producer = fake  # type: ignore[assignment]
    with pytest.raises(StreamError, match=rf"{NOWHERE}: close: messages still unsent were dropped"):
        log.close()
    assert fake.purged


def test_a_read_without_an_answer_fails_after_the_request_timeout(log: KafkaLog) -> None:
    log._reader = FakeConsumer([])  # type: ignore[assignment]
    with pytest.raises(StreamError, match=r"read topic 't' partition 0 at 2: no answer within"):
        log.read("t", 0, 2, 10)


def test_a_read_whose_fetch_fails_names_the_librdkafka_error(log: KafkaLog) -> None:
    log._reader = FakeConsumer([[error(KafkaError._AUTO_OFFSET_RESET)]])  # type: ignore[assignment]
    with pytest.raises(StreamError, match=r"read: Local: No offset .*\(_AUTO_OFFSET_RESET\)"):
        log.read("t", 0, 0, 10)


def replace_client(consumer: KafkaConsumer, fake: FakeConsumer) -> None:
    consumer._c.close()
    consumer._c = fake  # type: ignore[assignment]


def consumer_with(log: KafkaLog, script: list[list[Message]]) -> KafkaConsumer:
    consumer = log.consumer("t")
    replace_client(consumer, FakeConsumer(script))
    consumer.assign({0: 0})
    return consumer


@pytest.mark.parametrize(
    ("event", "kind", "message"),
    [
        (
            error(KafkaError.UNKNOWN_TOPIC_OR_PART),
            TopicNotFoundError,
            r"'t': the topic is gone: Broker: Unknown topic",
        ),
        (
            error(KafkaError.TOPIC_AUTHORIZATION_FAILED),
            StreamError,
            r"'t': Broker: Topic authorization failed \(TOPIC_AUTHORIZATION_FAILED\)",
        ),
    ],
)
def test_errors_in_place_of_records_are_raised_by_poll(
    log: KafkaLog, event: Message, kind: type[Exception], message: str
) -> None:
    consumer = consumer_with(log, [[event]])
    with pytest.raises(kind, match=rf"kafka log {NOWHERE}: consumer of topic {message}"):
        consumer.poll(10)


def test_informational_events_are_skipped(log: KafkaLog) -> None:
    record = Message(topic="t", partition=0, offset=0, value=b"x", timestamp=(1, 7))
    consumer = consumer_with(log, [[error(KafkaError._PARTITION_EOF), record]])
    assert [(r.offset, r.value, r.ts_ms) for r in consumer.poll(10)] == [(0, b"x", 7)]
    assert consumer.positions() == {0: 1}


def record(offset: int, partition: int = 0) -> Message:
    return Message(
        topic="t", partition=partition, offset=offset, value=b"x", timestamp=(1, 7 + offset)
    )


def end_of(partition: int, offset: int) -> Message:
    return Message(
        topic="t",
        partition=partition,
        offset=offset,
        error=KafkaError(KafkaError._PARTITION_EOF),
    )


def test_a_partition_read_to_its_end_rests_until_the_next_poll(log: KafkaLog) -> None:
    # Its end is reported (an end-of-partition event after its last record) ...
    fake = FakeConsumer([[record(0), record(1), end_of(0, 2)]])
    consumer = consumer_with(log, [])
    replace_client(consumer, fake)
    assert [r.offset for r in consumer.poll(10)] == [0, 1]
    assert fake.paused == {0}
    # ... or it is read through the high watermark of the fetch that brought its last record.
    fake.script = [[record(2), record(3), record(4)]]
    assert [r.offset for r in consumer.poll(10)] == [2, 3, 4]
    assert fake.paused == {0}
    # The next poll wakes it only long enough to learn that nothing came since.
    requests = fake.end_requests
    assert consumer.poll(10) == []
    assert fake.end_requests == requests + 1
    assert fake.paused == {0}
    assert consumer.positions() == {0: 5}


def test_an_end_reported_before_a_seek_does_not_rest_the_partition(log: KafkaLog) -> None:
    fake = FakeConsumer([[record(0), record(1), record(2)], [end_of(0, 2)]])
    consumer = consumer_with(log, [])
    replace_client(consumer, fake)
    assert [r.offset for r in consumer.poll(3)] == [0, 1, 2]
    consumer.seek(0, 3)
    assert consumer.poll(10) == []  # the end at 2 is behind the new position
    assert 0 not in fake.paused


def test_a_partition_whose_end_is_unknown_wakes_and_stays_awake(log: KafkaLog) -> None:
    class NoAnswer(FakeConsumer):
        def get_watermark_offsets(self, tp: TopicPartition, **kwargs: Any) -> tuple[int, int]:
            if kwargs.get("cached"):
                return 0, 5
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT))

    fake = NoAnswer([[record(0), end_of(0, 1)]])
    consumer = consumer_with(log, [])
    replace_client(consumer, fake)
    assert [r.offset for r in consumer.poll(10)] == [0]
    assert fake.paused == {0}
    assert consumer.poll(10) == []  # librdkafka fetches it, retrying as it does
    assert fake.paused == set()


def test_resting_partitions_are_woken_before_an_assignment_changes(log: KafkaLog) -> None:
    # librdkafka keeps a partition paused through an unassign and a later assign.
    fake = FakeConsumer([[record(0), end_of(0, 1)]])
    consumer = consumer_with(log, [])
    replace_client(consumer, fake)
    consumer.poll(10)
    assert fake.paused == {0}
    consumer.assign({0: 1, 1: 0})
    assert fake.paused == set()
    member = log.consumer("t", group="g")
    replace_client(member, fake)
    member._assigned(fake, [TopicPartition("t", 0)])
    fake.script = [[record(0), end_of(0, 1)]]
    member.poll(10)
    assert fake.paused == {0}
    member._revoked(fake, [TopicPartition("t", 0)])
    assert fake.paused == set()
    assert member.positions() == {}


@pytest.mark.parametrize(
    ("refused", "message"),
    [
        ("pause", r"pausing caught-up partitions failed: .*\(_STATE\)"),
        ("resume", r"resuming resting partitions failed: .*\(_STATE\)"),
    ],
)
def test_pauses_and_resumes_the_client_refuses_make_poll_fail(
    log: KafkaLog, refused: str, message: str
) -> None:
    fake = FakeConsumer([[record(0), end_of(0, 1)]])
    consumer = consumer_with(log, [])
    replace_client(consumer, fake)
    if refused == "resume":
        consumer.poll(10)  # now it rests
    setattr(fake, refused, Refusing._refuse)
    with pytest.raises(
        StreamError, match=rf"kafka log {NOWHERE}: consumer of topic 't': {message}"
    ):
        consumer.poll(10)


def test_a_fatal_client_error_makes_every_later_poll_fail(log: KafkaLog) -> None:
    consumer = consumer_with(log, [])
    consumer._on_error(KafkaError(KafkaError._FATAL, fatal=True))
    for _ in range(2):
        with pytest.raises(StreamError, match=r"consumer of topic 't': the client failed: "):
            consumer.poll(10)


def test_a_rebalance_the_client_cannot_apply_makes_poll_fail(log: KafkaLog) -> None:
    consumer = log.consumer("t", group="g", on_assign=lambda parts: {})
    replace_client(consumer, FakeConsumer([]))
    consumer._assigned(Refusing([]), [TopicPartition("t", 0)])
    with pytest.raises(StreamError, match=r"in group 'g': assigning partitions \[0\] failed: "):
        consumer.poll(10)


def test_partitions_a_member_lost_are_dropped_without_on_revoke(log: KafkaLog) -> None:
    revoked: list[list[int]] = []
    consumer = log.consumer("t", group="g", on_revoke=revoked.append)
    fake = FakeConsumer([])
    replace_client(consumer, fake)
    consumer._assigned(fake, [TopicPartition("t", 0), TopicPartition("t", 1)])
    assert consumer.positions() == {0: 0, 1: 0}
    consumer._lost(fake, [TopicPartition("t", 0), TopicPartition("t", 1)])
    assert consumer.positions() == {}
    assert revoked == []


class FakeAdmin:
    """Creates topics that never show up in the metadata (or never answers at all)."""

    def __init__(self, *, answer: bool) -> None:
        self.answer = answer

    def create_topics(self, topics: list[Any], **kwargs: Any) -> dict[str, Future[None]]:
        done: Future[None] = Future()
        if self.answer:
            done.set_result(None)
        return {t.topic: done for t in topics}

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Any:
        return SimpleNamespace(topics={})


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (True, r"wait for the new topic 'new' to appear: no answer within the request timeout"),
        (False, r"create topic 'new' with 3 partitions: no answer within the request timeout"),
    ],
)
def test_a_topic_creation_without_an_answer_fails_after_the_request_timeout(
    log: KafkaLog, answer: bool, message: str
) -> None:
    log._admin = FakeAdmin(answer=answer)  # type: ignore[assignment]
    with pytest.raises(StreamError, match=rf"kafka log {NOWHERE}: {message} of 0.2 s"):
        log.create_topic("new", 3)


def test_a_read_the_client_refuses_names_the_read(log: KafkaLog) -> None:
    log._reader = Refusing([])  # type: ignore[assignment]
    with pytest.raises(
        StreamError, match=r"read topic 't' partition 1 at offset 0 failed: .*_STATE"
    ):
        log.read("t", 1, 0, 10)


def test_consumer_calls_the_client_refuses_are_stream_errors(log: KafkaLog) -> None:
    consumer = consumer_with(log, [])
    consumer._c = Refusing([])  # type: ignore[assignment]
    where = rf"kafka log {NOWHERE}: consumer of topic 't': "
    with pytest.raises(StreamError, match=where + r"assign \{1: 0\} failed: .*\(_STATE\)"):
        consumer.assign({1: 0})
    with pytest.raises(StreamError, match=where + r"seek partition 0 to 2 failed: .*\(_STATE\)"):
        consumer.seek(0, 2)
    with pytest.raises(StreamError, match=where + r"close failed: .*\(_STATE\)"):
        consumer.close()


def test_a_revocation_the_client_refuses_makes_poll_fail(log: KafkaLog) -> None:
    consumer = log.consumer("t", group="g")
    replace_client(consumer, FakeConsumer([]))
    consumer._assigned(FakeConsumer([]), [TopicPartition("t", 0)])
    consumer._revoked(Refusing([]), [TopicPartition("t", 0)])
    assert consumer.positions() == {}
    with pytest.raises(StreamError, match=r"in group 'g': giving up partitions failed: .*_STATE"):
        consumer.poll(10)


def test_close_reports_what_failed_in_its_consumers(log: KafkaLog) -> None:
    def refuse(parts: list[int]) -> None:
        raise RuntimeError("checkpoint store is down")

    consumer = log.consumer("t", group="g", on_revoke=refuse)
    fake = FakeConsumer([])
    replace_client(consumer, fake)
    consumer._assigned(fake, [TopicPartition("t", 0)])
    fake.close = lambda: consumer._revoked(fake, [TopicPartition("t", 0)])  # type: ignore[method-assign]
    pattern = rf"kafka log {NOWHERE}: close: .* on_revoke for partitions \[0\] failed: Runtime"
    with pytest.raises(StreamError, match=pattern):
        log.close()
