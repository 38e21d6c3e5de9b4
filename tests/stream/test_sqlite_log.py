"""What the SQLite backend adds to the log contract: its file, its transactions, its errors."""

from __future__ import annotations

import re
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from minutely.errors import StreamError
from minutely.stream import SqliteLog


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "log.sqlite"


def test_file_is_in_wal_mode_with_records_keyed_by_topic_partition_offset(path: Path) -> None:
    with SqliteLog(path) as log:
        log.create_topic("events", 1)
    raw = sqlite3.connect(path)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        (ddl,) = raw.execute("SELECT sql FROM sqlite_master WHERE name = 'records'").fetchone()
    finally:
        raw.close()
    assert "PRIMARY KEY (topic_id, part, off)" in ddl
    assert "WITHOUT ROWID" in ddl


def test_context_manager_closes_and_closed_log_refuses_calls(path: Path) -> None:
    with SqliteLog(path) as log:
        log.create_topic("events", 1)
    assert "closed" in repr(log)
    with pytest.raises(StreamError, match=rf"{re.escape(str(path))}.*'events'.*closed"):
        log.append("events", [(None, b"v", 1)])
    with pytest.raises(StreamError, match="closed"):
        log.create_topic("other", 1)
    log.close()  # idempotent


def test_missing_folder_is_unopenable(tmp_path: Path) -> None:
    bad = tmp_path / "no" / "such" / "log.sqlite"
    with pytest.raises(StreamError, match=rf"{re.escape(str(bad))}: cannot open the file"):
        SqliteLog(bad)


def test_folder_is_unopenable(tmp_path: Path) -> None:
    with pytest.raises(StreamError, match=rf"{re.escape(str(tmp_path))}: cannot open the file"):
        SqliteLog(tmp_path)


def test_file_that_is_not_a_database_is_unopenable(path: Path) -> None:
    path.write_bytes(b"this is not a database file at all" * 200)
    with pytest.raises(StreamError, match=rf"{re.escape(str(path))}: cannot open.*not a database"):
        SqliteLog(path)


def test_file_of_another_schema_version_is_refused(path: Path) -> None:
    raw = sqlite3.connect(path)
    raw.execute("PRAGMA user_version = 7")
    raw.close()
    with pytest.raises(StreamError, match=r"schema version 7, expected 1"):
        SqliteLog(path)


def test_failure_inside_a_batch_rolls_the_whole_batch_back(path: Path) -> None:
    with SqliteLog(path) as log:
        log.create_topic("events", 1)
        log.append("events", [(None, b"ok", 1)])
        raw = sqlite3.connect(path)
        raw.execute(
            "CREATE TRIGGER poison BEFORE INSERT ON records WHEN NEW.value = x'ff' "
            "BEGIN SELECT RAISE(ABORT, 'poisoned record'); END"
        )
        raw.commit()
        raw.close()
        batch: list[tuple[bytes | None, bytes, int]] = [(None, b"a", 2), (None, b"b", 3)]
        with pytest.raises(
            StreamError,
            match=rf"{re.escape(str(path))}: append 3 records to topic 'events'.*"
            "poisoned record",
        ):
            log.append("events", [*batch, (None, b"\xff", 4)])
        assert log.end_offset("events", 0) == 1
        assert log.append("events", batch) == [(0, 1), (0, 2)]
        assert [r.value for r in log.read("events", 0, 0, 10)] == [b"ok", b"a", b"b"]


def test_a_writer_that_holds_the_file_too_long_times_out_the_append(path: Path) -> None:
    with SqliteLog(path, timeout_s=0.05) as log:
        log.create_topic("events", 1)
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(
                StreamError, match=r"append 1 records to topic 'events' failed: database is locked"
            ):
                log.append("events", [(None, b"v", 1)])
            assert log.end_offset("events", 0) == 0  # readers are not blocked by the writer
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert log.append("events", [(None, b"v", 1)]) == [(0, 0)]


def test_sqlite_errors_on_read_name_the_topic_partition_and_offset(path: Path) -> None:
    with SqliteLog(path) as log:
        log.create_topic("events", 2)
        raw = sqlite3.connect(path)
        raw.execute("DROP TABLE records")
        raw.commit()
        raw.close()
        with pytest.raises(
            StreamError,
            match=r"read topic 'events' partition 1 at offset 0 failed: no such table: records",
        ):
            log.read("events", 1, 0, 10)
        with pytest.raises(StreamError, match=r"end offset of topic 'events' partition 0 failed"):
            log.end_offset("events", 0)


@pytest.mark.parametrize(
    ("message", "got"),
    [
        ((None, "text", 1), r"\(NoneType, str, int\)"),
        (("key", b"v", 1), r"\(str, bytes, int\)"),
        ((None, b"v", 1.5), r"\(NoneType, bytes, float\)"),
    ],
)
def test_messages_of_the_wrong_types_are_refused(path: Path, message: Any, got: str) -> None:
    with SqliteLog(path) as log:
        log.create_topic("events", 1)
        with pytest.raises(StreamError, match=r"'events': message 1 must be .*got " + got):
            log.append("events", [(None, b"fine", 1), message])
        assert log.end_offset("events", 0) == 0


def test_bad_arguments_are_refused_with_what_was_expected(path: Path) -> None:
    with SqliteLog(path) as log:
        log.create_topic("events", 1)
        with pytest.raises(StreamError, match=r"topic name must be a non-empty string, got ''"):
            log.create_topic("", 1)
        with pytest.raises(StreamError, match=r"max_records must be an int >= 0, got -1"):
            log.read("events", 0, 0, -1)
        bad_offset: Any = 1.0
        with pytest.raises(StreamError, match=r"offset must be an int, got 1.0"):
            log.read("events", 0, bad_offset, 1)
        bad_partition: Any = True
        with pytest.raises(StreamError, match=r"partitions 0\.\.0, got partition True"):
            log.end_offset("events", bad_partition)


def test_threads_may_share_one_log(path: Path) -> None:
    with SqliteLog(path) as log:
        log.create_topic("events", 1)

        def write(tag: str) -> None:
            for b in range(20):
                log.append("events", [(None, f"{tag}{b}:{i}".encode(), b) for i in range(10)])

        threads = [threading.Thread(target=write, args=(t,)) for t in "ab"]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        records = log.read("events", 0, 0, 1_000)
    assert [r.offset for r in records] == list(range(400))
    assert len({r.value for r in records}) == 400
