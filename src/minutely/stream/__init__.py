"""The durable logs that connect the stages: the interface, its backends and helpers."""

from minutely.stream.base import (
    Consumer,
    Headers,
    Log,
    Message,
    OnAssign,
    OnRevoke,
    Record,
    message_headers,
    partition_for,
)
from minutely.stream.dead_letters import DeadLetter, DeadLetterSink, read_dead_letters
from minutely.stream.factory import open_log
from minutely.stream.kafka import KafkaLog
from minutely.stream.partitioner import partitions_for
from minutely.stream.reader import TopicReader
from minutely.stream.sqlite import SqliteLog
from minutely.stream.sqlite_consumer import SqliteConsumer

__all__ = [
    "Consumer",
    "DeadLetter",
    "DeadLetterSink",
    "Headers",
    "KafkaLog",
    "Log",
    "Message",
    "OnAssign",
    "OnRevoke",
    "Record",
    "SqliteConsumer",
    "SqliteLog",
    "TopicReader",
    "message_headers",
    "open_log",
    "partition_for",
    "partitions_for",
    "read_dead_letters",
]
