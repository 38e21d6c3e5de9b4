"""Appending feature snapshots to both replicas.

The contract a producer relies on:

* :meth:`SnapshotWriter.write` returns once the batch is committed on at least one replica, in
  one Delta commit per replica; only then may the producer publish the impressions of the batch.
* A replica that fails (an error, no answer within ``write_timeout_s``, its table gone) does not
  stop the producer: the writer keeps the batches it missed in memory and commits them, with the
  next batch, in one commit as soon as it answers again. While the other replica is up, a
  replica that is down is tried again at most every ``retry_s`` (``features.failback_check_s``),
  so a hung replica does not hold every write for ``write_timeout_s``;
  :meth:`SnapshotWriter.catch_up` tries at once. The failure and the recovery are logged as one
  WARNING each.
* When neither replica commits, ``write`` raises :class:`~minutely.errors.StorageError` naming
  both replicas and their causes, and keeps nothing of the batch: the producer must not publish
  those impressions (it may pass the same batch again).
* A replica may miss at most ``max_backlog_rows`` rows: a batch that would take it beyond is
  first committed there, alone with the backlog, and when that fails ``write`` raises a
  ``StorageError`` naming that replica and writes nothing anywhere. Divergence between the
  replicas is therefore bounded, and a producer stops rather than lose the second copy.

Rows kept for a down replica are lost when the writer's process ends before the replica comes
back; the reader looks for an id on the other replica before it reports it missing. A commit
that did not answer in time may still land later, and its rows are then committed a second
time with the backlog; readers keep the first row of a request id.

Each write is one commit and one data file per hourly bucket on each replica, and delta-rs
spends longer on a commit the more files the table holds, so a producer writes batches of
thousands of rows (a simulated minute or more), not one request at a time.

Tables are created, when they do not exist, when the writer starts (or, for a replica that was
down then, before its first commit); a table that disappears later is a failure of its replica
and is never created again by the writer, which would hide the loss of its rows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pyarrow as pa
from numpy.typing import NDArray

from minutely.config import FeaturesConfig
from minutely.errors import SchemaError, StorageError
from minutely.features.table import (
    BUCKET,
    Replica,
    arrow_schema,
    resolve_replicas,
    snapshot_table,
)
from minutely.features.worker import ReplicaError, ReplicaProcess
from minutely.schema import Schema

logger = logging.getLogger("minutely.features")


@dataclass(frozen=True)
class WriteResult:
    """What one :meth:`SnapshotWriter.write` did: ``rows`` written, the replicas that committed
    them, and for each replica that is behind, how many rows it misses."""

    rows: int
    committed: tuple[str, ...]
    lagging: Mapping[str, int]


class SnapshotWriter:
    """Appends snapshots of request features to the primary and the secondary table.

    ``replicas`` are two :class:`~minutely.features.table.Replica` (or URLs/absolute paths).
    Starting creates the tables that do not exist and checks the columns of those that do; an
    existing table with other columns is a :class:`~minutely.errors.SchemaError` naming it, and
    a start where neither replica answers is a :class:`~minutely.errors.StorageError`. See the
    module documentation for the contract of :meth:`write`. Not thread-safe: one producer
    thread calls it.
    """

    def __init__(
        self,
        schema: Schema,
        replicas: Sequence[Replica | str],
        *,
        write_timeout_s: float = 30.0,
        max_backlog_rows: int = 1_000_000,
        retry_s: float = 30.0,
    ) -> None:
        reps = [r if isinstance(r, Replica) else Replica(r) for r in replicas]
        if len(reps) != 2 or reps[0].url == reps[1].url:
            raise StorageError(
                "feature snapshot writer: expected 2 different replicas, got "
                f"{[r.url for r in reps]}"
            )
        if not write_timeout_s > 0:
            raise ValueError(f"write_timeout_s: expected > 0, got {write_timeout_s!r}")
        if max_backlog_rows < 1:
            raise ValueError(f"max_backlog_rows: expected >= 1, got {max_backlog_rows!r}")
        if not retry_s >= 0:
            raise ValueError(f"retry_s: expected >= 0, got {retry_s!r}")
        self.schema = schema
        self.replicas: tuple[Replica, Replica] = (reps[0], reps[1])
        self.write_timeout_s = float(write_timeout_s)
        self._write_limit = f"write_timeout_s={self.write_timeout_s:g} s"
        self.max_backlog_rows = int(max_backlog_rows)
        self.retry_s = float(retry_s)
        self._arrow = arrow_schema(schema)
        self._create = ([BUCKET], f"minutely feature snapshots, schema {schema.fingerprint()}")
        self._procs = [
            ReplicaProcess(r.url, r.storage_options, self._arrow, f"writer-{i}")
            for i, r in enumerate(reps)
        ]
        self._opened = [False, False]  # whether the replica's table was checked or created
        self._backlog: list[list[pa.Table]] = [[], []]
        self._backlog_rows = [0, 0]
        self._down: list[str | None] = [None, None]  # why each replica is down
        self._retry_at = [0.0, 0.0]  # when a replica that is down is tried again
        self._commits = [0, 0]
        self._failures = [0, 0]
        self._rows = 0
        self._closed = False
        self._start()

    @classmethod
    def from_config(cls, schema: Schema, cfg: FeaturesConfig, run_dir: Path) -> SnapshotWriter:
        """A writer for the replicas of ``cfg`` (relative paths inside ``run_dir``)."""
        return cls(
            schema,
            resolve_replicas(cfg, run_dir),
            write_timeout_s=cfg.write_timeout_s,
            max_backlog_rows=cfg.max_backlog_rows,
            retry_s=cfg.failback_check_s,
        )

    # --- start --------------------------------------------------------------------------------

    def _start(self) -> None:
        sent = {i: self._send(i, "ensure", *self._create) for i in (0, 1)}
        failures = self._wait(sent)
        mismatched = [f for f in failures.values() if f.mismatch]
        if mismatched or len(failures) == 2:
            self.close(catch_up=False)
        if mismatched:
            raise SchemaError(
                f"feature replica {mismatched[0].url}: expected a snapshot table for this "
                f"schema, got {mismatched[0].cause}"
            )
        if len(failures) == 2:
            raise StorageError(
                "feature snapshot writer: expected at least one replica to answer, got "
                + "; ".join(f"{f.url}: {f.cause}" for f in failures.values())
            )
        for i in (0, 1):
            if i in failures:
                self._mark_down(i, failures[i].cause)
            else:
                self._opened[i] = True

    # --- writing ------------------------------------------------------------------------------

    def write(
        self,
        request_ids: NDArray[np.integer[Any]] | Sequence[int] | pa.Array,
        ts_ms: NDArray[np.integer[Any]] | Sequence[int] | pa.Array | int,
        features: Mapping[str, Any],
    ) -> WriteResult:
        """Append one batch of snapshots: one row per request id (ids distinct within a batch).

        ``features`` holds one column per feature of the schema (see
        :func:`~minutely.features.table.snapshot_table`; a bad column is a
        :class:`~minutely.errors.SchemaError` and nothing is written). Returns once at least
        one replica committed; raises :class:`~minutely.errors.StorageError` when none did.
        """
        if self._closed:
            raise StorageError("feature snapshot writer: expected an open writer, got a closed one")
        batch = snapshot_table(self.schema, request_ids, ts_ms, features)
        if batch.num_rows == 0:
            return WriteResult(0, (), self._lagging())
        committed: list[int] = []
        causes: dict[int, str] = {}
        # A replica about to miss too many rows must take the batch first, or nothing is written.
        for i in (0, 1):
            if self._backlog[i] and self._backlog_rows[i] + batch.num_rows > self.max_backlog_rows:
                failure = self._wait({i: self._send_append(i, batch)}).get(i)
                if failure is not None:
                    self._failures[i] += 1
                    raise StorageError(
                        f"feature replica {failure.url}: expected it to take the "
                        f"{self._backlog_rows[i]} rows it missed before it misses more than "
                        f"max_backlog_rows={self.max_backlog_rows}, got {failure.cause}; "
                        "nothing of this batch was written"
                    )
                committed.append(i)
        rest: dict[int, ReplicaError | None] = {}
        skipped: set[int] = set()
        now = time.monotonic()
        for i in (0, 1):
            if i in committed:
                continue
            down = self._down[i]
            other_up = self._down[1 - i] is None
            if down is not None and other_up and not self._retry_due(i, now):
                rest[i] = ReplicaError(self.replicas[i].url, down)
                skipped.add(i)
            else:
                if down is not None:
                    self._retry_at[i] = now + self.retry_s
                rest[i] = self._send_append(i, batch)
        for i, failure in self._wait(rest).items():
            causes[i] = failure.cause
        committed += [i for i in rest if i not in causes]
        for i in causes.keys() - skipped:
            self._failures[i] += 1
        if not committed:
            raise StorageError(
                f"feature snapshots: expected a replica to commit {batch.num_rows} rows, got "
                + "; ".join(f"{self.replicas[i].url}: {c}" for i, c in sorted(causes.items()))
                + "; the batch was not written"
            )
        self._rows += batch.num_rows
        for i in committed:
            self._committed(i)
        for i, cause in causes.items():
            self._backlog[i].append(batch)
            self._backlog_rows[i] += batch.num_rows
            self._mark_down(i, cause)
        return WriteResult(
            batch.num_rows,
            tuple(self.replicas[i].url for i in sorted(committed)),
            self._lagging(),
        )

    def catch_up(self) -> Mapping[str, int]:
        """Commit the rows a replica that was down missed, if it answers now; returns the rows
        each replica still misses."""
        for i in (0, 1):
            if not self._backlog[i]:
                continue
            empty = self._backlog[i][0].slice(0, 0)
            failure = self._wait({i: self._send_append(i, empty)}).get(i)
            if failure is None:
                self._committed(i)
            else:
                self._failures[i] += 1
        return self._lagging()

    def _committed(self, i: int) -> None:
        """Replica ``i`` committed a write, its backlog included: it is up and misses nothing."""
        self._commits[i] += 1
        if self._down[i] is not None:
            logger.warning(
                "feature snapshots: replica %s is back, committed %d rows it had missed",
                self.replicas[i].url,
                self._backlog_rows[i],
            )
        self._backlog[i].clear()
        self._backlog_rows[i] = 0
        self._down[i] = None

    def _send_append(self, i: int, batch: pa.Table) -> ReplicaError | None:
        data = pa.concat_tables([*self._backlog[i], batch]) if self._backlog[i] else batch
        create = None if self._opened[i] else self._create
        return self._send(i, "append", data, create)

    def _send(self, i: int, *request: object) -> ReplicaError | None:
        try:
            self._procs[i].send(*request)
        except ReplicaError as failure:
            return failure
        return None

    def _wait(self, sent: Mapping[int, ReplicaError | None]) -> dict[int, ReplicaError]:
        """The answers to the requests ``sent`` (waiting at most ``write_timeout_s`` for all of
        them together); returns the failures."""
        deadline = time.monotonic() + self.write_timeout_s
        failures: dict[int, ReplicaError] = {}
        for i, failure in sent.items():
            if failure is not None:
                failures[i] = failure
                continue
            try:
                self._procs[i].receive(deadline - time.monotonic(), self._write_limit)
            except ReplicaError as exc:
                failures[i] = exc
            else:
                self._opened[i] = True
        return failures

    def _retry_due(self, i: int, now: float) -> bool:
        """Whether replica ``i``, down, is due another try (its child process runs again)."""
        return now >= self._retry_at[i] and self._procs[i].running()

    def _mark_down(self, i: int, cause: str) -> None:
        if self._down[i] is None:
            self._retry_at[i] = time.monotonic() + self.retry_s
            logger.warning(
                "feature snapshots: replica %s failed (%s); writing to %s alone and keeping the "
                "rows it misses until it answers",
                self.replicas[i].url,
                cause,
                self.replicas[1 - i].url,
            )
        self._down[i] = cause

    def _lagging(self) -> dict[str, int]:
        return {
            self.replicas[i].url: self._backlog_rows[i] for i in (0, 1) if self._backlog_rows[i]
        }

    # --- state --------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters: rows written, commits and failures per replica, rows each replica misses
        and why it was last down."""
        return {
            "rows": self._rows,
            "commits": {r.url: self._commits[i] for i, r in enumerate(self.replicas)},
            "failures": {r.url: self._failures[i] for i, r in enumerate(self.replicas)},
            "lagging_rows": self._lagging(),
            "down": {r.url: self._down[i] for i, r in enumerate(self.replicas) if self._down[i]},
        }

    def close(self, *, catch_up: bool = True) -> None:
        """Try once more to commit what a replica missed (unless ``catch_up`` is false), then
        stop the replicas' worker processes. Rows a replica still misses are logged and
        dropped."""
        if self._closed:
            return
        if catch_up:
            lagging = self.catch_up()
            for url, rows in lagging.items():
                logger.warning(
                    "feature snapshots: closing with %d rows missing from replica %s", rows, url
                )
        self._closed = True
        for proc in self._procs:
            proc.close()

    def __enter__(self) -> SnapshotWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
