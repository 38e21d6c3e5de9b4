"""What the Kafka backend adds to the log contract, on a real broker: client options that reach
librdkafka, errors of the Kafka side, a broker that goes away (calls fail within the request
timeout) and comes back (the same clients go on, nothing lost or repeated)."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest
from confluent_kafka.admin import AdminClient, ConfigResource

import kafka_broker
from kafka_broker import KafkaBroker, broker_binary
from minutely.errors import OffsetOutOfRangeError, StreamError
from minutely.stream import Consumer, Message, Record
from minutely.stream.kafka import KafkaLog

NewTopic = Callable[[str], str]
T = TypeVar("T")

pytestmark = pytest.mark.integration


@pytest.fixture
def klog(kafka_bootstrap: str) -> Iterator[KafkaLog]:
    log = KafkaLog(kafka_bootstrap, session_timeout_s=6.0, request_timeout_s=10.0)
    yield log
    log.close()


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[KafkaBroker]:
    """A broker of the test's own, which it may stop and start."""
    broker = KafkaBroker(tmp_path / "broker")
    broker.start()
    yield broker
    broker.stop()


def drain(consumer: Consumer, count: int, wait_s: float = 30.0) -> list[Record]:
    out: list[Record] = []
    deadline = time.monotonic() + wait_s
    while len(out) < count and time.monotonic() < deadline:
        out += consumer.poll(count - len(out), timeout_s=0.5)
    assert len(out) == count, f"got {len(out)} of {count} records"
    return out


def until(call: Callable[[], T], wait_s: float = 30.0) -> T:
    """``call()`` once it stops raising StreamError (a broker coming back)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return call()
        except StreamError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def values(n: int, tag: str, first_ts: int = 1) -> list[Message]:
    return [(None, f"{tag}{i}".encode(), first_ts + i) for i in range(n)]


# --- client options ---------------------------------------------------------------------------


def test_client_options_reach_the_producer(kafka_bootstrap: str, new_topic: NewTopic) -> None:
    t = new_topic("events")
    log = KafkaLog(kafka_bootstrap, options={"message.max.bytes": "2000"})
    try:
        log.create_topic(t, 2)
        assert log.append(t, [(None, b"x" * 1_000, 1)], partition=1) == [(1, 0)]
        pattern = (
            rf"kafka log {kafka_bootstrap}: append 1 records to topic '{t}': message 0 to "
            r"partition 1 was refused: .*\(MSG_SIZE_TOO_LARGE\)"
        )
        with pytest.raises(StreamError, match=pattern):
            log.append(t, [(None, b"x" * 5_000, 2)], partition=1)
        assert log.end_offset(t, 1) == 1
    finally:
        log.close()


def test_client_options_reach_the_consumers(kafka_bootstrap: str, new_topic: NewTopic) -> None:
    t = new_topic("events")
    log = KafkaLog(kafka_bootstrap, options={"fetch.max.bytes": "1000"})
    try:
        log.create_topic(t, 1)
        pattern = rf"consumer of topic '{t}': cannot start: .*`fetch.max.bytes` must be >="
        with pytest.raises(StreamError, match=pattern):
            log.consumer(t)
    finally:
        log.close()


def test_topics_keep_their_records_whatever_their_time(klog: KafkaLog, new_topic: NewTopic) -> None:
    # Time-based retention would delete records stamped days ago (every replay's) at once.
    t = new_topic("events")
    klog.create_topic(t, 1)
    admin = AdminClient({"bootstrap.servers": klog.bootstrap_servers})
    [future] = admin.describe_configs([ConfigResource("topic", t)]).values()
    assert future.result(10)["retention.ms"].value == "-1"


def test_messages_of_several_megabytes_go_through(klog: KafkaLog, new_topic: NewTopic) -> None:
    # A micro-batch of 4,096 samples is a few MB: above a broker's default 1 MB limit.
    t = new_topic("samples")
    klog.create_topic(t, 1)
    big = bytes(range(256)) * (6 << 12)  # 6 MiB
    klog.append(t, [(None, big, 5)])
    (record,) = klog.read(t, 0, 0, 10)
    assert record.value == big


# --- errors of the Kafka side -----------------------------------------------------------------


def test_topic_names_the_broker_refuses(klog: KafkaLog) -> None:
    with pytest.raises(StreamError, match=r"create topic 'bad name!' with 1 partitions failed: .*"):
        klog.create_topic("bad name!", 1)
    with pytest.raises(StreamError, match=r"look up topic 'bad name!' failed: Broker: Invalid"):
        klog.partitions("bad name!")
    with pytest.raises(StreamError, match=r"topic name must be a non-empty string, got ''"):
        klog.create_topic("", 1)


@pytest.mark.parametrize(
    ("message", "pattern"),
    [
        ((None, b"v", 0), r"message 0 has ts_ms 0, expected >= 1 \(Kafka stores no earlier"),
        ((None, b"v", -5), r"message 0 has ts_ms -5, expected >= 1"),
        ((None, b"v", 5, (("h", "text"),)), r"message 0 must be \(bytes \| None, bytes, int\["),
        ((None, b"v", 5, [("h", b"x")]), r"message 0 must be .*got \(NoneType, bytes, int, list\)"),
        ([None, b"v", 5], r"message 0 must be .*got list"),
        ((None, b"v"), r"message 0 must be .*got \(NoneType, bytes\)"),
    ],
)
def test_messages_kafka_cannot_carry_are_refused_before_any_is_sent(
    klog: KafkaLog, new_topic: NewTopic, message: Any, pattern: str
) -> None:
    t = new_topic("events")
    klog.create_topic(t, 1)
    with pytest.raises(StreamError, match=rf"append to topic '{t}': {pattern}"):
        klog.append(t, [message])
    assert klog.end_offset(t, 0) == 0


def test_read_arguments_are_checked(klog: KafkaLog, new_topic: NewTopic) -> None:
    t = new_topic("events")
    klog.create_topic(t, 1)
    klog.append(t, values(3, "m"))
    where = rf"read topic '{t}' partition 0 at offset"
    with pytest.raises(StreamError, match=rf"{where} 0: max_records must be an int >= 0, got -1"):
        klog.read(t, 0, 0, -1)
    with pytest.raises(StreamError, match=rf"{where} x: offset must be an int, got 'x'"):
        klog.read(t, 0, "x", 1)  # type: ignore[arg-type]


def test_consumer_arguments_are_checked(klog: KafkaLog, new_topic: NewTopic) -> None:
    t = new_topic("events")
    klog.create_topic(t, 2)
    klog.append(t, values(3, "m"), partition=1)
    with pytest.raises(StreamError, match=rf"'{t}': group must be a non-empty string or None"):
        klog.consumer(t, group="")
    with pytest.raises(StreamError, match=r"on_assign and on_revoke need a group"):
        klog.consumer(t, on_revoke=lambda parts: None)
    with pytest.raises(StreamError, match=r"session_timeout_s must be a number > 0, got 0"):
        klog.consumer(t, group="g", session_timeout_s=0)
    consumer = klog.consumer(t)
    try:
        with pytest.raises(StreamError, match=rf"'{t}' has partitions 0\.\.1, got partition 2"):
            consumer.assign({2: 0})
        with pytest.raises(StreamError, match=r"position of partition 1 must be an int, got 1.5"):
            consumer.assign({1: 1.5})  # type: ignore[dict-item]
        with pytest.raises(OffsetOutOfRangeError, match=r"partition 1: offset 4 .*\[0, 3\]"):
            consumer.assign({1: 4})
        consumer.assign({1: 1})
        with pytest.raises(StreamError, match=r"max_records must be an int >= 1, got 0"):
            consumer.poll(0)
        with pytest.raises(StreamError, match=r"timeout_s must be a number >= 0, got -1"):
            consumer.poll(1, timeout_s=-1)
        with pytest.raises(
            StreamError, match=r"cannot seek partition 0: it is not assigned .*\[1\]"
        ):
            consumer.seek(0, 0)
        with pytest.raises(OffsetOutOfRangeError, match=r"partition 1: offset -1 .*\[0, 3\]"):
            consumer.seek(1, -1)
        assert [r.value for r in drain(consumer, 2)] == [b"m1", b"m2"]
    finally:
        consumer.close()
    with pytest.raises(StreamError, match=r"poll: the consumer is closed"):
        consumer.poll(1)
    member = klog.consumer(t, group="g")
    try:
        with pytest.raises(StreamError, match=r"in group 'g': assign\(\) is for consumers without"):
            member.assign({0: 0})
    finally:
        member.close()


def test_closing_the_log_closes_its_consumers(kafka_bootstrap: str, new_topic: NewTopic) -> None:
    t = new_topic("events")
    log = KafkaLog(kafka_bootstrap)
    log.create_topic(t, 1)
    consumer = log.consumer(t)
    log.close()
    log.close()  # idempotent
    with pytest.raises(StreamError, match=r"poll: the consumer is closed"):
        consumer.poll(1)
    with pytest.raises(StreamError, match=rf"kafka log {kafka_bootstrap}: .*: the log is closed"):
        log.append(t, values(1, "m"))
    with pytest.raises(StreamError, match=rf"consumer of topic '{t}': the log is closed"):
        log.consumer(t)


# --- idle consumers ---------------------------------------------------------------------------


def test_a_consumer_read_to_its_end_idles_and_still_sees_new_records_at_once(
    klog: KafkaLog, new_topic: NewTopic
) -> None:
    # The test broker answers a fetch at a partition's end at once instead of holding it: a
    # consumer that kept fetching a caught-up partition would take a CPU core doing so.
    t = new_topic("events")
    klog.create_topic(t, 2)
    for p in (0, 1):
        klog.append(t, values(5, f"p{p}-"), partition=p)
    consumer = klog.consumer(t)
    try:
        consumer.assign({0: 0, 1: 0})
        drain(consumer, 10)
        cpu = time.process_time()
        time.sleep(1.0)
        assert time.process_time() - cpu < 0.2  # CPU seconds of the whole process, all threads
        # Appended between polls: the next poll fetches it without waiting for a timer.
        klog.append(t, [(None, b"between", 10)], partition=1)
        started = time.monotonic()
        assert [r.value for r in consumer.poll(10, timeout_s=10.0)] == [b"between"]
        assert time.monotonic() - started < 0.5
        # Appended while a poll waits: the poll looks for it every fraction of a second.
        writer = threading.Timer(0.3, lambda: klog.append(t, [(None, b"while", 11)], partition=0))
        writer.start()
        started = time.monotonic()
        try:
            got = consumer.poll(10, timeout_s=10.0)
        finally:
            writer.join()
        assert [r.value for r in got] == [b"while"]
        assert time.monotonic() - started < 0.3 + 0.5
        cpu = time.process_time()
        assert consumer.poll(10, timeout_s=1.0) == []
        assert time.process_time() - cpu < 0.2
        assert consumer.positions() == {0: 6, 1: 6}
    finally:
        consumer.close()


# --- groups -----------------------------------------------------------------------------------


def until_owned(consumers: list[Consumer], parts: list[set[int]], wait_s: float = 30.0) -> None:
    deadline = time.monotonic() + wait_s
    while [set(c.positions()) for c in consumers] != parts:
        assert time.monotonic() < deadline, [c.positions() for c in consumers]
        for c in consumers:
            c.poll(10, timeout_s=0.1)


def test_a_group_name_is_per_topic(klog: KafkaLog, new_topic: NewTopic) -> None:
    # Kafka's group ids span the broker; members of one name on two topics must not share.
    a, b = new_topic("a"), new_topic("b")
    klog.create_topic(a, 2)
    klog.create_topic(b, 2)
    first, second = klog.consumer(a, group="g"), klog.consumer(b, group="g")
    try:
        until_owned([first, second], [{0, 1}, {0, 1}])
    finally:
        first.close()
        second.close()


def poll_for(consumer: Consumer, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        consumer.poll(10, timeout_s=0.1)


def test_a_session_timeout_the_broker_refuses_fails_the_first_poll(
    klog: KafkaLog, new_topic: NewTopic
) -> None:
    t = new_topic("events")
    klog.create_topic(t, 1)
    member = klog.consumer(t, group="g", session_timeout_s=2.0)  # brokers want >= 6 s
    try:
        pattern = rf"'{t}' in group 'g': JoinGroup failed: .*\(INVALID_SESSION_TIMEOUT\)"
        with pytest.raises(StreamError, match=pattern):
            poll_for(member, 30.0)
    finally:
        member.close()


def test_callback_failures_come_out_of_poll_and_close(klog: KafkaLog, new_topic: NewTopic) -> None:
    t = new_topic("events")
    klog.create_topic(t, 2)

    def broken(parts: list[int]) -> Mapping[int, int]:
        raise ValueError(f"no checkpoint for {parts}")

    cases: list[tuple[str, Callable[[list[int]], Mapping[int, int]], type[Exception], str]] = [
        (
            "bad-assign",
            broken,
            StreamError,
            r"on_assign for partitions \[0, 1\] failed: ValueError",
        ),
        (
            "bad-position",
            lambda parts: {0: -3},
            StreamError,
            r"on_assign .* failed: StreamError\('position for partition 0 must be an int >= 0",
        ),
        (
            "far-position",
            lambda parts: {0: 99},
            OffsetOutOfRangeError,
            r"in group 'far-position': partition 0: position 99 is outside the partition's",
        ),
    ]
    for group, on_assign, kind, pattern in cases:
        member = klog.consumer(t, group=group, on_assign=on_assign)
        try:
            with pytest.raises(kind, match=pattern):
                poll_for(member, 30.0)
            if kind is StreamError:  # a failed callback leaves the consumer failed
                with pytest.raises(StreamError, match=pattern):
                    member.poll(1)
        finally:
            member.close()

    def refuse(parts: list[int]) -> None:
        raise RuntimeError("checkpoint store is down")

    member = klog.consumer(t, group="bad-revoke", on_revoke=refuse)
    until_owned([member], [{0, 1}])
    with pytest.raises(StreamError, match=r"on_revoke for partitions \[0, 1\] failed: Runtime"):
        member.close()


# --- a broker that goes away and comes back ---------------------------------------------------


def test_calls_to_an_unreachable_broker_fail_in_bounded_time_and_work_once_it_is_back(
    own_broker: KafkaBroker,
) -> None:
    t = "events"
    log = KafkaLog(own_broker.bootstrap, request_timeout_s=1.0)
    # A local queue of one message, whose messages outlive the test: its second message waits.
    tight = KafkaLog(
        own_broker.bootstrap,
        request_timeout_s=1.0,
        options={"queue.buffering.max.messages": "1", "message.timeout.ms": "60000"},
    )
    try:
        log.create_topic(t, 2)
        log.append(t, values(2, "a"), partition=1)
        tight.partitions(t)
        reader = log.consumer(t)
        reader.assign({0: 0, 1: 0})
        assert [r.value for r in drain(reader, 2)] == [b"a0", b"a1"]
        own_broker.stop()

        where = rf"kafka log {re.escape(own_broker.bootstrap)}: "

        def poll_until_it_fails() -> None:
            while True:
                reader.poll(10, timeout_s=0.2)

        calls: list[tuple[Callable[[], object], str]] = [
            (
                lambda: log.append(t, values(1, "b"), partition=1),
                rf"append 1 records to topic '{t}': delivery of message 0 to partition 1 failed: "
                r"Local: Message timed out",
            ),
            (
                lambda: tight.append(t, values(2, "c"), partition=0),
                rf"append 2 records to topic '{t}': no answer within the request timeout of 1.0 s",
            ),
            (lambda: log.create_topic("other", 1), r"create topic 'other' with 1 partitions"),
            (lambda: log.partitions("other"), r"look up topic 'other' failed: "),
            (lambda: log.end_offset(t, 0), rf"end offset of topic '{t}' partition 0 unknown: "),
            (lambda: log.read(t, 1, 0, 10), rf"end offset of topic '{t}' partition 1 unknown: "),
            (reader.end_offsets, rf"consumer of topic '{t}': end offset of partition 0 unknown"),
            (poll_until_it_fails, rf"consumer of topic '{t}': no broker reachable for \d"),
        ]
        for call, pattern in calls:
            started = time.monotonic()
            with pytest.raises(StreamError, match=where + pattern):
                call()
            # Each within a few request timeouts (1 s here), never hanging.
            assert time.monotonic() - started < 4.0, pattern

        own_broker.start()
        until(lambda: log.end_offset(t, 1))
        [(_, offset)] = until(lambda: log.append(t, values(1, "d"), partition=1))
        assert [r.value for r in log.read(t, 1, offset, 10)] == [b"d0"]
        assert [r.value for r in until(lambda: drain(reader, 1))] == [b"d0"]
        assert reader.positions()[1] == offset + 1
    finally:
        log.close()
        tight.close()


def test_a_broker_restart_loses_and_repeats_nothing(own_broker: KafkaBroker) -> None:
    t = "events"
    log = KafkaLog(own_broker.bootstrap, request_timeout_s=10.0)
    try:
        log.create_topic(t, 2)
        for p in range(2):
            log.append(t, values(10, f"p{p}-early", 1), partition=p)
        reader = log.consumer(t)
        reader.assign({0: 0, 1: 0})
        early = drain(reader, 7)
        snapshot = reader.positions()
        own_broker.restart()  # a clean stop keeps the broker's data
        for p in range(2):
            until(lambda p=p: log.append(t, values(10, f"p{p}-late", 11), partition=p))
        late = drain(reader, 40 - len(early))
        assert reader.poll(10, timeout_s=0.5) == []
        resumed = log.consumer(t)
        resumed.assign(snapshot)
        rest = drain(resumed, 40 - len(early))
        resumed.close()
    finally:
        log.close()
    expected = [
        (p, f"p{p}-{w}{i}".encode()) for p in range(2) for w in ("early", "late") for i in range(10)
    ]
    got = [(r.partition, r.value) for r in early + late]
    assert sorted(got) == sorted(expected)  # every record once, none twice
    for p in range(2):  # each partition in offset order
        offsets = [r.offset for r in early + late if r.partition == p]
        assert offsets == sorted(offsets)
    assert sorted((r.partition, r.offset) for r in rest) == sorted(
        (r.partition, r.offset) for r in late
    )


# --- the test broker --------------------------------------------------------------------------


def test_a_broker_that_cannot_start_fails_with_its_log(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("")  # a file where its data folder should go
    broker = KafkaBroker(tmp_path / "taken")
    with pytest.raises(RuntimeError, match=r"exited during start:\n(.|\n)*File exists"):
        broker.start()
    assert not broker.running


def test_a_broker_needs_a_free_port(own_broker: KafkaBroker, tmp_path: Path) -> None:
    second = KafkaBroker(tmp_path / "second", port=own_broker.port)
    with pytest.raises(RuntimeError, match=rf"{own_broker.bootstrap}: the port is already in use"):
        second.start()


def test_a_broker_that_does_not_open_its_port_in_time_is_stopped(tmp_path: Path) -> None:
    broker = KafkaBroker(tmp_path / "slow", start_timeout_s=0.0)
    with pytest.raises(RuntimeError, match=r"did not open its port within 0.0 s"):
        broker.start()
    assert not broker.running


def test_the_broker_binary_must_be_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kafka_broker.importlib.resources, "files", lambda package: tmp_path)
    with pytest.raises(RuntimeError, match=rf"noida-db broker binary, missing at {tmp_path}"):
        broker_binary()
