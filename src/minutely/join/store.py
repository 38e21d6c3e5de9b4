"""One raw partition's join state on disk: an SQLite file (WAL) that checkpoints incrementally.

A :class:`~minutely.join.Joiner` given a :class:`JoinStore` keeps there what grows with its
horizons: the held impressions (their features) and every pCVR entry (waiting up to the
conversion model's correction horizon), with an index by time for each, so expiry is a range
delete. The joiner keeps a bounded hot part in memory and writes to the store only at a
checkpoint: :meth:`JoinStore.commit` applies one changelog (rows written since the last
checkpoint, range deletes by time), the joiner's small in-memory state and the caller's state
(positions, writer states) in one transaction, and counts the generation. A crash between
checkpoints leaves the store at the last one; a restore reads the small state back and the rows
on demand.

Tables: ``imps`` (impression id -> time, the impression as msgpack), ``entries`` (conversion
model index, impression id -> anchor, conversion, status, expiry, impression time, the
impression; the expiry is null while the window is open) and ``meta`` (format, generation,
joiner state, caller state).
Ids, which may use all 64 bits, are stored shifted by ``2**63`` into SQLite's signed range, which
keeps their order.

With ``undo``, a commit also keeps what it replaced (the rows it deleted or overwrote, the keys it
wrote, the previous states) in the ``undo_*`` tables, so :meth:`JoinStore.roll_back` can return
the store to the generation before. An owner whose own checkpoint is written after the store's
commit (the in-process replay: the store commits, then the checkpoint folder) uses it to come
back to its checkpoint's generation when it stopped between the two.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from minutely.errors import CheckpointError, StorageError
from minutely.events import Impression
from minutely.fsutil import describe_os_error, fsync_dir

STORE_FORMAT = 1
_SHIFT = 1 << 63
_IMP_ENC = msgspec.msgpack.Encoder()
# Untyped: ints stay ints, floats floats, and ids may use all 64 bits (the joiner's range).
_IMP_DEC = msgspec.msgpack.Decoder()

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS imps (
    iid INTEGER PRIMARY KEY, ts INTEGER NOT NULL, imp BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS imps_ts ON imps (ts);
CREATE TABLE IF NOT EXISTS entries (
    model INTEGER NOT NULL, iid INTEGER NOT NULL, anchor INTEGER NOT NULL,
    conversion INTEGER NOT NULL, status INTEGER NOT NULL, expiry INTEGER,
    imp_ts INTEGER NOT NULL, imp BLOB NOT NULL,
    PRIMARY KEY (model, iid)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS entries_expiry ON entries (model, expiry);
CREATE TABLE IF NOT EXISTS undo_meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS undo_imps (
    iid INTEGER PRIMARY KEY, ts INTEGER NOT NULL, imp BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS undo_imp_keys (iid INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS undo_entries (
    model INTEGER NOT NULL, iid INTEGER NOT NULL, anchor INTEGER NOT NULL,
    conversion INTEGER NOT NULL, status INTEGER NOT NULL, expiry INTEGER,
    imp_ts INTEGER NOT NULL, imp BLOB NOT NULL,
    PRIMARY KEY (model, iid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS undo_entry_keys (
    model INTEGER NOT NULL, iid INTEGER NOT NULL, PRIMARY KEY (model, iid)
) WITHOUT ROWID;
"""
_UNDO_TABLES = ("undo_meta", "undo_imps", "undo_imp_keys", "undo_entries", "undo_entry_keys")
_STATE_KEYS = ("generation", "joiner", "caller")


def encode_impression(imp: Impression) -> bytes:
    """The stored form of an impression (msgpack of every field, features included)."""
    return _IMP_ENC.encode(imp)


@dataclass(frozen=True, slots=True)
class StoredEntry:
    """One pCVR entry as stored: ``expiry`` is ``None`` while its window is open."""

    imp: Impression
    anchor: int
    conversion: int
    status: int
    expiry: int | None


@dataclass(frozen=True, slots=True)
class Changelog:
    """What one checkpoint writes: rows changed since the last one and range deletes.

    ``imps_below``: impressions with a time before it are deleted. ``imps``: impressions
    written. ``expired``: per conversion model index, entries with an expiry before the value
    are deleted. ``entries``: ``(model, anchor, conversion, status, expiry, impression)``
    written (keyed by model and the impression's id). ``gone``: ``(model, imp_id)`` entries
    deleted (changed, then expired, since the last commit). Deletes run before writes.
    """

    imps_below: int
    imps: Sequence[Impression]
    expired: Sequence[tuple[int, int]]
    entries: Sequence[tuple[int, int, int, int, int | None, Impression]]
    gone: Sequence[tuple[int, int]] = ()


@dataclass(frozen=True, slots=True)
class CommitStats:
    """One commit: its generation, the rows written and deleted, and the bytes of payload
    written (impressions, the two states and 8 bytes per integer column)."""

    generation: int
    rows_written: int
    rows_deleted: int
    bytes_written: int


class JoinStore:
    """The join state of one raw partition in one SQLite file; see the module docstring.

    One process uses a store at a time (the partition's owner). :meth:`create` starts an empty
    one (removing whatever the path held; :class:`StorageError` when it cannot); :meth:`open`
    opens one that exists, checks its integrity and format, and raises :class:`CheckpointError`
    naming the file when it is not a sound join store. ``undo``: each commit keeps what
    :meth:`roll_back` needs.
    """

    def __init__(self, path: Path, db: sqlite3.Connection, *, undo: bool = False) -> None:
        self.path = path
        self.undo = undo
        self._db = db

    # -- opening ----------------------------------------------------------------------------------

    @classmethod
    def create(cls, path: Path, *, undo: bool = False) -> JoinStore:
        """An empty store at ``path``; an earlier store there (and its WAL) is replaced.

        The store is built in a temporary file and renamed into place: a process killed while
        creating it leaves either the earlier file or the complete new one at ``path``, never a
        store with some of its tables.
        """
        path = Path(path)
        tmp = path.with_name(f"{path.name}.creating")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            for base in (tmp, path):
                for suffix in ("-wal", "-shm", "-journal", ""):
                    if base == path and suffix == "":
                        continue  # replaced below, once the new store is complete
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(f"{base}{suffix}")
        except OSError as exc:
            raise StorageError(
                f"join store {path}: cannot create it ({describe_os_error(exc)})"
            ) from exc
        try:
            db = _connect(tmp)
            try:
                db.executescript(
                    f"BEGIN;{_SCHEMA}INSERT INTO meta VALUES ('format', {int(STORE_FORMAT)}), "
                    "('generation', 0);COMMIT;"
                )
            finally:
                db.close()  # the last connection: the WAL is folded into the file
            os.replace(tmp, path)
            fsync_dir(path.parent)
            db = _connect(path)
        except sqlite3.Error as exc:
            raise StorageError(f"join store {path}: cannot create it ({exc})") from exc
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise StorageError(
                f"join store {path}: cannot create it ({describe_os_error(exc)})"
            ) from exc
        return cls(path, db, undo=undo)

    @classmethod
    def open(cls, path: Path, *, undo: bool = False) -> JoinStore:
        """The store at ``path``, checked (``PRAGMA quick_check`` and its format)."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"join store {path}: expected a file, found none")
        try:
            db = _connect(path)
        except sqlite3.Error as exc:
            raise CheckpointError(f"join store {path}: cannot open it ({exc})") from exc
        store = cls(path, db, undo=undo)
        try:
            problems = [str(r[0]) for r in db.execute("PRAGMA quick_check").fetchall()]
            if problems != ["ok"]:
                raise CheckpointError(
                    f"join store {path}: failed its integrity check: {'; '.join(problems[:3])}"
                )
            tables = {
                str(r[0]) for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
            if not {"meta", "imps", "entries", *_UNDO_TABLES} <= tables:
                raise CheckpointError(
                    f"join store {path}: expected tables meta, imps and entries (and undo_*), "
                    f"got {sorted(tables)}"
                )
            fmt = store._meta("format")
            if fmt != STORE_FORMAT:
                raise CheckpointError(
                    f"join store {path}: expected store format {STORE_FORMAT}, got {fmt!r}"
                )
            store.generation()
        except sqlite3.Error as exc:
            store.close()
            raise CheckpointError(f"join store {path}: unreadable ({exc})") from exc
        except CheckpointError:
            store.close()
            raise
        return store

    def close(self) -> None:
        """Close the file; nothing is lost (writes happen only in :meth:`commit`)."""
        self._db.close()

    # -- reading ----------------------------------------------------------------------------------

    def generation(self) -> int:
        """How many commits the store holds (0: none yet)."""
        value = self._meta("generation")
        if not isinstance(value, int) or value < 0:
            raise CheckpointError(
                f"join store {self.path}: expected a generation >= 0, got {value!r}"
            )
        return value

    def joiner_state(self) -> bytes | None:
        """The joiner's small state of the last commit (``None`` before the first)."""
        value = self._meta("joiner")
        return None if value is None else bytes(value)

    def caller_state(self) -> bytes | None:
        """The caller's state of the last commit (``None`` before the first)."""
        value = self._meta("caller")
        return None if value is None else bytes(value)

    def impression(self, iid: int) -> Impression | None:
        row = self._one("SELECT imp FROM imps WHERE iid = ?", (iid - _SHIFT,))
        return None if row is None else self._impression(row[0], iid)

    def impression_keys(self) -> list[tuple[int, int]]:
        """Every stored impression as ``(ts, imp_id)``, in that order."""
        rows = self._all("SELECT ts, iid FROM imps ORDER BY ts, iid", ())
        return [(ts, iid + _SHIFT) for ts, iid in rows]

    def newest_impressions(self, n: int) -> list[Impression]:
        """The ``n`` latest stored impressions (by time, then id)."""
        rows = self._all("SELECT iid, imp FROM imps ORDER BY ts DESC, iid DESC LIMIT ?", (n,))
        return [self._impression(blob, iid + _SHIFT) for iid, blob in rows]

    def entry(self, model: int, iid: int, expired_below: int) -> StoredEntry | None:
        """Model ``model``'s emitted entry for ``iid``, unless it expired before
        ``expired_below`` (an entry whose window was open at the last commit is in the
        joiner's memory, and its row may be stale)."""
        row = self._one(
            "SELECT anchor, conversion, status, expiry, imp FROM entries "
            "WHERE model = ? AND iid = ? AND expiry >= ?",
            (model, iid - _SHIFT, expired_below),
        )
        if row is None:
            return None
        anchor, conversion, status, expiry, blob = row
        return StoredEntry(self._impression(blob, iid), anchor, conversion, status, expiry)

    def open_entries(self, model: int) -> list[StoredEntry]:
        """Model ``model``'s entries whose window was open at the last commit."""
        rows = self._all(
            "SELECT iid, anchor, conversion, status, imp FROM entries "
            "WHERE model = ? AND expiry IS NULL",
            (model,),
        )
        out = []
        for iid, anchor, conversion, status, blob in rows:
            imp = self._impression(blob, iid + _SHIFT)
            out.append(StoredEntry(imp, anchor, conversion, status, None))
        return out

    def min_expiry(self, model: int, at_least: int) -> int | None:
        """The earliest expiry ``>= at_least`` among model ``model``'s entries."""
        row = self._one(
            "SELECT MIN(expiry) FROM entries WHERE model = ? AND expiry >= ?", (model, at_least)
        )
        return None if row is None or row[0] is None else int(row[0])

    def entry_ids(self, model: int, expired_below: int) -> set[int]:
        """The ids of model ``model``'s emitted entries not expired before ``expired_below``."""
        rows = self._all(
            "SELECT iid FROM entries WHERE model = ? AND expiry >= ?", (model, expired_below)
        )
        return {iid + _SHIFT for (iid,) in rows}

    def row_counts(self) -> tuple[int, int]:
        """Rows stored: impressions, pCVR entries."""
        imps = self._one("SELECT COUNT(*) FROM imps", ())
        entries = self._one("SELECT COUNT(*) FROM entries", ())
        return (int(imps[0]) if imps else 0, int(entries[0]) if entries else 0)

    def used_bytes(self) -> int:
        """Bytes of the database's pages in use (free pages, reused by later writes, not
        counted; the WAL's copies of pages not counted twice)."""
        pages = self._one("PRAGMA page_count", ())
        free = self._one("PRAGMA freelist_count", ())
        size = self._one("PRAGMA page_size", ())
        return (int(pages[0]) - int(free[0])) * int(size[0])

    # -- writing ----------------------------------------------------------------------------------

    def commit(self, changes: Changelog, joiner: bytes, caller: bytes) -> CommitStats:
        """Apply ``changes`` and store both states, in one transaction; count a generation."""
        db = self._db
        enc = _IMP_ENC.encode
        blobs = list(map(enc, changes.imps))
        imp_rows = [
            (imp.imp_id - _SHIFT, imp.ts_ms, b) for imp, b in zip(changes.imps, blobs, strict=True)
        ]
        entry_rows = [
            (m, imp.imp_id - _SHIFT, anchor, conversion, status, expiry, imp.ts_ms, enc(imp))
            for m, anchor, conversion, status, expiry, imp in changes.entries
        ]
        written = len(imp_rows) + len(entry_rows)
        size = len(joiner) + len(caller) + 16 * len(changes.gone)
        size += 16 * len(imp_rows) + sum(map(len, blobs))
        size += sum(56 + len(e[7]) for e in entry_rows)
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                generation = self.generation() + 1
                for table in _UNDO_TABLES:
                    db.execute(f"DELETE FROM {table}")
                if self.undo:
                    self._keep_undo(changes, imp_rows, entry_rows)
                deleted = db.execute(
                    "DELETE FROM imps WHERE ts < ?", (_clamp(changes.imps_below),)
                ).rowcount
                for model, below in changes.expired:
                    deleted += db.execute(
                        "DELETE FROM entries WHERE model = ? AND expiry < ?",
                        (model, _clamp(below)),
                    ).rowcount
                for model, iid in changes.gone:
                    deleted += db.execute(
                        "DELETE FROM entries WHERE model = ? AND iid = ?", (model, iid - _SHIFT)
                    ).rowcount
                db.executemany("INSERT OR REPLACE INTO imps VALUES (?, ?, ?)", imp_rows)
                db.executemany(
                    "INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?)", entry_rows
                )
                db.executemany(
                    "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                    [("generation", generation), ("joiner", joiner), ("caller", caller)],
                )
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise CheckpointError(f"join store {self.path}: commit failed ({exc})") from exc
        return CommitStats(generation, written, deleted, size)

    def _keep_undo(
        self,
        changes: Changelog,
        imp_rows: list[tuple[int, int, bytes]],
        entry_rows: list[tuple[int, int, int, int, int, int | None, int, bytes]],
    ) -> None:
        """Inside a commit, before it changes anything: what :meth:`roll_back` puts back."""
        db = self._db
        db.execute(
            "INSERT INTO undo_meta SELECT key, value FROM meta WHERE key IN (?, ?, ?)", _STATE_KEYS
        )
        db.executemany("INSERT OR IGNORE INTO undo_imp_keys VALUES (?)", [r[:1] for r in imp_rows])
        db.execute(
            "INSERT OR IGNORE INTO undo_imps SELECT * FROM imps WHERE ts < ? "
            "OR iid IN (SELECT iid FROM undo_imp_keys)",
            (_clamp(changes.imps_below),),
        )
        db.executemany(
            "INSERT OR IGNORE INTO undo_entry_keys VALUES (?, ?)", [r[:2] for r in entry_rows]
        )
        for model, below in changes.expired:
            db.execute(
                "INSERT OR IGNORE INTO undo_entries SELECT * FROM entries "
                "WHERE model = ? AND expiry < ?",
                (model, _clamp(below)),
            )
        db.executemany(
            "INSERT OR IGNORE INTO undo_entries SELECT * FROM entries WHERE model = ? AND iid = ?",
            [(model, iid - _SHIFT) for model, iid in changes.gone],
        )
        db.execute(
            "INSERT OR IGNORE INTO undo_entries SELECT e.* FROM entries e JOIN undo_entry_keys k "
            "ON e.model = k.model AND e.iid = k.iid"
        )

    def can_roll_back(self) -> bool:
        """Whether the last commit kept what :meth:`roll_back` needs."""
        row = self._one("SELECT value FROM undo_meta WHERE key = 'generation'", ())
        return row is not None and row[0] == self.generation() - 1

    def roll_back(self) -> int:
        """Return to the generation before the last commit (once); returns that generation.

        Raises :class:`CheckpointError` when the last commit kept nothing to roll back with.
        """
        if not self.can_roll_back():
            raise CheckpointError(
                f"join store {self.path}: expected the last commit to be reversible (a store "
                f"kept with undo, one generation back at most), got none to undo at generation "
                f"{self.generation()}"
            )
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("DELETE FROM imps WHERE iid IN (SELECT iid FROM undo_imp_keys)")
                db.execute("INSERT OR REPLACE INTO imps SELECT * FROM undo_imps")
                db.execute(
                    "DELETE FROM entries WHERE (model, iid) IN "
                    "(SELECT model, iid FROM undo_entry_keys)"
                )
                db.execute("INSERT OR REPLACE INTO entries SELECT * FROM undo_entries")
                db.execute("DELETE FROM meta WHERE key IN (?, ?, ?)", _STATE_KEYS)
                db.execute("INSERT INTO meta SELECT key, value FROM undo_meta")
                for table in _UNDO_TABLES:
                    db.execute(f"DELETE FROM {table}")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise CheckpointError(f"join store {self.path}: roll back failed ({exc})") from exc
        return self.generation()

    # -- helpers ----------------------------------------------------------------------------------

    def _meta(self, key: str) -> Any:
        row = self._one("SELECT value FROM meta WHERE key = ?", (key,))
        return None if row is None else row[0]

    def _one(self, sql: str, args: tuple[Any, ...]) -> Any:
        try:
            return self._db.execute(sql, args).fetchone()
        except sqlite3.Error as exc:
            raise CheckpointError(f"join store {self.path}: read failed ({exc})") from exc

    def _all(self, sql: str, args: tuple[Any, ...]) -> list[Any]:
        try:
            return self._db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise CheckpointError(f"join store {self.path}: read failed ({exc})") from exc

    def _impression(self, blob: bytes, iid: int) -> Impression:
        where = f"join store {self.path}: impression {iid}"
        try:
            doc = _IMP_DEC.decode(blob)
        except msgspec.DecodeError as exc:
            raise CheckpointError(f"{where}: undecodable ({exc})") from exc
        if not isinstance(doc, dict) or doc.pop("type", None) != "impression":
            raise CheckpointError(
                f"{where}: expected an impression record, got {type(doc).__name__}"
            )
        try:
            imp = Impression(**doc)
        except TypeError as exc:
            raise CheckpointError(f"{where}: expected an impression record ({exc})") from exc
        if imp.imp_id != iid:
            raise CheckpointError(f"{where}: expected that id in its record, got {imp.imp_id}")
        return imp


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")  # a commit is a checkpoint: durable once it returns
    return db


_INT64 = (1 << 63) - 1


def _clamp(t: int) -> int:
    """A time bound within SQLite's integers (the join's sentinels fit; this is a guard)."""
    return max(-_INT64, min(_INT64, t))
