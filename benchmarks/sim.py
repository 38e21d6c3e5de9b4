"""How fast the ad-market simulator generates and encodes traffic.

Times, for a fresh market each repeat: building the market (world and calibration), generating
each day (``Market.simulate_day``), and turning a whole day of events into ``events()`` structs
and into ``messages()`` (the log's wire bytes), inline and by reference (``by_reference=True``,
with the ratio of the two in the same run), and taking the day's ``snapshots()`` columns. Also
reports the conversion-delay shape the ``criteo`` preset produced. Medians over ``--repeats``
runs; the last line is one JSON object.

    python benchmarks/sim.py --quick
    python benchmarks/sim.py --days 2 --impressions-per-day 1000000
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from dataclasses import replace

import numpy as np

from minutely.clock import MS_PER_DAY, MS_PER_HOUR
from minutely.config import SimConfig
from minutely.sim import DayTraffic, Market


def conversion_delays(days: list[DayTraffic]) -> np.ndarray:
    """Click-to-conversion delays (ms) of every conversion of ``days``."""
    out = []
    for t in days:
        order = np.argsort(t.click_imp_id)
        pos = np.searchsorted(t.click_imp_id[order], t.conv_imp_id)
        out.append(t.conv_ts_ms - t.click_ts_ms[order][pos])
    return np.concatenate(out)


def run_once(cfg: SimConfig, days: int) -> dict[str, float]:
    t0 = time.perf_counter()
    market = Market(cfg, cached_days=days)
    market.intercepts()
    build_s = time.perf_counter() - t0

    simulate = []
    traffic = []
    for day in range(days):
        t0 = time.perf_counter()
        traffic.append(market.simulate_day(day))
        simulate.append(time.perf_counter() - t0)

    last = days - 1
    t0 = time.perf_counter()
    batch = market.events_between(market.day_start_ms(last), market.day_start_ms(last + 1))
    slice_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    n_events = len(batch.events())
    events_s = time.perf_counter() - t0
    gc.collect()
    t0 = time.perf_counter()
    messages = batch.messages()
    messages_s = time.perf_counter() - t0
    n_bytes = sum(len(v) for _, v, _ in messages)
    del messages
    gc.collect()
    t0 = time.perf_counter()
    by_reference = batch.messages(by_reference=True)
    by_reference_s = time.perf_counter() - t0
    del by_reference
    gc.collect()
    t0 = time.perf_counter()
    batch.snapshots()
    snapshots_s = time.perf_counter() - t0

    delays = conversion_delays(traffic)
    return {
        "build_s": build_s,
        "simulate_s": statistics.median(simulate),
        "slice_s": slice_s,
        "events_s": events_s,
        "messages_s": messages_s,
        "by_reference_s": by_reference_s,
        "snapshots_s": snapshots_s,
        "events": float(n_events),
        "impressions": float(batch.count(0)),
        "clicks": float(sum(int(t.clicked.sum()) for t in traffic)) / days,
        "conversions": float(len(delays)) / days,
        "bytes_per_event": n_bytes / max(n_events, 1),
        "frac_1h": float(np.mean(delays <= MS_PER_HOUR)) if len(delays) else float("nan"),
        "frac_1d": float(np.mean(delays <= MS_PER_DAY)) if len(delays) else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smaller market (200k impressions/day)")
    p.add_argument("--days", type=int, default=1, help="days simulated per repeat")
    p.add_argument("--impressions-per-day", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    if args.days < 1 or args.repeats < 1:
        p.error("--days and --repeats must be >= 1")

    ipd = args.impressions_per_day or (200_000 if args.quick else SimConfig().impressions_per_day)
    cfg = replace(SimConfig(), impressions_per_day=ipd, delay_preset="criteo")
    runs = [run_once(cfg, args.days) for _ in range(args.repeats)]

    def med(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    events = med("events")
    result = {
        "benchmark": "sim",
        "quick": bool(args.quick),
        "impressions_per_day": ipd,
        "users": cfg.users,
        "days": args.days,
        "repeats": args.repeats,
        "events": int(events),
        "clicks_per_day": int(med("clicks")),
        "conversions_per_day": int(med("conversions")),
        "build_s_median": round(med("build_s"), 3),
        "simulate_s_median": round(med("simulate_s"), 3),
        "events_between_s_median": round(med("slice_s"), 3),
        "events_s_median": round(med("events_s"), 3),
        "messages_s_median": round(med("messages_s"), 3),
        "messages_by_reference_s_median": round(med("by_reference_s"), 3),
        "snapshots_s_median": round(med("snapshots_s"), 3),
        "by_reference_over_inline": round(
            statistics.median(r["by_reference_s"] / r["messages_s"] for r in runs), 3
        ),
        "events_per_s": round(events / med("simulate_s")),
        "structs_per_s": round(events / med("events_s")),
        "encode_events_per_s": round(events / med("messages_s")),
        "bytes_per_event": round(med("bytes_per_event"), 1),
        "criteo_frac_conv_1h": round(med("frac_1h"), 4),
        "criteo_frac_conv_1d": round(med("frac_1d"), 4),
    }
    print(
        f"simulate_day: {result['simulate_s_median']:.2f} s for {ipd:,} impressions "
        f"({result['events_per_s']:,} events/s); market build {result['build_s_median']:.2f} s"
    )
    print(
        f"one day of {int(events):,} events: events() {result['events_s_median']:.2f} s, "
        f"messages() {result['messages_s_median']:.2f} s "
        f"({result['encode_events_per_s']:,} events/s, {result['bytes_per_event']} B/event); "
        f"criteo conversions within 1 h {result['criteo_frac_conv_1h']:.3f}, "
        f"within 1 day {result['criteo_frac_conv_1d']:.3f}"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
