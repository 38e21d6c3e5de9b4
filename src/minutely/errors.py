"""The exception tree of minutely.

Every error raised on purpose by minutely derives from :class:`MinutelyError`; library errors are
translated at the boundary (``raise X(...) from exc``). Messages say where, what was expected and
what was got.

::

    MinutelyError
    ├── ConfigError            bad configuration; raised at start, names the field
    ├── EventError             one malformed raw event (sent to the dead-letter topic, not raised
    │                          out of the pipeline)
    ├── CodecError             bytes that do not decode into samples of the expected schema
    ├── SchemaError            a feature/label schema that is inconsistent or does not match
    ├── StreamError            the log backend
    │   ├── TopicNotFoundError
    │   └── OffsetOutOfRangeError
    ├── CheckpointError        a checkpoint that is missing, partial or does not match
    ├── StorageError           a file or folder minutely cannot create or write (a file in the
    │                          way, a read-only or full file system, no permission)
    ├── ArtifactError          a model artifact that must not be served
    │   ├── ChecksumMismatchError
    │   └── SchemaMismatchError
    └── ServeError             the inference server (bad request, unknown model, no version yet)
"""

from __future__ import annotations


class MinutelyError(Exception):
    """Base of every error minutely raises on purpose."""


class ConfigError(MinutelyError):
    """A configuration value is missing, unknown or of the wrong type or range."""

    def __init__(self, field: str, expected: str, got: object) -> None:
        self.field = field
        self.expected = expected
        self.got = got
        super().__init__(
            f"config field {field!r}: expected {expected}, got {got!r} ({type(got).__name__})"
        )


class EventError(MinutelyError):
    """A raw event that cannot be joined: missing fields, wrong types, impossible timestamps."""


class CodecError(MinutelyError):
    """Bytes that cannot be decoded into samples of the expected schema."""


class SchemaError(MinutelyError):
    """A feature/label schema that is inconsistent, or data that does not match it."""


class StreamError(MinutelyError):
    """A failure of the log backend."""


class TopicNotFoundError(StreamError):
    """A topic that was never created."""


class OffsetOutOfRangeError(StreamError):
    """A read or seek outside ``[0, end_offset]`` of a partition."""


class CheckpointError(MinutelyError):
    """A checkpoint that is missing, partially written or inconsistent with the pipeline."""


class StorageError(MinutelyError):
    """A file or folder minutely cannot create or write."""


class ArtifactError(MinutelyError):
    """A model artifact that must not be loaded."""


class ChecksumMismatchError(ArtifactError):
    """A file of an artifact whose sha256 differs from its manifest."""


class SchemaMismatchError(ArtifactError):
    """An artifact whose manifest or feature schema differs from what the loader expects."""


class ServeError(MinutelyError):
    """A request the inference server cannot answer."""
