"""The embedded log backend: one SQLite file in WAL mode, no server.

Kafka's model on a single file: a topic has a fixed number of partitions, each an append-only
sequence of records with dense offsets from 0. Several processes may open the same file: any number
of readers run alongside one another and alongside a writer (WAL), and concurrent writers are
serialised by ``BEGIN IMMEDIATE``, so two of them never hand out the same offset. Positions belong
to the callers; the log keeps no consumer state.

Durability is that of ``synchronous=NORMAL`` in WAL mode: a committed append survives a crash of
any process; the last commits before a power loss may be rolled back (never half applied).

>>> import tempfile
>>> from pathlib import Path
>>> with SqliteLog(Path(tempfile.mkdtemp()) / "log.sqlite") as log:
...     log.create_topic("events", partitions=2)
...     log.append("events", [(None, b"a", 1_000), (None, b"b", 1_001)], partition=1)
...     [r.value for r in log.read("events", 1, 0, 10)], log.end_offset("events", 1)
[(1, 0), (1, 1)]
([b'a', b'b'], 2)
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import TracebackType
from typing import NoReturn

from minutely.errors import OffsetOutOfRangeError, StreamError, TopicNotFoundError
from minutely.stream.base import Record
from minutely.stream.partitioner import partitions_for

_SCHEMA_VERSION = 1

# Offsets are dense, so the primary key doubles as the read index and the end-offset lookup.
# WITHOUT ROWID stores each record once, in key order, instead of a rowid table plus an index.
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
    PRIMARY KEY (topic_id, part, off)
) WITHOUT ROWID;
"""

_INSERT = "INSERT INTO records (topic_id, part, off, key, value, ts_ms) VALUES (?, ?, ?, ?, ?, ?)"
_SELECT = (
    "SELECT off, key, value, ts_ms FROM records"
    " WHERE topic_id = ? AND part = ? AND off >= ? AND off < ? ORDER BY off"
)
_END = "SELECT off FROM records WHERE topic_id = ? AND part = ? ORDER BY off DESC LIMIT 1"


class SqliteLog:
    """A :class:`~minutely.stream.base.Log` stored in one SQLite file.

    One instance serves one process (threads may share it: calls are serialised by a lock); other
    processes open their own instance on the same path. ``timeout_s`` bounds how long a call waits
    for another process's write transaction before it fails with a
    :class:`~minutely.errors.StreamError`.

    >>> import tempfile
    >>> from pathlib import Path
    >>> log = SqliteLog(Path(tempfile.mkdtemp()) / "log.sqlite")
    >>> log.create_topic("events", partitions=4)
    >>> log.append("events", [(b"user-7", b"{}", 5_000)])
    [(0, 0)]
    >>> log.close()
    """

    def __init__(self, path: str | Path, *, timeout_s: float = 30.0) -> None:
        self._path = Path(path)
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

    # --- the Log protocol -------------------------------------------------------------------

    def create_topic(self, topic: str, partitions: int) -> None:
        """Create ``topic`` with ``partitions`` partitions; a no-op if it exists with as many."""
        if not isinstance(topic, str) or not topic:
            raise StreamError(
                f"sqlite log {self._path}: topic name must be a non-empty string, got {topic!r}"
            )
        if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
            raise StreamError(
                f"sqlite log {self._path}: topic {topic!r} needs an int >= 1 partitions, "
                f"got {partitions!r}"
            )
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
        messages: list[tuple[bytes | None, bytes, int]],
        partition: int | None = None,
    ) -> list[tuple[int, int]]:
        """Append ``(key, value, ts_ms)`` messages in one transaction; all or none land.

        Returns ``(partition, offset)`` per message, in order. ``partition`` sends every message
        there; otherwise a keyed message goes to ``partition_for(key, n)`` and an unkeyed one to 0.
        """
        topic_id, n = self._topic(topic)
        if partition is not None:
            self._check_partition(topic, partition, n)
        if not messages:
            return []
        parts = self._route(topic, messages, partition, n)
        with self._write(f"append {len(messages)} records to topic {topic!r}") as conn:
            ends = {p: self._end(conn, topic_id, p) for p in set(parts)}
            rows = []
            placed = []
            for (key, value, ts_ms), p in zip(messages, parts, strict=True):
                off = ends[p]
                ends[p] = off + 1
                rows.append((topic_id, p, off, key, value, ts_ms))
                placed.append((p, off))
            conn.executemany(_INSERT, rows)
        return placed

    def read(self, topic: str, partition: int, offset: int, max_records: int) -> list[Record]:
        """Records ``offset, offset + 1, ...`` of one partition: at most ``max_records``, fewer
        (possibly none) at the end."""
        topic_id, n = self._topic(topic)
        self._check_partition(topic, partition, n)
        if isinstance(max_records, bool) or not isinstance(max_records, int) or max_records < 0:
            raise StreamError(
                f"sqlite log {self._path}: read of topic {topic!r} partition {partition}: "
                f"max_records must be an int >= 0, got {max_records!r}"
            )
        if isinstance(offset, bool) or not isinstance(offset, int):
            raise StreamError(
                f"sqlite log {self._path}: read of topic {topic!r} partition {partition}: "
                f"offset must be an int, got {offset!r}"
            )
        if offset < 0:
            self._out_of_range(topic, partition, offset)
        where = f"read topic {topic!r} partition {partition} at offset {offset}"
        with self._read(where) as conn:
            rows = conn.execute(
                _SELECT, (topic_id, partition, offset, offset + max_records)
            ).fetchall()
            # A row at ``offset`` proves it is in range; only an empty answer needs the end.
            if not rows:
                end = self._end(conn, topic_id, partition)
                if offset > end:
                    self._out_of_range(topic, partition, offset, end)
        return [Record(topic, partition, off, key, value, ts) for off, key, value, ts in rows]

    def end_offset(self, topic: str, partition: int) -> int:
        """The offset the next appended record will get (the count of records)."""
        topic_id, n = self._topic(topic)
        self._check_partition(topic, partition, n)
        with self._read(f"end offset of topic {topic!r} partition {partition}") as conn:
            return self._end(conn, topic_id, partition)

    def close(self) -> None:
        """Close the connection; later calls raise :class:`StreamError`. Idempotent."""
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
            raise StreamError(
                f"sqlite log {self._path}: schema version {version}, expected {_SCHEMA_VERSION}"
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

    def _live(self, what: str) -> sqlite3.Connection:
        if self._conn is None:
            raise StreamError(f"sqlite log {self._path}: {what}: the log is closed")
        return self._conn

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

    def _route(
        self,
        topic: str,
        messages: list[tuple[bytes | None, bytes, int]],
        partition: int | None,
        n: int,
    ) -> list[int]:
        keyed: list[int] = []
        keys: list[bytes] = []
        for i, msg in enumerate(messages):
            key, value, ts_ms = msg
            if (
                not isinstance(value, bytes)
                or not (key is None or isinstance(key, bytes))
                or not isinstance(ts_ms, int)
            ):
                raise StreamError(
                    f"sqlite log {self._path}: append to topic {topic!r}: message {i} must be "
                    f"(bytes | None, bytes, int), got ({type(key).__name__}, "
                    f"{type(value).__name__}, {type(ts_ms).__name__})"
                )
            if key is not None:
                keyed.append(i)
                keys.append(key)
        if partition is not None:
            return [partition] * len(messages)
        parts = [0] * len(messages)
        for i, p in zip(keyed, partitions_for(keys, n), strict=True):
            parts[i] = p
        return parts

    @staticmethod
    def _end(conn: sqlite3.Connection, topic_id: int, partition: int) -> int:
        row = conn.execute(_END, (topic_id, partition)).fetchone()
        return 0 if row is None else int(row[0]) + 1

    def _out_of_range(
        self, topic: str, partition: int, offset: int, end: int | None = None
    ) -> NoReturn:
        if end is None:
            end = self.end_offset(topic, partition)
        raise OffsetOutOfRangeError(
            f"sqlite log {self._path}: topic {topic!r} partition {partition}: offset {offset} is "
            f"outside the valid range [0, {end}]"
        )
