"""The service topology replaying simulated traffic, on the embedded log and on a Kafka broker.

Run: ``.venv/bin/python benchmarks/pipeline.py [--quick] [--impressions-per-day N]
[--backends sqlite,kafka] [--kafka HOST:PORT]``. Without ``--kafka`` a local broker (the
noida-db binary, as the tests use) is started for the run. Per backend, in one process and one
after the other, each stage as a user runs it (its service object, log in, log out, checkpoints):

* ``simulate``: one simulated day into the raw topic;
* ``join``: the join service over that backlog (poll, decode, validate, join, encode, append,
  checkpoint) -> raw events per second;
* ``train``: the train service over the samples (poll, decode, test-then-train, export,
  checkpoint) -> samples per second;
* replay speed: simulated seconds per wall second of the three stages together.

Then, live: the services as processes (``minutely simulate --rate R``, ``join``, ``train``) on a
fresh run, the simulator paced at ``R`` times real time; from the trainer's audit, for every
sample, the lag from its event being appended to the window it belongs to being trained (p50,
p99, in wall seconds and in simulated seconds; the attribution window and the training window
are part of it). Last, the round trip of one 4,096-sample message (produce -> consume), p50 and
p99. Prints a JSON object as its last line.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the local broker the tests use

from kafka_broker import KafkaBroker  # noqa: E402
from minutely.cli import parse_override  # noqa: E402
from minutely.clock import ReplayClock  # noqa: E402
from minutely.config import Config, load_config, merge_tables  # noqa: E402
from minutely.data import encode_batch, samples_to_record_batch  # noqa: E402
from minutely.data.samples import Sample  # noqa: E402
from minutely.pipeline.join_service import JoinService  # noqa: E402
from minutely.pipeline.services import tune_gc  # noqa: E402
from minutely.pipeline.sim_service import SimulateService  # noqa: E402
from minutely.pipeline.train_service import TrainService, read_audit_lags  # noqa: E402
from minutely.schema import default_schema  # noqa: E402
from minutely.stream import Log, open_log  # noqa: E402

GOAL_JOIN_EPS = 100_000


def config(impressions: int, backend: str, bootstrap: str | None) -> tuple[Config, list[str]]:
    sets = [
        f"sim.impressions_per_day={impressions}",
        "demo.corrupt_every=0",
        "export.min_samples=1000",
        "train.checkpoint_every_windows=12",
    ]
    if backend == "kafka":
        sets += ['stream.backend="kafka"', f'stream.bootstrap_servers="{bootstrap}"']
    overrides: dict[str, Any] = {}
    for item in sets:
        overrides = merge_tables(overrides, parse_override(item))
    return load_config(None, overrides), sets


def replay(cfg: Config, run: Path, days: float) -> dict[str, Any]:
    """The three stages one after the other over ``days`` of traffic, each timed whole."""
    log = open_log(cfg.stream, run)
    try:
        t0 = time.perf_counter()
        sim = SimulateService(cfg, log, run, ReplayClock(0), days=days)
        sim.run(threading.Event())
        t_sim = time.perf_counter() - t0
        events = sim.source.produced

        gc.collect()
        t0 = time.perf_counter()
        join = JoinService(cfg, log, run, checkpoint_every_s=30.0)
        joined = 0
        while True:  # the group may take a moment to assign; stop once caught up
            n = join.step(0.05)
            joined += n
            if n == 0 and join.parts and join.lag() == 0:
                break
        join.close()
        t_join = time.perf_counter() - t0

        gc.collect()
        t0 = time.perf_counter()
        train = TrainService(cfg, cfg.models[0].name, run, log)
        windows = 0
        while train.step(0.5) is not None:
            windows += 1
        train.checkpoint()
        train.close()
        t_train = time.perf_counter() - t0
        samples = train.trainer.samples_seen
    finally:
        log.close()
    return {
        "events": events,
        "simulate_s": round(t_sim, 3),
        "join_s": round(t_join, 3),
        "join_events_per_s": round(joined / t_join),
        "train_s": round(t_train, 3),
        "train_windows": windows,
        "train_samples": samples,
        "train_samples_per_s": round(samples / t_train),
        "replay_speed": round(days * 86_400 / (t_sim + t_join + t_train), 1),
    }


def live(sets: list[str], run: Path, hours: float, rate: float) -> dict[str, Any]:
    """The services as processes, the simulator paced at ``rate``; lag from the audit."""
    common = ["--run-dir", str(run)]
    for item in sets:
        common += ["--set", item]
    me = [sys.executable, "-m", "minutely.cli"]
    names = {
        "simulate": ["simulate", "--days", str(hours / 24), "--rate", str(rate)],
        "join": ["join"],
        "train": ["train", "--model", "ctr", "--audit"],
    }
    run.mkdir(parents=True, exist_ok=True)
    procs = {}
    for name, args in names.items():
        out = (run / f"{name}.out").open("wb")
        procs[name] = subprocess.Popen([*me, *args, *common], stdout=out, stderr=subprocess.STDOUT)
    try:
        procs["simulate"].wait(timeout=hours * 3600 / rate + 120)
        time.sleep(5 + 900 / rate)  # the last windows' attribution wait, in wall time
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            p.wait(30)
    wall0, sim0 = json.loads((run / "status" / "simulate.json").read_text())["pace_origin"]
    window = 300_000
    lags = []
    for ev_ts, trained_at in read_audit_lags(run / "audit" / "ctr"):
        # The simulator writes window [t, t + w) once the clock reaches the window's end.
        appended = wall0 + ((ev_ts - ev_ts % window) + window - sim0) / rate
        lags.append((trained_at - appended) / 1000)
    if not lags:
        return {"rate": rate, "samples": 0}
    arr = np.array(lags)
    return {
        "rate": rate,
        "samples": len(lags),
        "lag_wall_s_p50": round(float(np.percentile(arr, 50)), 2),
        "lag_wall_s_p99": round(float(np.percentile(arr, 99)), 2),
        "lag_sim_s_p50": round(float(np.percentile(arr, 50)) * rate),
        "lag_sim_s_p99": round(float(np.percentile(arr, 99)) * rate),
    }


def round_trip(log: Log, trips: int) -> dict[str, Any]:
    """Produce one 4,096-sample message and consume it back, ``trips`` times."""
    schema = default_schema()
    feats: dict[str, int | float | list[int]] = {
        f.name: (3 if f.kind == "sparse" else [1, 2, 3] if f.kind == "multi_sparse" else 0.5)
        for f in schema.features
    }
    samples = [Sample(i, 1_000 + i, 2_000 + i, i % 2, False, -1, feats) for i in range(4096)]
    payload = encode_batch(samples_to_record_batch(samples, schema))
    topic = f"roundtrip-{os.getpid()}-{time.time_ns()}"
    log.create_topic(topic, 1)
    consumer = log.consumer(topic)
    consumer.assign({0: 0})
    times = []
    for i in range(trips):
        t0 = time.perf_counter()
        log.append(topic, [(None, payload, i + 1)], partition=0)
        got: list[Any] = []
        while not got:
            got = consumer.poll(1, 1.0)
        times.append(time.perf_counter() - t0)
    consumer.close()
    ms = sorted(t * 1000 for t in times)
    return {
        "message_bytes": len(payload),
        "round_trip_ms_p50": round(statistics.median(ms), 2),
        "round_trip_ms_p99": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 2),
    }


def main() -> None:
    tune_gc()  # as the services do when they start
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--impressions-per-day", type=int)
    ap.add_argument("--days", type=float, help="simulated days to replay (default 1)")
    ap.add_argument("--backends", default="sqlite,kafka")
    ap.add_argument("--kafka", help="HOST:PORT of a broker to use instead of a local one")
    ap.add_argument("--live-rate", type=float, help="simulated seconds per wall second, live")
    args = ap.parse_args()
    impressions = args.impressions_per_day or (200_000 if args.quick else 1_000_000)
    days = args.days or 1.0
    rate = args.live_rate or (600.0 if args.quick else 120.0)
    live_hours = 2.0 if args.quick else 4.0
    backends = [b for b in args.backends.split(",") if b]
    brokers: list[KafkaBroker] = []

    def fresh_bootstrap() -> str:
        """The broker for one phase: its own local one (new topics), or the one given."""
        if args.kafka:
            return str(args.kafka)
        broker = KafkaBroker(Path(tempfile.mkdtemp(prefix="minutely-bench-broker-")))
        broker.start()
        brokers.append(broker)
        return broker.bootstrap

    out: dict[str, Any] = {"impressions_per_day": impressions, "days": days}
    root = Path(tempfile.mkdtemp(prefix="minutely-bench-pipeline-"))
    try:
        for backend in backends:
            bootstrap = fresh_bootstrap() if backend == "kafka" else None
            cfg, sets = config(impressions, backend, bootstrap)
            res = replay(cfg, root / backend / "replay", days)
            log = open_log(cfg.stream, root / backend / "replay")
            try:
                res["round_trip"] = round_trip(log, 20 if args.quick else 100)
            finally:
                log.close()
            if backend == "kafka" and args.kafka:
                res["live"] = "skipped: the live phase needs empty topics (a local broker)"
            else:
                if backend == "kafka":
                    _, sets = config(impressions, backend, fresh_bootstrap())
                res["live"] = live(sets, root / backend / "live", live_hours, rate)
            out[backend] = res
            print(backend, json.dumps(res), flush=True)
    finally:
        for broker in brokers:
            broker.stop()
        shutil.rmtree(root, ignore_errors=True)
    if "sqlite" in out:
        out["join_goal_events_per_s"] = GOAL_JOIN_EPS
        out["join_goal_met"] = out["sqlite"]["join_events_per_s"] >= GOAL_JOIN_EPS
    print(json.dumps(out))


if __name__ == "__main__":
    main()
