"""The durable logs that connect the stages: the interface, its backends and helpers."""

from minutely.stream.base import Log, Record, partition_for
from minutely.stream.dead_letters import DeadLetter, DeadLetterSink, read_dead_letters
from minutely.stream.factory import open_log
from minutely.stream.partitioner import partitions_for
from minutely.stream.reader import TopicReader
from minutely.stream.sqlite import SqliteLog

__all__ = [
    "DeadLetter",
    "DeadLetterSink",
    "Log",
    "Record",
    "SqliteLog",
    "TopicReader",
    "open_log",
    "partition_for",
    "partitions_for",
    "read_dead_letters",
]
