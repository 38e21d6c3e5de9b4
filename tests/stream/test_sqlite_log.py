"""What the SQLite backend adds to the log contract: its file, its transactions, its errors."""

from __future__ import annotations

import dataclasses
import multiprocessing
import re
import sqlite3
import threading
import time
from multiprocessing.synchronize import Barrier, Event
from pathlib import Path
from typing import Any

import pytest

from minutely.errors import StreamError
from minutely.stream import Record, SqliteLog, TopicReader
from minutely.stream import sqlite as sqlite_module


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
    assert "headers BLOB" in ddl


def test_empty_headers_take_no_space(path: Path) -> None:
    with SqliteLog(path) as log:
        log.create_topic("events", 1)
        log.append("events", [(None, b"a", 1), (None, b"b", 2, ()), (None, b"c", 3, (("h", b""),))])
    raw = sqlite3.connect(path)
    try:
        stored = [h for (h,) in raw.execute("SELECT headers FROM records ORDER BY off")]
    finally:
        raw.close()
    assert stored[:2] == [None, None]
    assert isinstance(stored[2], bytes)


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


def test_file_of_a_newer_schema_version_is_refused(path: Path) -> None:
    raw = sqlite3.connect(path)
    raw.execute("PRAGMA user_version = 7")
    raw.close()
    with pytest.raises(
        StreamError,
        match=rf"{re.escape(str(path))}: schema version 7, expected 2 .*a newer minutely",
    ):
        SqliteLog(path)


def test_file_of_the_first_schema_version_is_refused_naming_both_versions(path: Path) -> None:
    # What version 1 wrote: records without headers, no group tables.
    raw = sqlite3.connect(path)
    raw.executescript(
        "CREATE TABLE topics (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE,"
        " partitions INTEGER NOT NULL);"
        "CREATE TABLE records (topic_id INTEGER NOT NULL, part INTEGER NOT NULL,"
        " off INTEGER NOT NULL, key BLOB, value BLOB NOT NULL, ts_ms INTEGER NOT NULL,"
        " PRIMARY KEY (topic_id, part, off)) WITHOUT ROWID;"
        "PRAGMA user_version = 1;"
    )
    raw.close()
    with pytest.raises(
        StreamError,
        match=rf"{re.escape(str(path))}: schema version 1, expected 2 .*an older minutely",
    ):
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
        ((None, "text", 1), r"must be .*got \(NoneType, str, int\)"),
        (("key", b"v", 1), r"must be .*got \(str, bytes, int\)"),
        ((None, b"v", 1.5), r"must be .*got \(NoneType, bytes, float\)"),
        ((None, b"v", 1.5, ()), r"must be .*got \(NoneType, bytes, float\)"),
        ((None, b"v"), r"must be a \(key, value, ts_ms\[, headers\]\) tuple, got \(None, b'v'\)"),
        (
            [None, b"v", 1],
            r"must be a \(key, value, ts_ms\[, headers\]\) tuple, got \[None, b'v', 1\]",
        ),
        (
            (None, b"v", 1, [("h", b"")]),
            r"headers must be a tuple of \(str, bytes\) pairs, got list",
        ),
        (
            (None, b"v", 1, (("h", b"x"), ("h", "x"))),
            r"header 1 must be a \(str, bytes\) pair, got \('h', 'x'\)",
        ),
        (
            (None, b"v", 1, ((b"h", b"x"),)),
            r"header 0 must be a \(str, bytes\) pair, got \(b'h', b'x'\)",
        ),
    ],
)
def test_messages_of_the_wrong_types_are_refused(path: Path, message: Any, got: str) -> None:
    with SqliteLog(path) as log:
        log.create_topic("events", 1)
        with pytest.raises(StreamError, match=r"'events': message 1 " + got):
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


def test_read_records_are_the_records_their_constructor_builds(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with SqliteLog(path) as log:
        log.create_topic("events", 2)
        log.append("events", [(b"k", b"a", 5, (("h", b"1"),)), (None, b"b", 6)], partition=1)
        got = log.read("events", 1, 0, 10)
        assert got == [
            Record("events", 1, 0, b"k", b"a", 5, (("h", b"1"),)),
            Record("events", 1, 1, None, b"b", 6, ()),
        ]
        assert hash(got[1]) == hash(Record("events", 1, 1, None, b"b", 6, ()))
        with pytest.raises(dataclasses.FrozenInstanceError):
            got[0].value = b"x"  # type: ignore[misc]
        # A Record without slots would be built by its constructor, to the same records.
        monkeypatch.setattr(sqlite_module, "_SETTERS", None)
        assert log.read("events", 1, 0, 10) == got


def test_headers_that_do_not_decode_name_the_record(path: Path) -> None:
    with SqliteLog(path) as log:
        log.create_topic("events", 2)
        log.append("events", [(None, b"a", 1, (("h", b"x"),))], partition=1)
        raw = sqlite3.connect(path)
        raw.execute("UPDATE records SET headers = x'c1'")
        raw.commit()
        raw.close()
        with pytest.raises(
            StreamError,
            match=r"topic 'events' partition 1 offset 0: headers are not a msgpack array",
        ):
            log.read("events", 1, 0, 10)


@pytest.mark.parametrize("bad", [0, -1.5, True, "10"])
def test_session_timeout_must_be_a_positive_number(path: Path, bad: Any) -> None:
    with pytest.raises(
        StreamError, match=rf"{re.escape(str(path))}: session_timeout_s must be a number > 0"
    ):
        SqliteLog(path, session_timeout_s=bad)


def test_gaps_in_the_offsets_are_skipped_by_every_reader(path: Path) -> None:
    # Nothing may assume dense offsets: remove records as compaction would and read around them.
    with SqliteLog(path) as log:
        log.create_topic("events", 2)
        log.append("events", [(None, f"v{i}".encode(), i) for i in range(6)], partition=0)
        log.append("events", [(None, b"w", 3)], partition=1)
        raw = sqlite3.connect(path)
        raw.execute("DELETE FROM records WHERE part = 0 AND off IN (1, 2, 5)")
        raw.commit()
        raw.close()
        assert [r.offset for r in log.read("events", 0, 1, 10)] == [3, 4]
        assert log.end_offset("events", 0) == 5
        consumer = log.consumer("events")
        consumer.assign({0: 0})
        assert [r.offset for r in consumer.poll(2)] == [0, 3]
        assert consumer.positions() == {0: 4}
        assert [r.offset for r in consumer.poll(10)] == [4]
        reader = TopicReader(log, "events")
        assert [(r.partition, r.offset) for r in reader.read_until(4)] == [(0, 0), (0, 3), (1, 0)]
        assert reader.positions() == {0: 4, 1: 1}
        assert [r.offset for r in reader.poll(10)] == [4]
        assert reader.lag() == 0


# --- several processes ------------------------------------------------------------------------

_MP = multiprocessing.get_context("spawn")
_PROC_TIMEOUT_S = 60.0


def _append_worker(path: Path, writer: int, batches: int, size: int, start: Barrier) -> None:
    with SqliteLog(path) as log:
        start.wait(_PROC_TIMEOUT_S)
        for b in range(batches):
            log.append("events", [(None, f"{writer}:{b}:{i}".encode(), b) for i in range(size)])
            time.sleep(0.001)  # a writer that never pauses would hold the file lock turn after turn


@pytest.mark.integration
def test_batches_of_writer_processes_land_whole_in_dense_offsets(path: Path) -> None:
    writers, batches, size = 2, 30, 40
    with SqliteLog(path) as log:
        log.create_topic("events", 1)
        start = _MP.Barrier(writers)
        procs = [
            _MP.Process(target=_append_worker, args=(path, w, batches, size, start))
            for w in range(writers)
        ]
        try:
            for p in procs:
                p.start()
            for p in procs:
                p.join(_PROC_TIMEOUT_S)
            assert [p.exitcode for p in procs] == [0] * writers
            records = log.read("events", 0, 0, 10_000)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
    assert [r.offset for r in records] == list(range(writers * batches * size))
    values = [r.value.decode() for r in records]
    # Each batch is one block of consecutive offsets: SQLite batches are atomic.
    for i in range(0, len(values), size):
        writer, batch, _ = values[i].split(":")
        assert values[i : i + size] == [f"{writer}:{batch}:{j}" for j in range(size)]


def _torn_worker(path: Path, total: int, size: int, ready: Event, out: Any) -> None:
    with SqliteLog(path) as log:
        ready.set()
        torn = seen = 0
        deadline = time.monotonic() + _PROC_TIMEOUT_S
        while seen < total and time.monotonic() < deadline:
            end = log.end_offset("events", 0)
            torn += end % size != 0  # a batch visible in part
            seen = end
            time.sleep(0.001)
        out.put((seen, torn))


@pytest.mark.integration
def test_a_reader_process_never_sees_part_of_a_batch(path: Path) -> None:
    batches, size = 60, 20
    with SqliteLog(path) as log:
        log.create_topic("events", 1)
        ready, out = _MP.Event(), _MP.Queue()
        reader = _MP.Process(target=_torn_worker, args=(path, batches * size, size, ready, out))
        try:
            reader.start()
            assert ready.wait(_PROC_TIMEOUT_S)
            for b in range(batches):
                log.append("events", [(None, f"{b}:{i}".encode(), b) for i in range(size)])
                time.sleep(0.001)
            seen, torn = out.get(timeout=_PROC_TIMEOUT_S)
            reader.join(_PROC_TIMEOUT_S)
        finally:
            if reader.is_alive():
                reader.kill()
    assert reader.exitcode == 0
    assert (seen, torn) == (batches * size, 0)
