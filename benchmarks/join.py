"""Join throughput on a synthetic day of ad traffic.

Run: ``.venv/bin/python tests/join/bench_join.py [--quick] [--impressions N]``. The stream
mimics the simulator's shape: ~1M impressions a day (one event every ~86 ms), a 3% click rate
with delays of seconds to minutes, an 8% conversion rate after a click with a long-tailed delay
(about a third within an hour, half within a day), delivery jitter within the allowed lateness
and a few events later than it, duplicate clicks and orphan clicks. Prints a JSON object as its
last line.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from minutely.config import JoinConfig, ModelConfig, load_config
from minutely.events import Click, Conversion, Event, Impression, decode_event, encode_event
from minutely.join import Joiner, JoinStats
from minutely.join.store import JoinStore
from minutely.schema import default_schema

DAY_MS = 86_400_000
BATCH = 10_000


def synth_stream(n_impressions: int, seed: int = 0) -> list[Event]:
    """Events in delivery order for ``n_impressions`` spread over one day."""
    rng = random.Random(seed)
    gap = DAY_MS / 1_000_000
    arrivals: list[tuple[int, int, Event]] = []
    ts = 1_767_225_600_000
    k = 0

    def deliver(ev: Event) -> None:
        nonlocal k
        jitter = rng.randint(0, 5_000) if rng.random() > 0.002 else rng.randint(30_000, 300_000)
        arrivals.append((ev.ts_ms + jitter, k, ev))
        k += 1

    for iid in range(n_impressions):
        ts += int(rng.expovariate(1.0 / gap)) + 1
        feats: dict[str, int | float | list[int]] = {
            "user_id": rng.randrange(200_000),
            "ad_id": rng.randrange(20_000),
            "campaign_id": rng.randrange(2_000),
            "advertiser_id": rng.randrange(400),
            "category": rng.randrange(40),
            "slot": rng.randrange(8),
            "device": rng.randrange(3),
            "hour_of_day": (ts // 3_600_000) % 24,
            "user_interests": [rng.randrange(40) for _ in range(3)],
            "ad_age_hours": rng.random() * 48,
            "user_activity": rng.random(),
            "ad_ctr_1h": rng.random() * 0.06,
        }
        deliver(Impression(iid, ts, feats))
        if rng.random() < 0.03:
            cts = ts + int(rng.lognormvariate(9.5, 1.5))  # median ~13 s, tail of minutes
            deliver(Click(iid, cts))
            if rng.random() < 0.005:
                deliver(Click(iid, cts))
            if rng.random() < 0.08:
                delay = rng.expovariate(1 / 1_800_000) if rng.random() < 0.4 else 0.0
                if delay == 0.0:
                    delay = rng.lognormvariate(17.5, 1.5)  # hours to days
                deliver(Conversion(iid, cts + int(delay)))
        if rng.random() < 0.001:
            deliver(Click(n_impressions + iid, ts + 1_000))
    arrivals.sort(key=lambda a: (a[0], a[1]))
    return [ev for at, _, ev in arrivals if at <= ts]  # one day of delivery


@dataclass(frozen=True)
class _Run:
    seconds: float
    cpu_seconds: float
    samples: int
    peak_state: int
    snapshot_bytes: int
    snapshot_s: float
    stats: JoinStats


def _one_run(batches: list[list[bytes]], store_every: int = 0) -> _Run:
    """One pass; with ``store_every``, the state on disk, checkpointed every that many events
    (the checkpoints' time counts)."""
    cfg = load_config(None)
    models: tuple[ModelConfig, ...] = cfg.models
    tmp = tempfile.mkdtemp(prefix="minutely-bench-join-")
    store = JoinStore.create(Path(tmp) / "p0.sqlite") if store_every else None
    joiner = Joiner(models, JoinConfig(), default_schema(), store=store)
    t_stream = 0.0
    cpu_stream = 0.0
    samples = 0
    since = 0
    for raw in batches:
        batch = [decode_event(b) for b in raw]
        t0 = time.perf_counter()
        c0 = time.process_time()
        joiner.process_many(batch)
        samples += sum(len(v) for v in joiner.drain().values())
        since += len(batch)
        if store_every and since >= store_every:
            joiner.checkpoint()
            since = 0
        cpu_stream += time.process_time() - c0
        t_stream += time.perf_counter() - t0
    peak_state = joiner.state_size()
    t1 = time.perf_counter()
    blob = joiner.snapshot()
    t_snap = time.perf_counter() - t1
    joiner.flush_all()
    samples += sum(len(v) for v in joiner.drain().values())
    if store is not None:
        store.close()
    shutil.rmtree(tmp, ignore_errors=True)
    return _Run(t_stream, cpu_stream, samples, peak_state, len(blob), t_snap, joiner.stats)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="200k impressions instead of 1M")
    ap.add_argument("--impressions", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3, help="runs; medians are reported")
    ap.add_argument(
        "--store-every",
        type=int,
        default=0,
        help="keep the state in an on-disk store, checkpointed every N events (0: in memory)",
    )
    args = ap.parse_args(argv)
    n = args.impressions or (200_000 if args.quick else 1_000_000)
    events = synth_stream(n)
    # As in the pipeline, events reach the joiner as log messages decoded batch by batch, so the
    # collector sees the same live objects (the joiner's state, fresh events, outputs).
    batches = [
        [encode_event(ev) for ev in events[i : i + BATCH]] for i in range(0, len(events), BATCH)
    ]
    n_events = len(events)
    del events
    gc.collect()
    runs = [_one_run(batches, args.store_every) for _ in range(args.repeats)]
    t_stream = statistics.median(r.seconds for r in runs)
    cpu_stream = statistics.median(r.cpu_seconds for r in runs)
    last = runs[-1]
    stats, samples, peak_state, t_snap = last.stats, last.samples, last.peak_state, last.snapshot_s
    result = {
        "bench": "join",
        "repeats": args.repeats,
        "store_every": args.store_every,
        "impressions": n,
        "events": n_events,
        "seconds": round(t_stream, 3),
        "cpu_seconds": round(cpu_stream, 3),
        "events_per_s": round(n_events / t_stream),
        "events_per_cpu_s": round(n_events / cpu_stream),
        "samples": samples,
        "emitted": stats.emitted,
        "positives": stats.positives,
        "corrections": stats.corrections,
        "orphans": stats.orphans,
        "duplicates": stats.duplicates,
        "state_entries_at_end": peak_state,
        "snapshot_bytes": last.snapshot_bytes,
        "snapshot_s": round(t_snap, 3),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
