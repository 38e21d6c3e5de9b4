"""Looking up feature snapshots by request id, with failover between the two replicas.

:meth:`SnapshotReader.get` resolves a batch of request ids at once. Each id is looked for in the
hourly bucket of its request time: a bucket is read from the table once and kept in memory (the
``cache_buckets`` most recently used), and point lookups are served from a sorted index of its
ids. An id that is not in its bucket makes the reader bring the table to its newest version and
read the bucket's new files (once per call); an id still absent is *pending*, and becomes
*missing* once ``missing_wait_s`` passed on the reader's clock since it was first asked for and
the other replica does not hold it either. The clock is the :class:`~minutely.clock.Clock` the
caller passes (the wall clock by default), so a replay measures the wait in replay time.

Failover: every read goes to the current replica and waits at most ``read_timeout_s`` for it (the
delta-rs call runs in the replica's worker process, see :mod:`minutely.features.worker`, which
is killed when it does not answer in time); on an error or a timeout the reader switches to the
other replica and repeats the read there, so a lookup fails only when both fail
(:class:`~minutely.errors.StorageError` naming both causes). While on the secondary, each call
starts a check of the primary every ``failback_check_s`` (without waiting for it); a later call
that finds the check answered within ``read_timeout_s`` switches back. Each switch is counted
and logged as one WARNING naming both replicas and the cause. Buckets hold rows read from
either replica; a request id keeps the first row read for it.

Rows that do not fit the schema (a null, a non-finite dense value, a table without a feature's
column or with another type) are not features: their ids come back in ``malformed`` with the
reason, for the caller to dead-letter.
"""

from __future__ import annotations

import gc
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numpy.typing import NDArray

from minutely.clock import Clock, WallClock
from minutely.config import FeaturesConfig
from minutely.errors import StorageError
from minutely.events import FeatureValue
from minutely.features.table import (
    BUCKET,
    BUCKET_MS,
    REQUEST_ID,
    Features,
    Replica,
    arrow_schema,
    resolve_replicas,
    table_to_features,
)
from minutely.features.worker import ReplicaError, ReplicaProcess
from minutely.schema import Schema

logger = logging.getLogger("minutely.features")

_EMPTY = np.zeros(0, dtype=np.int64)
_EXPECTED = {
    "sparse": "an int64 id",
    "multi_sparse": "a list of int64 ids",
    "dense": "a finite float32",
}


@dataclass(frozen=True, eq=False)
class Lookup:
    """The answer to one :meth:`SnapshotReader.get`.

    ``ids`` are the request ids found, in the order they were asked for (each once), and
    ``features`` their columns in the simulator's layout (see
    :data:`~minutely.features.table.Features`); ``found`` is the same as one feature dict per
    id. ``pending`` ids are not visible yet and should be asked for again; ``missing`` ids were
    absent for ``missing_wait_s`` on both replicas; ``malformed`` maps ids whose snapshot does
    not fit the schema to the reason.
    """

    schema: Schema
    ids: NDArray[np.int64]
    features: Features
    pending: list[int] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)
    malformed: dict[int, str] = field(default_factory=dict)

    @cached_property
    def found(self) -> dict[int, dict[str, FeatureValue]]:
        """``request id -> {feature name: value}`` (dense values are the stored float32)."""
        names = [f.name for f in self.schema.features]
        cols: list[list[Any]] = []
        for spec in self.schema.features:
            col = self.features[spec.name]
            if spec.kind == "multi_sparse":
                values, offsets = col[0].tolist(), col[1].tolist()
                cols.append(list(map(values.__getitem__, map(slice, offsets, offsets[1:]))))
            else:
                cols.append(col.tolist())
        enabled = gc.isenabled()
        gc.disable()  # many small acyclic dicts: the cycle collector would rescan them often
        try:
            rows = [dict(zip(names, vals, strict=True)) for vals in zip(*cols, strict=True)]
            return dict(zip(self.ids.tolist(), rows, strict=True))
        finally:
            if enabled:
                gc.enable()


@dataclass
class _Read:
    """What one replica returned for one bucket: the files read and their rows (only the
    request ids when ``problem`` says the table's columns do not fit)."""

    paths: list[str]
    data: pa.Table | None
    problem: str | None


class _Bucket:
    """The rows of one hourly bucket held in memory, indexed by request id (first row wins)."""

    def __init__(self) -> None:
        self.files: tuple[set[str], set[str]] = (set(), set())
        self._chunks: list[pa.Table] = []
        self._table: pa.Table | None = None
        self._ids = _EMPTY
        self._sorted = _EMPTY
        self._rows = _EMPTY
        self.malformed: dict[int, str] = {}

    @property
    def size(self) -> int:
        return len(self._ids) + len(self.malformed)

    @property
    def table(self) -> pa.Table:
        if self._table is None:
            self._table = pa.concat_tables(self._chunks).combine_chunks()
            self._chunks = [self._table]
        return self._table

    def add(self, good: pa.Table | None, malformed: dict[int, str]) -> None:
        if good is not None and good.num_rows:
            ids = np.asarray(good.column(REQUEST_ID).to_numpy(), dtype=np.int64)
            _, first = np.unique(ids, return_index=True)
            keep = np.zeros(len(ids), dtype=bool)
            keep[first] = True
            keep &= self.rows_of(ids) < 0
            if self.malformed:
                keep &= ~np.isin(ids, np.fromiter(self.malformed, np.int64, len(self.malformed)))
            if keep.any():
                if not keep.all():
                    good = good.filter(pa.array(keep))
                    ids = ids[keep]
                self._chunks.append(good)
                self._table = None
                self._ids = np.concatenate([self._ids, ids])
                order = np.argsort(self._ids, kind="stable")
                self._sorted = self._ids[order]
                self._rows = order
        if malformed:
            bad = np.fromiter(malformed, np.int64, len(malformed))
            for rid in bad[self.rows_of(bad) < 0].tolist():
                self.malformed.setdefault(rid, malformed[rid])

    def rows_of(self, ids: NDArray[np.int64]) -> NDArray[np.int64]:
        """The row of each id in :attr:`table`, -1 where it is absent."""
        if not len(self._sorted):
            return np.full(len(ids), -1, dtype=np.int64)
        pos = np.searchsorted(self._sorted, ids)
        pos_c = np.minimum(pos, len(self._sorted) - 1)
        hit = self._sorted[pos_c] == ids
        return np.where(hit, self._rows[pos_c], -1)


class SnapshotReader:
    """Batch lookups of feature snapshots on the primary replica, failing over to the
    secondary (see the module documentation). Not thread-safe: one caller thread uses it."""

    def __init__(
        self,
        schema: Schema,
        replicas: Sequence[Replica | str],
        *,
        read_timeout_s: float = 5.0,
        failback_check_s: float = 30.0,
        missing_wait_s: float = 300.0,
        cache_buckets: int = 4,
        clock: Clock | None = None,
    ) -> None:
        reps = [r if isinstance(r, Replica) else Replica(r) for r in replicas]
        if len(reps) != 2 or reps[0].url == reps[1].url:
            raise StorageError(
                "feature snapshot reader: expected 2 different replicas, got "
                f"{[r.url for r in reps]}"
            )
        for name, value, lo in (
            ("read_timeout_s", read_timeout_s, 1e-9),
            ("failback_check_s", failback_check_s, 1e-9),
            ("missing_wait_s", missing_wait_s, 0.0),
            ("cache_buckets", cache_buckets, 1),
        ):
            if not value >= lo:
                raise ValueError(f"{name}: expected >= {lo:g}, got {value!r}")
        self.schema = schema
        self.replicas: tuple[Replica, Replica] = (reps[0], reps[1])
        self.read_timeout_s = float(read_timeout_s)
        self._read_limit = f"read_timeout_s={self.read_timeout_s:g} s"
        self.failback_check_s = float(failback_check_s)
        self.missing_wait_s = float(missing_wait_s)
        self.cache_buckets = int(cache_buckets)
        self._clock: Clock = clock if clock is not None else WallClock()
        self._expected = arrow_schema(schema).remove(2).remove(1)  # request_id and the features
        self._names = [f.name for f in schema.features]
        self._procs = (
            ReplicaProcess(reps[0].url, reps[0].storage_options, self._expected, "reader-0"),
            ReplicaProcess(reps[1].url, reps[1].storage_options, self._expected, "reader-1"),
        )
        self._buckets: OrderedDict[int, _Bucket] = OrderedDict()
        self._first_absent: dict[int, int] = {}
        for proc in self._procs:  # both children import their libraries at once
            try:
                proc.wait_ready()
            except ReplicaError as failure:
                self.close()
                raise StorageError(f"feature replica {failure.url}: {failure.cause}") from None
        self._current = 0
        self._checking = False  # a check of the primary awaits its answer
        self._next_check = 0.0
        self._closed = False
        self.failovers = 0
        self.max_failover_s = 0.0  # the longest failover seen (seconds)
        self.failbacks = 0
        self.last_failure: str | None = None
        self._counts = {
            "asked": 0,
            "found": 0,
            "missing": 0,
            "malformed": 0,
            "reads": 0,
            "cross_checks": 0,
            "evictions": 0,
            "unkeyed_rows": 0,
        }

    @classmethod
    def from_config(
        cls, schema: Schema, cfg: FeaturesConfig, run_dir: Path, clock: Clock | None = None
    ) -> SnapshotReader:
        """A reader of the replicas of ``cfg`` (relative paths inside ``run_dir``)."""
        return cls(
            schema,
            resolve_replicas(cfg, run_dir),
            read_timeout_s=cfg.read_timeout_s,
            failback_check_s=cfg.failback_check_s,
            missing_wait_s=cfg.missing_wait_s,
            cache_buckets=cfg.cache_buckets,
            clock=clock,
        )

    @property
    def current(self) -> str:
        """The URL of the replica reads go to now."""
        return self.replicas[self._current].url

    # --- lookups ------------------------------------------------------------------------------

    def get(
        self,
        request_ids: NDArray[np.integer[Any]] | Sequence[int],
        ts_ms: NDArray[np.integer[Any]] | Sequence[int] | int,
    ) -> Lookup:
        """Look up the snapshots of ``request_ids``, written with request times ``ts_ms`` (one
        per id, or one for all): the time picks the bucket, so it must be the time the snapshot
        was written with. Raises :class:`~minutely.errors.StorageError` when neither replica
        answers."""
        if self._closed:
            raise StorageError("feature snapshot reader: expected an open reader, got a closed one")
        ids, ts = self._normalize(request_ids, ts_ms)
        self._counts["asked"] += len(ids)
        self._maybe_failback()
        buckets = ts // BUCKET_MS
        used = [int(b) for b in np.unique(buckets)]
        refreshed: set[int] = set()  # replicas brought to their newest version in this call
        synced: set[int] = set()  # buckets read in this call
        for b in used:
            if b not in self._buckets:
                self._buckets[b] = _Bucket()
                self._sync(b, refreshed)
                synced.add(b)
            self._buckets.move_to_end(b)

        found: list[tuple[NDArray[np.int64], pa.Table]] = []
        malformed: dict[int, str] = {}
        todo = self._resolve(ids, buckets, np.arange(len(ids)), found, malformed)
        stale = {int(x) for x in buckets[todo]} - synced
        if stale:  # absent from what was read before: new commits may hold them
            for b in sorted(stale):
                self._sync(b, refreshed)
            todo = self._resolve(ids, buckets, todo, found, malformed)
        pending: list[int] = []
        missing: list[int] = []
        if len(todo):
            now = self._clock.now_ms()
            wait_ms = self.missing_wait_s * 1000.0
            expired = np.array(
                [now - self._first_absent.setdefault(int(ids[p]), now) >= wait_ms for p in todo],
                dtype=bool,
            )
            pending = [int(x) for x in ids[todo[~expired]]]
            late = todo[expired]
            if len(late):
                for b in sorted({int(x) for x in buckets[late]}):
                    self._cross_check(b)
                missing = [int(x) for x in ids[self._resolve(ids, buckets, late, found, malformed)]]
                for rid in missing:
                    self._first_absent.pop(rid, None)
        self._forget_old_absences()
        self._evict()

        positions = np.concatenate([p for p, _ in found]) if found else _EMPTY
        if len(found) > 1:
            order = np.argsort(positions, kind="stable")
            table = pa.concat_tables([t for _, t in found]).take(pa.array(order))
            positions = positions[order]
        elif found:
            table = found[0][1]
        else:
            table = self._expected.empty_table()
        self._counts["found"] += len(positions)
        self._counts["missing"] += len(missing)
        self._counts["malformed"] += len(malformed)
        return Lookup(
            self.schema,
            ids[positions],
            table_to_features(table, self.schema),
            pending,
            missing,
            malformed,
        )

    def _normalize(
        self,
        request_ids: NDArray[np.integer[Any]] | Sequence[int],
        ts_ms: NDArray[np.integer[Any]] | Sequence[int] | int,
    ) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        ids = np.asarray(request_ids)
        if ids.ndim != 1 or (len(ids) and ids.dtype.kind not in "iu"):
            raise ValueError(
                f"request_ids: expected a 1-d array of integers, got {ids.dtype} {ids.shape}"
            )
        ids = ids.astype(np.int64, copy=False)
        if isinstance(ts_ms, (int, np.integer)) and not isinstance(ts_ms, bool):
            ts = np.full(len(ids), int(ts_ms), dtype=np.int64)
        else:
            ts = np.asarray(ts_ms)
            if ts.shape != ids.shape or (len(ts) and ts.dtype.kind not in "iu"):
                raise ValueError(
                    f"ts_ms: expected one integer or {len(ids)} integers, got {ts.dtype} {ts.shape}"
                )
            ts = ts.astype(np.int64, copy=False)
        _, first = np.unique(ids, return_index=True)
        if len(first) != len(ids):  # each id once, at its first place
            first.sort()
            ids, ts = ids[first], ts[first]
        return ids, ts

    def _resolve(
        self,
        ids: NDArray[np.int64],
        buckets: NDArray[np.int64],
        todo: NDArray[np.int64],
        found: list[tuple[NDArray[np.int64], pa.Table]],
        malformed: dict[int, str],
    ) -> NDArray[np.int64]:
        """Look up positions ``todo`` of ``ids`` in their cached buckets; found rows go to
        ``found`` (positions, rows), malformed ones to ``malformed``; returns the rest."""
        left: list[NDArray[np.int64]] = []
        sub_buckets = buckets[todo]
        for b in np.unique(sub_buckets):
            idx = todo[sub_buckets == b]
            bucket = self._buckets[int(b)]
            rows = bucket.rows_of(ids[idx])
            hit = rows >= 0
            if hit.any():
                found.append((idx[hit], bucket.table.take(pa.array(rows[hit]))))
                if self._first_absent:
                    for rid in ids[idx[hit]].tolist():
                        self._first_absent.pop(rid, None)
            absent = idx[~hit]
            if bucket.malformed and len(absent):
                bad = np.array([int(r) in bucket.malformed for r in ids[absent]], dtype=bool)
                for rid in ids[absent[bad]].tolist():
                    malformed[rid] = bucket.malformed[rid]
                    self._first_absent.pop(rid, None)
                absent = absent[~bad]
            left.append(absent)
        return np.sort(np.concatenate(left)) if left else _EMPTY

    # --- reading buckets ----------------------------------------------------------------------

    def _sync(self, number: int, refreshed: set[int]) -> None:
        """Read the new files of bucket ``number`` from the current replica, failing over to
        the other one when it fails."""
        i = self._current
        t0 = time.perf_counter()
        try:
            read = self._read_on(i, number, refreshed)
        except ReplicaError as first:
            j = 1 - i
            self.last_failure = f"{first.url}: {first.cause}"
            self._switch(j, f"failover: {first.cause}")
            self.failovers += 1
            try:
                read = self._read_on(j, number, refreshed)
            except ReplicaError as second:
                self.last_failure = f"{second.url}: {second.cause}"
                raise StorageError(
                    "feature snapshots: expected a replica to answer, got "
                    f"{first.url}: {first.cause}; {second.url}: {second.cause}"
                ) from None
            # From the failed read's start to the other replica's answer: what a failover
            # cost the caller (bounded by read_timeout_s plus the second read).
            took = time.perf_counter() - t0
            self.max_failover_s = max(self.max_failover_s, took)
            i = j
        self._apply(i, number, read)

    def _cross_check(self, number: int) -> None:
        """Read bucket ``number`` from the replica not in use, before ids are reported missing
        (a replica that was down while they were written may lack them). A failure there is
        not a failover: the ids are missing on the one replica that answers."""
        other = 1 - self._current
        self._counts["cross_checks"] += 1
        try:
            read = self._read_on(other, number, set())
        except ReplicaError as failure:
            self.last_failure = f"{failure.url}: {failure.cause}"
            return
        self._apply(other, number, read)

    def _read_on(self, i: int, number: int, refreshed: set[int]) -> _Read:
        bucket = self._buckets[number]
        skip = frozenset(bucket.files[i])
        if i == 0 and self._checking:  # let a check of the primary finish rather than fail it
            self._end_check(wait=True)
        self._counts["reads"] += 1
        paths, data, problem = self._procs[i].call(
            self.read_timeout_s, self._read_limit, "read", BUCKET, number, skip, i not in refreshed
        )
        refreshed.add(i)
        return _Read(paths, data, problem)

    def _apply(self, i: int, number: int, read: _Read) -> None:
        bucket = self._buckets[number]
        bucket.files[i].update(read.paths)
        if read.data is None or not read.data.num_rows:
            return
        data = read.data
        id_col = data.column(REQUEST_ID)
        if id_col.null_count:
            self._counts["unkeyed_rows"] += id_col.null_count
            data = data.filter(pc.is_valid(id_col))
        url = self.replicas[i].url
        if read.problem is not None:
            reason = f"snapshot table {url}: {read.problem}"
            ids = data.column(REQUEST_ID).to_numpy()
            bucket.add(None, dict.fromkeys(ids.tolist(), reason))
            return
        good, bad = self._check_rows(data, url)
        # One schema for every bucket, whichever replica (or producer) wrote the rows.
        bucket.add(good.select(self._expected.names).cast(self._expected), bad)

    def _check_rows(self, data: pa.Table, url: str) -> tuple[pa.Table, dict[int, str]]:
        """The rows whose every feature is a valid value, and the reason for each other id."""
        n = data.num_rows
        reasons: list[str | None] = [None] * n
        any_bad = False
        for spec in self.schema.features:
            col = data.column(spec.name).combine_chunks()
            where = f"snapshot in {url}: feature {spec.name!r}"
            bad = np.zeros(n, dtype=bool)
            if col.null_count:
                bad |= np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
            if spec.kind == "multi_sparse":
                flat = pc.list_flatten(col)
                if flat.null_count:
                    parents = pc.list_parent_indices(col)
                    rows = np.asarray(parents.filter(flat.is_null()).to_numpy(), dtype=np.int64)
                    bad[rows] = True
            elif spec.kind == "dense":
                values = np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)
                bad |= ~np.isfinite(values)  # a null reads as nan
            if bad.any():
                any_bad = True
                expected = _EXPECTED[spec.kind]
                for r in np.flatnonzero(bad).tolist():
                    if reasons[r] is None:
                        value = col[r].as_py()
                        got = "a list holding a null" if isinstance(value, list) else repr(value)
                        reasons[r] = f"{where}: expected {expected}, got {got}"
        if not any_bad:
            return data, {}
        keep = np.array([r is None for r in reasons], dtype=bool)
        ids = data.column(REQUEST_ID).to_numpy()
        bad_ids = {int(ids[r]): str(reasons[r]) for r in np.flatnonzero(~keep).tolist()}
        return data.filter(pa.array(keep)), bad_ids

    # --- replicas -----------------------------------------------------------------------------

    def _switch(self, to: int, cause: str) -> None:
        was = self._current
        self._current = to
        if to == 1:
            self._next_check = time.monotonic() + self.failback_check_s
        logger.warning(
            "feature snapshots: switched from %s to %s (%s)",
            self.replicas[was].url,
            self.replicas[to].url,
            cause,
        )

    def _maybe_failback(self) -> None:
        """While on the secondary: switch back when a check of the primary answered within
        ``read_timeout_s``, and start a check when one is due (never waiting for it)."""
        if self._current == 0:
            return
        if self._checking:
            took = self._end_check(wait=False)
            if took is not None and took <= self.read_timeout_s:
                self._switch(0, f"failback: the primary answered a check in {took:.3f} s")
                self.failbacks += 1
                return
        now = time.monotonic()
        primary = self._procs[0]
        if not self._checking and now >= self._next_check and primary.running():
            self._next_check = now + self.failback_check_s
            try:
                primary.send("check")
            except ReplicaError as failure:
                self.last_failure = f"{failure.url}: {failure.cause}"
            else:
                self._checking = True

    def _end_check(self, *, wait: bool) -> float | None:
        """The seconds the check of the primary in flight took, once it answered (``None``
        while it runs, or when it failed). A check that runs past ``read_timeout_s`` has
        failed: its process is killed, and started again for the next check."""
        primary = self._procs[0]
        remaining = self.read_timeout_s - primary.inflight_s
        if not wait and not primary.answered() and remaining > 0:
            return None
        self._checking = False
        try:
            took: float = primary.receive(remaining, self._read_limit)
        except ReplicaError as failure:
            self.last_failure = f"{failure.url}: {failure.cause}"
            primary.running()  # start again now, to be ready for the next check
            return None
        if took > self.read_timeout_s:
            self.last_failure = (
                f"{primary.url}: answered a check in {took:.3f} s, over "
                f"read_timeout_s={self.read_timeout_s:g}"
            )
            return None
        return took

    # --- memory -------------------------------------------------------------------------------

    def _evict(self) -> None:
        """Drop the least recently used buckets beyond ``cache_buckets`` (a call may use more
        while it runs)."""
        while len(self._buckets) > self.cache_buckets:
            del self._buckets[next(iter(self._buckets))]
            self._counts["evictions"] += 1

    def _forget_old_absences(self) -> None:
        """Drop ids first asked for long ago and never asked again (the dict is in the order
        ids were first asked for), so abandoned ids do not pile up."""
        horizon = self._clock.now_ms() - 2 * self.missing_wait_s * 1000.0 - 60_000
        while self._first_absent:
            rid, first = next(iter(self._first_absent.items()))
            if first >= horizon:
                break
            del self._first_absent[rid]

    # --- state --------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters: ids asked/found/missing/malformed, reads per replica call, cross-checks,
        failovers and failbacks, the replica in use, cached buckets and rows, pending ids and
        the last failure seen."""
        return {
            "replica": self.current,
            "failovers": self.failovers,
            "failbacks": self.failbacks,
            "max_failover_s": round(self.max_failover_s, 3),
            **self._counts,
            "pending": len(self._first_absent),
            "buckets_cached": len(self._buckets),
            "rows_cached": sum(b.size for b in self._buckets.values()),
            "last_failure": self.last_failure,
        }

    def close(self) -> None:
        """Stop the replicas' worker processes."""
        self._closed = True
        for proc in self._procs:
            proc.close()

    def __enter__(self) -> SnapshotReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
