from __future__ import annotations

import logging
import os
import shutil
import time

import numpy as np
import pytest
from features_helpers import T0, SilentS3, random_features, table_rows

from minutely.errors import StorageError
from minutely.features import Replica, SnapshotReader, SnapshotWriter
from minutely.schema import Schema

MARGIN_S = 1.0  # scheduling slack on a busy machine, on top of the configured timeout
STEP_MS = 10 * 60_000  # each batch 10 minutes after the previous: a stream across buckets


def _switches(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "minutely.features" and "switched from" in r.getMessage()
    ]


class _Stream:
    """Batches written through a writer and read back through a reader, as a producer and the
    join would: each id is asked for until it is returned."""

    def __init__(self, schema: Schema, writer: SnapshotWriter, reader: SnapshotReader) -> None:
        self.schema, self.writer, self.reader = schema, writer, reader
        self.k = 0
        self.written: list[int] = []
        self.returned: list[int] = []
        self.outstanding: dict[int, int] = {}

    def produce(self) -> None:
        ids = np.arange(self.k * 100, self.k * 100 + 100, dtype=np.int64)
        ts = T0 + self.k * STEP_MS
        self.writer.write(ids, ts, random_features(self.schema, 100, seed=self.k))
        self.written += ids.tolist()
        self.outstanding.update(dict.fromkeys(ids.tolist(), ts))
        self.k += 1

    def consume(self) -> float:
        """One lookup of every outstanding id; the seconds it took."""
        ids = np.fromiter(self.outstanding, np.int64, len(self.outstanding))
        ts = np.fromiter(self.outstanding.values(), np.int64, len(self.outstanding))
        start = time.perf_counter()
        got = self.reader.get(ids, ts)
        took = time.perf_counter() - start
        assert got.missing == []
        assert got.malformed == {}
        for rid in got.ids.tolist():
            self.returned.append(rid)
            del self.outstanding[rid]
        return took


def test_a_primary_moved_away_fails_over_and_back_and_every_id_comes_back_once(
    schema: Schema, replicas: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="minutely.features")
    primary, secondary = replicas
    read_timeout_s = 2.0
    with (
        SnapshotWriter(schema, replicas, write_timeout_s=5, retry_s=0) as writer,
        SnapshotReader(
            schema,
            replicas,
            read_timeout_s=read_timeout_s,
            failback_check_s=0.05,
            missing_wait_s=600,
        ) as reader,
    ):
        stream = _Stream(schema, writer, reader)
        for _ in range(4):
            stream.produce()
            stream.consume()
        assert reader.current == primary
        assert stream.outstanding == {}

        os.rename(primary, primary + ".away")  # the primary fails
        stream.produce()
        assert writer.stats()["lagging_rows"] == {primary: 100}
        took = stream.consume()
        assert stream.outstanding == {}  # answered by the secondary in the same call
        assert reader.current == secondary
        assert reader.failovers == 1
        assert took < read_timeout_s + MARGIN_S
        for _ in range(3):  # while it is away: checks of the primary fail, reads stay
            time.sleep(0.06)
            stream.produce()
            stream.consume()
        assert reader.current == secondary
        assert reader.failbacks == 0
        assert "no Delta table" in str(reader.stats()["last_failure"])

        os.rename(primary + ".away", primary)  # it comes back
        stream.produce()  # the writer commits what it missed with this batch
        assert writer.stats()["lagging_rows"] == {}
        deadline = time.monotonic() + 10
        while reader.current != primary and time.monotonic() < deadline:
            time.sleep(0.06)
            stream.produce()
            stream.consume()
        assert reader.current == primary
        assert reader.failbacks == 1
        for _ in range(2):
            stream.produce()
            stream.consume()
        assert stream.outstanding == {}
        assert reader.stats()["missing"] == 0

    assert len(stream.returned) == len(set(stream.returned))  # no id twice
    assert sorted(stream.returned) == sorted(stream.written)  # and none lost
    assert table_rows(primary).equals(table_rows(secondary))  # the replicas agree again
    switches = _switches(caplog)
    assert len(switches) == 2
    assert switches[0].startswith(f"feature snapshots: switched from {primary} to {secondary} ")
    assert "(failover: FileNotFoundError: no Delta table at" in switches[0]
    assert switches[1].startswith(f"feature snapshots: switched from {secondary} to {primary} ")
    assert "(failback: the primary answered a check in" in switches[1]
    writer_lines = [r.getMessage() for r in caplog.records if "replica" in r.getMessage()]
    assert any(f"replica {primary} failed (" in line for line in writer_lines)
    assert any(f"replica {primary} is back, committed 400 rows" in line for line in writer_lines)


@pytest.mark.slow
def test_a_primary_that_never_answers_times_out_and_the_secondary_answers(
    schema: Schema,
    replicas: tuple[str, str],
    silent_s3: SilentS3,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="minutely.features")
    ids = np.arange(200)
    with SnapshotWriter(schema, replicas) as writer:
        writer.write(ids, T0, random_features(schema, 200, seed=0))
    hung = Replica("s3://snapshots/table", silent_s3.options())
    read_timeout_s = 0.5
    with SnapshotReader(
        schema, [hung, replicas[1]], read_timeout_s=read_timeout_s, failback_check_s=0.1
    ) as reader:
        start = time.perf_counter()
        got = reader.get(ids, T0)
        took = time.perf_counter() - start
        assert got.ids.tolist() == ids.tolist()
        assert read_timeout_s <= took < read_timeout_s + MARGIN_S
        assert silent_s3.connections >= 1  # the primary was asked, and kept silent
        assert reader.current == replicas[1]
        assert reader.failovers == 1
        (switch,) = _switches(caplog)
        assert switch == (
            f"feature snapshots: switched from s3://snapshots/table to {replicas[1]} (failover: "
            f"no answer within read_timeout_s=0.5 s (waited {switch.split('(waited ')[1]}"
        )
        # the primary stays silent: its checks time out, and lookups keep being answered
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            time.sleep(0.1)
            start = time.perf_counter()
            assert reader.get(ids[:10], T0).ids.tolist() == ids[:10].tolist()
            assert time.perf_counter() - start < read_timeout_s + MARGIN_S
        assert reader.current == replicas[1]
        assert reader.failbacks == 0
        assert "no answer within read_timeout_s=0.5 s" in str(reader.stats()["last_failure"])


def test_a_writer_goes_on_with_one_replica_silent_and_bounds_what_it_keeps(
    schema: Schema, replicas: tuple[str, str], silent_s3: SilentS3
) -> None:
    hung = Replica("s3://snapshots/table", silent_s3.options())
    writer = SnapshotWriter(
        schema, [hung, replicas[1]], write_timeout_s=0.5, max_backlog_rows=250, retry_s=60
    )
    try:
        assert "no answer within write_timeout_s=0.5 s" in writer.stats()["down"][hung.url]
        for k in range(2):  # skipped until its retry is due: no write waits for it
            start = time.perf_counter()
            result = writer.write(
                np.arange(k * 100, k * 100 + 100), T0, random_features(schema, 100, k)
            )
            assert time.perf_counter() - start < 0.5
            assert result.committed == (replicas[1],)
        assert writer.stats()["lagging_rows"] == {hung.url: 200}
        # a third batch would leave it 300 rows behind: it must take them first, and cannot
        with pytest.raises(
            StorageError,
            match=r"feature replica s3://snapshots/table: expected it to take the 200 rows it "
            r"missed before it misses more than max_backlog_rows=250, got no answer within "
            r"write_timeout_s=0\.5 s .*; nothing of this batch was written",
        ):
            writer.write(np.arange(200, 300), T0, random_features(schema, 100, 2))
        assert table_rows(replicas[1]).num_rows == 200
    finally:
        writer.close(catch_up=False)


def test_a_replica_down_at_start_gets_its_table_and_rows_when_it_comes(
    schema: Schema, replicas: tuple[str, str], tmp_path: object
) -> None:
    primary, secondary = replicas
    os.makedirs(os.path.dirname(primary), exist_ok=True)
    with open(primary, "w") as f:  # a file where the primary's folder should be
        f.write("in the way")
    with SnapshotWriter(schema, replicas, retry_s=0) as writer:
        assert primary in writer.stats()["down"]
        writer.write(np.arange(10), T0, random_features(schema, 10, 0))
        assert writer.stats()["lagging_rows"] == {primary: 10}
        os.remove(primary)
        result = writer.write(np.arange(10, 20), T0, random_features(schema, 10, 1))
        assert result.committed == replicas
        assert result.lagging == {}
    assert table_rows(primary).equals(table_rows(secondary))
    assert table_rows(primary).num_rows == 20


def test_a_lookup_with_both_replicas_gone_names_both_causes(
    schema: Schema, replicas: tuple[str, str]
) -> None:
    primary, secondary = replicas
    with SnapshotWriter(schema, replicas) as writer:
        writer.write(np.arange(5), T0, random_features(schema, 5, 0))
    shutil.rmtree(primary)
    os.rename(secondary, secondary + ".away")
    with (
        SnapshotReader(schema, replicas) as reader,
        pytest.raises(StorageError) as info,
    ):
        reader.get([1], T0)
    assert str(info.value) == (
        f"feature snapshots: expected a replica to answer, got {primary}: FileNotFoundError: "
        f"no Delta table at {primary}; {secondary}: FileNotFoundError: no Delta table at "
        f"{secondary}"
    )


def test_a_write_with_both_replicas_gone_names_both_and_keeps_nothing(
    schema: Schema, replicas: tuple[str, str]
) -> None:
    primary, secondary = replicas
    writer = SnapshotWriter(schema, replicas)
    try:
        shutil.rmtree(primary)
        shutil.rmtree(secondary)
        with pytest.raises(StorageError) as info:
            writer.write(np.arange(5), T0, random_features(schema, 5, 0))
        assert str(info.value) == (
            "feature snapshots: expected a replica to commit 5 rows, got "
            f"{primary}: FileNotFoundError: no Delta table at {primary}; "
            f"{secondary}: FileNotFoundError: no Delta table at {secondary}; "
            "the batch was not written"
        )
        stats = writer.stats()
        assert stats["rows"] == 0
        assert stats["lagging_rows"] == {}
        assert not os.path.exists(primary)  # a vanished table is never created again
    finally:
        writer.close(catch_up=False)


def test_a_writer_with_no_replica_answering_at_start_fails(
    schema: Schema, tmp_path: object
) -> None:
    files = [os.path.join(str(tmp_path), name) for name in ("a", "b")]
    for path in files:
        with open(path, "w") as f:
            f.write("in the way")
    with pytest.raises(StorageError) as info:
        SnapshotWriter(schema, [f + "/table" for f in files])
    message = str(info.value)
    assert message.startswith(
        "feature snapshot writer: expected at least one replica to answer, got "
    )
    assert f"{files[0]}/table: " in message
    assert f"{files[1]}/table: " in message
