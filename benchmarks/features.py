"""Feature snapshot writes and lookups for a day of ad traffic (about 1M impressions).

Run: ``.venv/bin/python benchmarks/features.py [--quick] [--impressions N] [--batch N]``.
Writes the snapshots of ``N`` impressions (synthetic columns of the default schema, request
times spread evenly over a day as 1M a day would be) to two local replicas, ``--write-batch``
rows per write, then looks them up as the join would: in time order, ``--batch`` ids per call.
A first pass is *cold* (each hour's bucket is read from the table when first touched, the
cache holding 4), a second call on the same ids is *warm* (served from memory). A *fresh*
phase (up to 40 writes) looks each batch up right after writing it: one table refresh and one
new file per call, the pattern of a join that follows its producer. Also times the conversion
of a lookup to one feature dict per id. Figures are medians over the calls; the last
stdout line is one JSON object.

``join_time_share`` is how much of each second a join running at 100k events/s would spend on
cold lookups of one id per event (100k / the cold pass's ids per second over all its calls,
bucket reads included); the join's own rate is not measured here (see ``benchmarks/join.py``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from minutely.features import Features, SnapshotReader, SnapshotWriter
from minutely.schema import Schema, default_schema

DAY_MS = 86_400_000
T0 = 1_767_225_600_000
JOIN_EVENTS_PER_S = 100_000


def synthetic_features(schema: Schema, n: int, rng: np.random.Generator) -> Features:
    out: Features = {}
    for spec in schema.features:
        if spec.kind == "sparse":
            out[spec.name] = rng.integers(0, 200_000, n, dtype=np.int64)
        elif spec.kind == "dense":
            out[spec.name] = rng.random(n, dtype=np.float32)
        else:
            offsets = np.concatenate([[0], np.cumsum(rng.integers(1, 5, n))]).astype(np.int64)
            out[spec.name] = (rng.integers(0, 40, int(offsets[-1]), dtype=np.int64), offsets)
    return out


def run(impressions: int, batch: int, write_batch: int, folder: Path) -> dict[str, object]:
    schema = default_schema()
    rng = np.random.default_rng(0)
    ids = np.arange(impressions, dtype=np.int64)
    ts = T0 + (ids * (DAY_MS // 1_000_000)).astype(np.int64)  # 1M a day, whatever N is
    replicas = [str(folder / "primary"), str(folder / "secondary")]

    write_s: list[float] = []
    with SnapshotWriter(schema, replicas) as writer:
        for lo in range(0, impressions, write_batch):
            hi = min(lo + write_batch, impressions)
            feats = synthetic_features(schema, hi - lo, rng)
            start = time.perf_counter()
            writer.write(ids[lo:hi], ts[lo:hi], feats)
            write_s.append(time.perf_counter() - start)

    cold: list[float] = []
    cold_s = 0.0
    warm: list[float] = []
    dicts: list[float] = []
    with SnapshotReader(schema, replicas, cache_buckets=4, missing_wait_s=0) as reader:
        for lo in range(0, impressions, batch):
            hi = min(lo + batch, impressions)
            start = time.perf_counter()
            got = reader.get(ids[lo:hi], ts[lo:hi])
            took = time.perf_counter() - start
            cold.append((hi - lo) / took)
            cold_s += took
            if len(got.ids) != hi - lo:
                raise SystemExit(f"lookup lost ids: asked {hi - lo}, found {len(got.ids)}")
            start = time.perf_counter()
            reader.get(ids[lo:hi], ts[lo:hi])
            warm.append((hi - lo) / (time.perf_counter() - start))
            start = time.perf_counter()
            rows = got.found
            dicts.append(len(rows) / (time.perf_counter() - start))
        stats = reader.stats()

    cold_overall = impressions / cold_s  # bucket reads included, however few calls pay them

    # Live: each batch is looked up right after it is written (one refresh and one new file a
    # call), as a join following the producer closely would.
    fresh: list[float] = []
    fresh_ms: list[float] = []
    replicas = [str(folder / "live-primary"), str(folder / "live-secondary")]
    with (
        SnapshotWriter(schema, replicas) as writer,
        SnapshotReader(schema, replicas, missing_wait_s=60) as reader,
    ):
        for lo in range(0, min(impressions, 40 * write_batch), write_batch):
            hi = min(lo + write_batch, impressions)
            writer.write(ids[lo:hi], ts[lo:hi], synthetic_features(schema, hi - lo, rng))
            start = time.perf_counter()
            got = reader.get(ids[lo:hi], ts[lo:hi])
            took = time.perf_counter() - start
            if len(got.ids) != hi - lo:
                raise SystemExit(f"live lookup: asked {hi - lo}, found {len(got.ids)}")
            fresh.append((hi - lo) / took)
            fresh_ms.append(took * 1000)
    return {
        "impressions": impressions,
        "lookup_batch": batch,
        "write_batch": write_batch,
        "write_rows_per_s": round(impressions / sum(write_s)),
        "write_ms_p50": round(statistics.median(write_s) * 1000, 2),
        "lookup_cold_ids_per_s": round(statistics.median(cold)),
        "lookup_cold_ids_per_s_overall": round(cold_overall),
        "lookup_warm_ids_per_s": round(statistics.median(warm)),
        "lookup_fresh_ids_per_s": round(statistics.median(fresh)),
        "lookup_fresh_ms_p50": round(statistics.median(fresh_ms), 2),
        "found_dicts_per_s": round(statistics.median(dicts)),
        "buckets_read": stats["reads"],
        "join_time_share": round(JOIN_EVENTS_PER_S / cold_overall, 3),
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200k impressions")
    parser.add_argument("--impressions", type=int, default=None)
    parser.add_argument("--batch", type=int, default=20_000, help="ids per lookup")
    parser.add_argument("--write-batch", type=int, default=5_000, help="rows per write")
    args = parser.parse_args(argv)
    n = args.impressions or (200_000 if args.quick else 1_000_000)
    if n < 1 or args.batch < 1 or args.write_batch < 1:
        parser.error("--impressions, --batch and --write-batch must be >= 1")
    with tempfile.TemporaryDirectory(prefix="minutely-features-bench-") as tmp:
        result = run(n, args.batch, args.write_batch, Path(tmp))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
