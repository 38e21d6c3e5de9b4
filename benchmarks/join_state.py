"""The join's state on disk: SQLite (stdlib ``sqlite3``, WAL) against RocksDB (``rocksdict``).

Run: ``.venv/bin/python benchmarks/join_state.py [--quick] [--repeats N]``. Both stores run the
join's access pattern on one partition's state, checkpoint interval by checkpoint interval:

* point lookups by impression id, as clicks and conversions make them (3% of the interval's
  impressions, plus one lookup per 30 impressions among the pCVR entries, a fifth of them
  misses);
* one commit per interval: the interval's impressions (about 1 KB of msgpack features each)
  inserted, a pCVR entry (the features plus four ints) for each clicked impression, impressions
  older than the retention and entries past their expiry deleted by a range of time (each table
  has an index by time), and one small meta record; one transaction on SQLite, one synced
  ``WriteBatch`` on RocksDB.

Both are durable per commit (SQLite ``synchronous=FULL``, RocksDB ``sync=True``). Reports
operations per second (rows inserted + rows deleted + lookups), each kind's share, commit
latency and the files' size, medians of ``--repeats`` runs; the ratio compares the two within
this run. Prints a JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import msgspec

_ENC = msgspec.msgpack.Encoder()
_KEY = 1 << 63  # SQLite integers are signed: ids are stored shifted into range


def features(rng: random.Random) -> bytes:
    """About 1 KB of msgpack: the default schema's fields and a long interest list."""
    feats: dict[str, object] = {
        "user_id": rng.randrange(1 << 40),
        "ad_id": rng.randrange(1 << 30),
        "campaign_id": rng.randrange(1 << 20),
        "advertiser_id": rng.randrange(1 << 16),
        "category": rng.randrange(40),
        "slot": rng.randrange(8),
        "device": rng.randrange(3),
        "hour_of_day": rng.randrange(24),
        "user_interests": [rng.randrange(1 << 30) for _ in range(170)],
        "ad_age_hours": rng.random() * 48,
        "user_activity": rng.random(),
        "ad_ctr_1h": rng.random() * 0.06,
    }
    return _ENC.encode(feats)


@dataclass(frozen=True)
class Interval:
    """One checkpoint interval of the workload."""

    now: int
    imps: list[tuple[int, int, bytes]]  # (id, ts, features)
    entries: list[tuple[int, int, bytes]]  # (id, expiry, value)
    lookups: list[int]
    entry_lookups: list[int]
    imp_limit: int  # delete impressions with ts < this
    entry_limit: int  # delete entries with expiry < this


def workload(intervals: int, per_interval: int, retention: int, horizon: int) -> list[Interval]:
    rng = random.Random(0)
    out: list[Interval] = []
    next_id = 0
    entry_ids: list[int] = []
    blobs = [features(rng) for _ in range(256)]
    for k in range(intervals):
        now = (k + 1) * per_interval
        imps = []
        for i in range(per_interval):
            imps.append((next_id, k * per_interval + i, blobs[next_id % 256]))
            next_id += 1
        clicked = rng.sample([iid for iid, _, _ in imps], per_interval * 3 // 100)
        entries = [(iid, now + horizon, blobs[iid % 256] + b"\x00" * 32) for iid in clicked]
        entry_ids += clicked
        n_conv = per_interval // 30
        conv = [rng.choice(entry_ids) for _ in range(n_conv - n_conv // 5)]
        conv += [next_id + 10_000_000 + j for j in range(n_conv // 5)]  # misses
        out.append(Interval(now, imps, entries, clicked, conv, now - retention, now - per_interval))
    return out


class Store(Protocol):
    def lookup(self, iid: int) -> bytes | None: ...

    def lookup_entry(self, iid: int) -> bytes | None: ...

    def commit(self, iv: Interval, meta: bytes) -> int:
        """Apply the interval's changes; returns rows deleted."""
        ...

    def close(self) -> None: ...


class SqliteStore:
    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(
            """
            CREATE TABLE imps (iid INTEGER PRIMARY KEY, ts INTEGER NOT NULL, f BLOB NOT NULL);
            CREATE INDEX imps_ts ON imps (ts);
            CREATE TABLE entries (iid INTEGER PRIMARY KEY, expiry INTEGER NOT NULL, v BLOB);
            CREATE INDEX entries_expiry ON entries (expiry);
            CREATE TABLE meta (k TEXT PRIMARY KEY, v BLOB NOT NULL);
            """
        )

    def lookup(self, iid: int) -> bytes | None:
        row = self.db.execute("SELECT f FROM imps WHERE iid = ?", (iid - _KEY,)).fetchone()
        return None if row is None else bytes(row[0])

    def lookup_entry(self, iid: int) -> bytes | None:
        row = self.db.execute("SELECT v FROM entries WHERE iid = ?", (iid - _KEY,)).fetchone()
        return None if row is None else bytes(row[0])

    def commit(self, iv: Interval, meta: bytes) -> int:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        deleted = db.execute("DELETE FROM imps WHERE ts < ?", (iv.imp_limit,)).rowcount
        deleted += db.execute("DELETE FROM entries WHERE expiry < ?", (iv.entry_limit,)).rowcount
        db.executemany(
            "INSERT OR REPLACE INTO imps VALUES (?, ?, ?)",
            [(iid - _KEY, ts, f) for iid, ts, f in iv.imps],
        )
        db.executemany(
            "INSERT OR REPLACE INTO entries VALUES (?, ?, ?)",
            [(iid - _KEY, exp, v) for iid, exp, v in iv.entries],
        )
        db.execute("INSERT OR REPLACE INTO meta VALUES ('state', ?)", (meta,))
        db.execute("COMMIT")
        return deleted

    def close(self) -> None:
        self.db.close()


class RocksStore:
    """Two column families per table: the rows by id and an index by time (time, id)."""

    def __init__(self, path: Path) -> None:
        from rocksdict import Options, Rdict, WriteOptions

        opts = Options(raw_mode=True)
        opts.create_if_missing(True)
        opts.create_missing_column_families(True)
        self.db = Rdict(str(path), opts)
        self.cf = {}
        for name in ("imps", "imps_ts", "entries", "entries_expiry", "meta"):
            self.db.create_column_family(name, Options(raw_mode=True))
            self.cf[name] = self.db.get_column_family_handle(name)
        self.rows = {n: self.db.get_column_family(n) for n in ("imps", "entries")}
        self.index = {n: self.db.get_column_family(n) for n in ("imps_ts", "entries_expiry")}
        self.wopt = WriteOptions()
        self.wopt.sync = True

    def lookup(self, iid: int) -> bytes | None:
        v = self.rows["imps"].get(iid.to_bytes(8, "big"))
        return None if v is None else bytes(v)

    def lookup_entry(self, iid: int) -> bytes | None:
        v = self.rows["entries"].get(iid.to_bytes(8, "big"))
        return None if v is None else bytes(v[8:])

    def _range_delete(self, wb: object, table: str, index: str, limit: int) -> int:
        end = limit.to_bytes(8, "big", signed=False) if limit > 0 else b"\x00" * 8
        ids = []
        for k in self.index[index].keys():  # noqa: SIM118 (an Rdict, not a dict)
            if k >= end:
                break
            ids.append(k[8:])
        for iid in ids:
            wb.delete(iid, self.cf[table])  # type: ignore[attr-defined]
        if ids:
            wb.delete_range(b"", end, self.cf[index])  # type: ignore[attr-defined]
        return len(ids)

    def commit(self, iv: Interval, meta: bytes) -> int:
        from rocksdict import WriteBatch

        wb = WriteBatch(raw_mode=True)
        deleted = self._range_delete(wb, "imps", "imps_ts", iv.imp_limit)
        deleted += self._range_delete(wb, "entries", "entries_expiry", iv.entry_limit)
        rows, ts_index = self.cf["imps"], self.cf["imps_ts"]
        for iid, ts, f in iv.imps:
            key = iid.to_bytes(8, "big")
            wb.put(key, f, rows)
            wb.put(ts.to_bytes(8, "big") + key, b"", ts_index)
        entries, exp_index = self.cf["entries"], self.cf["entries_expiry"]
        for iid, exp, v in iv.entries:
            key = iid.to_bytes(8, "big")
            wb.put(key, exp.to_bytes(8, "big") + v, entries)
            wb.put(exp.to_bytes(8, "big") + key, b"", exp_index)
        wb.put(b"state", meta, self.cf["meta"])
        self.db.write(wb, self.wopt)
        return deleted

    def close(self) -> None:
        for cf in (*self.rows.values(), *self.index.values()):
            cf.close()
        self.db.close()


def dir_bytes(path: Path) -> int:
    if path.is_file():
        return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def one_run(kind: str, work: list[Interval], root: Path) -> dict[str, float]:
    path = root / ("state.sqlite" if kind == "sqlite" else "state.rocksdb")
    store: Store = SqliteStore(path) if kind == "sqlite" else RocksStore(path)
    t_lookup = t_commit = 0.0
    inserted = deleted = looked = found = 0
    commits: list[float] = []
    meta = b"m" * 4096
    try:
        for iv in work:
            t0 = time.perf_counter()
            for iid in iv.lookups:
                found += store.lookup(iid) is not None
            for iid in iv.entry_lookups:
                found += store.lookup_entry(iid) is not None
            t1 = time.perf_counter()
            deleted += store.commit(iv, meta)
            t2 = time.perf_counter()
            t_lookup += t1 - t0
            t_commit += t2 - t1
            commits.append(t2 - t1)
            inserted += len(iv.imps) + len(iv.entries)
            looked += len(iv.lookups) + len(iv.entry_lookups)
        size = dir_bytes(path)
    finally:
        store.close()
    total = t_lookup + t_commit
    return {
        "ops_per_s": (inserted + deleted + looked) / total,
        "lookups_per_s": looked / t_lookup,
        "rows_written_per_s": (inserted + deleted) / t_commit,
        "commit_ms_p50": statistics.median(commits) * 1000,
        "seconds": total,
        "found": found,
        "deleted": deleted,
        "bytes_on_disk": size,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer, smaller intervals")
    ap.add_argument("--repeats", type=int, default=3, help="runs per store; medians are reported")
    args = ap.parse_args(argv)
    per, n = (4_000, 24) if args.quick else (20_000, 48)
    # Retention: 4 intervals of impressions; pCVR entries expire 12 intervals after their click.
    work = workload(n, per, retention=4 * per, horizon=12 * per)
    results: dict[str, list[dict[str, float]]] = {"sqlite": [], "rocksdb": []}
    for _ in range(args.repeats):
        for kind in results:  # interleaved, so both see the same machine load
            root = Path(tempfile.mkdtemp(prefix="minutely-join-state-"))
            try:
                results[kind].append(one_run(kind, work, root))
            finally:
                shutil.rmtree(root, ignore_errors=True)
    med = {
        kind: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        for kind, runs in results.items()
    }
    for runs in results.values():
        assert len({r["found"] for r in runs}) == 1
    assert med["sqlite"]["found"] == med["rocksdb"]["found"], "the stores disagree"
    assert med["sqlite"]["deleted"] == med["rocksdb"]["deleted"], "the stores disagree"
    out: dict[str, object] = {
        "bench": "join_state",
        "repeats": args.repeats,
        "intervals": n,
        "impressions_per_interval": per,
        "feature_bytes": len(work[0].imps[0][2]),
    }
    for kind, m in med.items():
        out[kind] = {
            "ops_per_s": round(m["ops_per_s"]),
            "lookups_per_s": round(m["lookups_per_s"]),
            "rows_written_per_s": round(m["rows_written_per_s"]),
            "commit_ms_p50": round(m["commit_ms_p50"], 2),
            "bytes_on_disk": int(m["bytes_on_disk"]),
        }
    out["rocksdb_over_sqlite_ops"] = round(
        med["rocksdb"]["ops_per_s"] / med["sqlite"]["ops_per_s"], 2
    )
    out["rocksdb_over_sqlite_lookups"] = round(
        med["rocksdb"]["lookups_per_s"] / med["sqlite"]["lookups_per_s"], 2
    )
    out["rocksdb_over_sqlite_writes"] = round(
        med["rocksdb"]["rows_written_per_s"] / med["sqlite"]["rows_written_per_s"], 2
    )
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
