"""The embedded log backend: one SQLite file in WAL mode, no server.

Kafka's model on a single file: a topic has a fixed number of partitions, each an append-only
sequence of records. This backend hands out dense offsets from 0, but callers rely only on what
the :class:`~minutely.stream.base.Log` contract promises (increasing offsets). Several processes
may open the same file: any number of readers run alongside one another and alongside a writer
(WAL), and concurrent writers are serialised by ``BEGIN IMMEDIATE``, so two of them never hand
out the same offset. Positions belong to the callers; the log keeps no offsets for consumers, only
the membership of consumer groups (:mod:`minutely.stream.sqlite_groups`).

Durability is that of ``synchronous=NORMAL`` in WAL mode: a committed append survives a crash of
any process; the last commits before a power loss may be rolled back (never half applied).

>>> import tempfile
>>> from pathlib import Path
>>> with SqliteLog(Path(tempfile.mkdtemp()) / "log.sqlite") as log:
...     log.create_topic("events", partitions=2)
...     log.append("events", [(None, b"a", 1_000), (None, b"b", 1_001, (("h", b"1"),))], 1)
...     [(r.value, r.headers) for r in log.read("events", 1, 0, 10)], log.end_offset("events", 1)
[(1, 0), (1, 1)]
([(b'a', ()), (b'b', (('h', b'1'),))], 2)
"""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn, cast

import msgspec

from minutely.errors import OffsetOutOfRangeError, StreamError, TopicNotFoundError
from minutely.stream.base import (
    Headers,
    Message,
    OnAssign,
    OnRevoke,
    Record,
    check_read_args,
    check_topic_args,
)
from minutely.stream.partitioner import partitions_for
from minutely.stream.sqlite_consumer import SqliteConsumer

# Version 2 added record headers and the consumer-group tables.
_SCHEMA_VERSION = 2

# The primary key doubles as the read index and the end-offset lookup. WITHOUT ROWID stores each
# record once, in key order, instead of a rowid table plus an index. Headers are NULL when empty
# (most records), else a msgpack array of [name, value] pairs.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS topics (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    partitions INTEGER NOT NULL CHECK (partitions >= 1)
);
CREATE TABLE IF NOT EXISTS records (
    topic_id INTEGER NOT NULL,
    part INTEGER NOT NULL,
    off INTEGER NOT NULL,
    key BLOB,
    value BLOB NOT NULL,
    ts_ms INTEGER NOT NULL,
    headers BLOB,
    PRIMARY KEY (topic_id, part, off)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS group_members (
    grp TEXT NOT NULL,
    topic_id INTEGER NOT NULL,
    member TEXT NOT NULL,
    heartbeat_ms INTEGER NOT NULL,
    session_ms INTEGER NOT NULL,
    PRIMARY KEY (grp, topic_id, member)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS group_owners (
    grp TEXT NOT NULL,
    topic_id INTEGER NOT NULL,
    part INTEGER NOT NULL,
    member TEXT NOT NULL,
    PRIMARY KEY (grp, topic_id, part)
) WITHOUT ROWID;
"""

_INSERT = (
    "INSERT INTO records (topic_id, part, off, key, value, ts_ms, headers)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_SELECT = (
    "SELECT off, key, value, ts_ms, headers FROM records"
    " WHERE topic_id = ? AND part = ? AND off >= ? ORDER BY off LIMIT ?"
)
_END = "SELECT off FROM records WHERE topic_id = ? AND part = ? ORDER BY off DESC LIMIT 1"

_HEADERS_ENCODER = msgspec.msgpack.Encoder()
_HEADERS_DECODER = msgspec.msgpack.Decoder(tuple[tuple[str, bytes], ...])


def _slot_setters() -> tuple[Callable[[Record, Any], None], ...] | None:
    """The setters of :class:`Record`'s slots in field order, or ``None`` if it has no slots."""
    setters = []
    for f in dataclasses.fields(Record):
        slot = Record.__dict__.get(f.name)
        if type(slot) is not types.MemberDescriptorType:
            return None
        setters.append(slot.__set__)
    return tuple(setters)


_SETTERS = _slot_setters()
_new = object.__new__


def _record(
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes,
    ts_ms: int,
    headers: Headers,
) -> Record:
    """``Record(...)`` at a third less cost: a frozen dataclass's ``__init__`` sets each field
    through ``object.__setattr__``; this fills the slots directly (the read path builds one
    record per message)."""
    if _SETTERS is None:
        return Record(topic, partition, offset, key, value, ts_ms, headers)
    rec = _new(Record)
    s_topic, s_part, s_off, s_key, s_value, s_ts, s_headers = _SETTERS
    s_topic(rec, topic)
    s_part(rec, partition)
    s_off(rec, offset)
    s_key(rec, key)
    s_value(rec, value)
    s_ts(rec, ts_ms)
    s_headers(rec, headers)
    return rec


class SqliteLog:
    """A :class:`~minutely.stream.base.Log` stored in one SQLite file.

    One instance serves one process (threads may share it: calls are serialised by a lock); other
    processes open their own instance on the same path. ``timeout_s`` bounds how long a call waits
    for another process's write transaction before it fails with a
    :class:`~minutely.errors.StreamError`. ``session_timeout_s`` is how long a group member of
    this log's consumers may go without polling before the others take its partitions.

    >>> import tempfile
    >>> from pathlib import Path
    >>> log = SqliteLog(Path(tempfile.mkdtemp()) / "log.sqlite")
    >>> log.create_topic("events", partitions=4)
    >>> log.append("events", [(b"user-7", b"{}", 5_000)])
    [(0, 0)]
    >>> log.close()
    """

    def __init__(
        self, path: str | Path, *, timeout_s: float = 30.0, session_timeout_s: float = 10.0
    ) -> None:
        self._path = Path(path)
        if (
            isinstance(session_timeout_s, bool)
            or not isinstance(session_timeout_s, int | float)
            or not session_timeout_s > 0
        ):
            raise StreamError(
                f"sqlite log {self._path}: session_timeout_s must be a number > 0, "
                f"got {session_timeout_s!r}"
            )
        self._session_timeout_s = float(session_timeout_s)
        self._lock = threading.Lock()
        # A topic's id and partition count never change once created, so caching them stays right
        # while other processes write; misses are not cached (another process may create it).
        self._topics: dict[str, tuple[int, int]] = {}
        try:
            conn = sqlite3.connect(
                self._path, timeout=timeout_s, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise StreamError(f"sqlite log {self._path}: cannot open the file: {exc}") from exc
        self._conn: sqlite3.Connection | None = conn
        try:
            self._setup(conn, timeout_s)
        except sqlite3.Error as exc:
            conn.close()
            self._conn = None
            raise StreamError(f"sqlite log {self._path}: cannot open the file: {exc}") from exc
        except StreamError:
            conn.close()
            self._conn = None
            raise

    @property
    def path(self) -> Path:
        return self._path

    @property
    def session_timeout_s(self) -> float:
        return self._session_timeout_s

    # --- the Log protocol -------------------------------------------------------------------

    def create_topic(self, topic: str, partitions: int) -> None:
        """Create ``topic`` with ``partitions`` partitions; a no-op if it exists with as many."""
        check_topic_args(f"sqlite log {self._path}", topic, partitions)
        with self._write(f"create topic {topic!r}") as conn:
            row = conn.execute(
                "SELECT id, partitions FROM topics WHERE name = ?", (topic,)
            ).fetchone()
            if row is None:
                cur = conn.execute(
                    "INSERT INTO topics (name, partitions) VALUES (?, ?)", (topic, partitions)
                )
                row = (cur.lastrowid, partitions)
            elif row[1] != partitions:
                raise StreamError(
                    f"sqlite log {self._path}: topic {topic!r} exists with {row[1]} partitions, "
                    f"cannot create it with {partitions}"
                )
        self._topics[topic] = (int(row[0]), int(row[1]))

    def partitions(self, topic: str) -> int:
        return self._topic(topic)[1]

    def append(
        self,
        topic: str,
        messages: Sequence[Message],
        partition: int | None = None,
    ) -> list[tuple[int, int]]:
        """Append ``(key, value, ts_ms[, headers])`` messages in one transaction: all or none land.

        Returns ``(partition, offset)`` per message, in order. ``partition`` sends every message
        there; otherwise a keyed message goes to ``partition_for(key, n)`` and an unkeyed one to 0.
        """
        topic_id, n = self._topic(topic)
        if partition is not None:
            self._check_partition(topic, partition, n)
        if not messages:
            return []
        parts, fields = self._route(topic, messages, partition, n)
        with self._write(f"append {len(messages)} records to topic {topic!r}") as conn:
            ends = {p: self._end(conn, topic_id, p) for p in set(parts)}
            rows = []
            placed = []
            for (key, value, ts_ms, blob), p in zip(fields, parts, strict=True):
                off = ends[p]
                ends[p] = off + 1
                rows.append((topic_id, p, off, key, value, ts_ms, blob))
                placed.append((p, off))
            conn.executemany(_INSERT, rows)
        return placed

    def read(self, topic: str, partition: int, offset: int, max_records: int) -> list[Record]:
        """The records of one partition from ``offset`` on, in order: at most ``max_records``,
        fewer (possibly none) at the end."""
        topic_id, n = self._topic(topic)
        self._check_partition(topic, partition, n)
        where = f"sqlite log {self._path}: read of topic {topic!r} partition {partition}"
        check_read_args(where, offset, max_records)
        if offset < 0:
            self._out_of_range(topic, partition, offset)
        where = f"read topic {topic!r} partition {partition} at offset {offset}"
        with self._read(where) as conn:
            records = self._fetch(conn, topic, topic_id, partition, offset, max_records)
            # A record at or after ``offset`` proves it is in range; only an empty answer needs
            # the end.
            if not records:
                end = self._end(conn, topic_id, partition)
                if offset > end:
                    self._out_of_range(topic, partition, offset, end)
        return records

    def end_offset(self, topic: str, partition: int) -> int:
        """The offset the next appended record will get."""
        topic_id, n = self._topic(topic)
        self._check_partition(topic, partition, n)
        with self._read(f"end offset of topic {topic!r} partition {partition}") as conn:
            return self._end(conn, topic_id, partition)

    def consumer(
        self,
        topic: str,
        *,
        group: str | None = None,
        on_assign: OnAssign | None = None,
        on_revoke: OnRevoke | None = None,
    ) -> SqliteConsumer:
        """A sequential reader of ``topic``: assigned by the caller, or a member of ``group``
        (see :class:`~minutely.stream.sqlite_consumer.SqliteConsumer`)."""
        return SqliteConsumer(
            self,
            topic,
            group=group,
            on_assign=on_assign,
            on_revoke=on_revoke,
            session_timeout_s=self._session_timeout_s,
        )

    def close(self) -> None:
        """Close the connection; later calls (also of its consumers) raise :class:`StreamError`.
        Idempotent."""
        with self._lock:
            if self._conn is not None:
                conn, self._conn = self._conn, None
                try:
                    conn.close()
                except sqlite3.Error as exc:
                    raise StreamError(f"sqlite log {self._path}: close failed: {exc}") from exc

    def __enter__(self) -> SqliteLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._conn is None else "open"
        return f"SqliteLog({str(self._path)!r}, {state})"

    # --- shared with the consumers ----------------------------------------------------------

    @contextmanager
    def _read(self, what: str) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._live(what)
            try:
                yield conn
            except sqlite3.Error as exc:
                raise StreamError(f"sqlite log {self._path}: {what} failed: {exc}") from exc

    @contextmanager
    def _write(self, what: str) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction: it takes the write lock before reading the end
        offsets, so a concurrent writer cannot allocate the same ones."""
        with self._lock:
            conn = self._live(what)
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StreamError(f"sqlite log {self._path}: {what} failed: {exc}") from exc
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:
                    # The original error is the one worth reporting.
                    with suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise StreamError(f"sqlite log {self._path}: {what} failed: {exc}") from exc
                raise

    def _topic(self, topic: str) -> tuple[int, int]:
        cached = self._topics.get(topic)
        if cached is not None:
            return cached
        with self._read(f"look up topic {topic!r}") as conn:
            row = conn.execute("SELECT id, partitions FROM topics WHERE name = ?", (topic,))
            found = row.fetchone()
            if found is None:
                known = [r[0] for r in conn.execute("SELECT name FROM topics ORDER BY name")]
                raise TopicNotFoundError(
                    f"sqlite log {self._path}: topic {topic!r} does not exist "
                    f"(known topics: {known})"
                )
        entry = (int(found[0]), int(found[1]))
        self._topics[topic] = entry
        return entry

    def _check_partition(self, topic: str, partition: int, n: int) -> None:
        if isinstance(partition, bool) or not isinstance(partition, int) or not 0 <= partition < n:
            raise StreamError(
                f"sqlite log {self._path}: topic {topic!r} has partitions 0..{n - 1}, "
                f"got partition {partition!r}"
            )

    def _fetch(
        self,
        conn: sqlite3.Connection,
        topic: str,
        topic_id: int,
        partition: int,
        offset: int,
        limit: int,
    ) -> list[Record]:
        """Up to ``limit`` records of one partition from ``offset`` on (inside ``_read``)."""
        rows = conn.execute(_SELECT, (topic_id, partition, offset, limit)).fetchall()
        decode = _HEADERS_DECODER.decode
        try:
            return [
                _record(topic, partition, off, key, value, ts, () if h is None else decode(h))
                for off, key, value, ts, h in rows
            ]
        except msgspec.DecodeError:
            # Rare: find the record at fault, for a message that names its offset.
            for off, _, _, _, h in rows:
                if h is not None:
                    self._decode_headers(topic, partition, off, h)
            raise

    @staticmethod
    def _end(conn: sqlite3.Connection, topic_id: int, partition: int) -> int:
        row = conn.execute(_END, (topic_id, partition)).fetchone()
        return 0 if row is None else int(row[0]) + 1

    def _out_of_range(
        self, topic: str, partition: int, offset: object, end: int | None = None
    ) -> NoReturn:
        if end is None:
            end = self.end_offset(topic, partition)
        raise OffsetOutOfRangeError(
            f"sqlite log {self._path}: topic {topic!r} partition {partition}: offset {offset!r} "
            f"is outside the valid range [0, {end}]"
        )

    # --- internals --------------------------------------------------------------------------

    def _setup(self, conn: sqlite3.Connection, timeout_s: float) -> None:
        conn.execute(f"PRAGMA busy_timeout = {int(timeout_s * 1000)}")
        # Takes effect only when the file is new; records of ~250 bytes pack better in big pages.
        conn.execute("PRAGMA page_size = 16384")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StreamError(
                f"sqlite log {self._path}: expected WAL journal mode, got {mode!r} "
                "(WAL needs a local file system with shared memory)"
            )
        # NORMAL is durable across process crashes in WAL mode and avoids an fsync per commit.
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA cache_size = -32768")
        conn.execute("PRAGMA mmap_size = 268435456")
        conn.execute("PRAGMA temp_store = MEMORY")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == _SCHEMA_VERSION:
            return
        if version != 0:
            age = "an older" if version < _SCHEMA_VERSION else "a newer"
            raise StreamError(
                f"sqlite log {self._path}: schema version {version}, expected "
                f"{_SCHEMA_VERSION} (the file was written by {age} minutely; read it with that "
                "version or start a new log file)"
            )
        conn.execute("BEGIN IMMEDIATE")
        try:
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    conn.execute(stmt)
            conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _live(self, what: str) -> sqlite3.Connection:
        if self._conn is None:
            raise StreamError(f"sqlite log {self._path}: {what}: the log is closed")
        return self._conn

    def _route(
        self,
        topic: str,
        messages: Sequence[Message],
        partition: int | None,
        n: int,
    ) -> tuple[list[int], list[tuple[bytes | None, bytes, int, bytes | None]]]:
        """Each message's partition and its ``(key, value, ts_ms, encoded headers)``; refuses the
        whole batch if any message is malformed, before anything is written."""
        keyed: list[int] = []
        keys: list[bytes] = []
        rows: list[tuple[bytes | None, bytes, int, bytes | None]] = []
        for i, msg in enumerate(messages):
            size = len(msg) if isinstance(msg, tuple) else 0
            if size == 3:
                key, value, ts_ms = cast(tuple[bytes | None, bytes, int], msg)
                blob = None
            elif size == 4:
                key, value, ts_ms, headers = cast(tuple[bytes | None, bytes, int, Any], msg)
                blob = None if headers == () else self._encode_headers(topic, i, headers)
            else:
                raise StreamError(
                    f"sqlite log {self._path}: append to topic {topic!r}: message {i} must be a "
                    f"(key, value, ts_ms[, headers]) tuple, got {_brief(msg)}"
                )
            if not (
                isinstance(value, bytes)
                and (key is None or isinstance(key, bytes))
                and isinstance(ts_ms, int)
            ):
                raise StreamError(
                    f"sqlite log {self._path}: append to topic {topic!r}: message {i} must be "
                    f"(bytes | None, bytes, int[, headers]), got ({type(key).__name__}, "
                    f"{type(value).__name__}, {type(ts_ms).__name__})"
                )
            if key is not None:
                keyed.append(i)
                keys.append(key)
            rows.append((key, value, ts_ms, blob))
        if partition is not None:
            return [partition] * len(messages), rows
        parts = [0] * len(messages)
        for i, p in zip(keyed, partitions_for(keys, n), strict=True):
            parts[i] = p
        return parts, rows

    def _encode_headers(self, topic: str, i: int, headers: Any) -> bytes | None:
        if not isinstance(headers, tuple):
            raise StreamError(
                f"sqlite log {self._path}: append to topic {topic!r}: message {i} headers must "
                f"be a tuple of (str, bytes) pairs, got {type(headers).__name__}"
            )
        for j, pair in enumerate(headers):
            if (
                not isinstance(pair, tuple)
                or len(pair) != 2
                or not isinstance(pair[0], str)
                or not isinstance(pair[1], bytes)
            ):
                raise StreamError(
                    f"sqlite log {self._path}: append to topic {topic!r}: message {i} header "
                    f"{j} must be a (str, bytes) pair, got {_brief(pair)}"
                )
        return _HEADERS_ENCODER.encode(headers) if headers else None

    def _decode_headers(self, topic: str, partition: int, offset: int, blob: bytes) -> Headers:
        try:
            return _HEADERS_DECODER.decode(blob)
        except msgspec.DecodeError as exc:
            raise StreamError(
                f"sqlite log {self._path}: topic {topic!r} partition {partition} offset "
                f"{offset}: headers are not a msgpack array of [str, bytes] pairs: {exc}"
            ) from exc


def _brief(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
