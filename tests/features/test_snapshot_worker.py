from __future__ import annotations

import gc
import os
import signal
import time

import numpy as np
import pytest
from features_helpers import T0, SilentS3, random_features

from minutely.features import SnapshotWriter, arrow_schema
from minutely.features.worker import ReplicaError, ReplicaProcess
from minutely.schema import Schema


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _pid(proc: ReplicaProcess) -> int:
    pid = proc.pid
    assert pid is not None
    return pid


def test_a_child_answers_reads_and_stops_when_closed(
    schema: Schema, replicas: tuple[str, str]
) -> None:
    with SnapshotWriter(schema, replicas) as writer:
        writer.write(np.arange(3), T0, random_features(schema, 3, 0))
    proc = ReplicaProcess(replicas[0], {}, arrow_schema(schema), "test")
    paths, data, problem = proc.call(
        5, "read_timeout_s=5 s", "read", "bucket", T0 // 3_600_000, frozenset(), True
    )
    assert len(paths) == 1
    assert data.column("request_id").to_pylist() == [0, 1, 2]
    assert problem is None
    pid = _pid(proc)
    proc.close()
    assert not _alive(pid)


def test_a_child_that_dies_is_reported_and_started_again(
    schema: Schema, replicas: tuple[str, str]
) -> None:
    with SnapshotWriter(schema, replicas) as writer:
        writer.write(np.arange(3), T0, random_features(schema, 3, 0))
    proc = ReplicaProcess(replicas[0], {}, arrow_schema(schema), "test")
    try:
        proc.wait_ready()
        os.kill(_pid(proc), signal.SIGKILL)
        time.sleep(0.2)
        proc.send("check")  # the dead child is noticed and a fresh one takes the request
        assert proc.restarts == 1
        assert proc.receive(5, "read_timeout_s=5 s") >= 0
        proc.send("check")
        os.kill(_pid(proc), signal.SIGKILL)
        with pytest.raises(ReplicaError, match=r"its worker process died \(killed by signal 9\)$"):
            proc.receive(5, "read_timeout_s=5 s")
    finally:
        proc.close()


def test_a_silent_store_times_out_and_its_child_is_killed(
    schema: Schema, silent_s3: SilentS3
) -> None:
    proc = ReplicaProcess("s3://snapshots/table", silent_s3.options(), arrow_schema(schema), "t")
    try:
        proc.send("check")
        pid = _pid(proc)
        with pytest.raises(
            ReplicaError,
            match=r"^s3://snapshots/table: it has not answered its previous call after 0\.\d s$",
        ):
            proc.send("check")  # one request at a time
        start = time.perf_counter()
        with pytest.raises(
            ReplicaError, match=r"no answer within read_timeout_s=0\.3 s \(waited 0\.\d\d s\)"
        ):
            proc.receive(0.3, "read_timeout_s=0.3 s")
        assert time.perf_counter() - start < 1.0
        assert not _alive(pid)
        assert not proc.busy
    finally:
        proc.close()


def test_an_error_in_the_child_is_its_answer(schema: Schema, tmp_path: object) -> None:
    proc = ReplicaProcess(str(tmp_path), {}, arrow_schema(schema), "test")
    try:
        with pytest.raises(ReplicaError, match=r"FileNotFoundError: no Delta table at "):
            proc.call(5, "read_timeout_s=5 s", "check")
        with pytest.raises(ReplicaError, match=r"unknown request 'nap'"):
            proc.call(5, "read_timeout_s=5 s", "nap")
        with pytest.raises(ReplicaError, match=r"no request awaits an answer"):
            proc.receive(1, "read_timeout_s=1 s")
    finally:
        proc.close()


def test_a_handle_dropped_without_closing_takes_its_child_with_it(schema: Schema) -> None:
    proc = ReplicaProcess("/nowhere", {}, arrow_schema(schema), "test")
    proc.wait_ready()
    pid = _pid(proc)
    del proc
    gc.collect()
    assert not _alive(pid)
