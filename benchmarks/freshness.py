"""Freshness: from a sample's label becoming final to a model that learned it answering everywhere.

The whole topology runs live on the wall clock, as ``minutely up --live --rate 1 --servers N``
starts it: the simulator writes impressions, clicks and conversions at a fixed rate; the join
labels each impression when its attribution window closes (``emit_ts_ms``: the moment its label
is final) and releases it once its watermark, 5 s behind the newest event (the simulator writes
in time order), has passed; the trainer trains 5-second windows and exports every minute (the
gate on); the registry is an S3 origin (moto's server on 127.0.0.1, through s3fs) whose new
versions reach the N servers through their distribution agents and the region's tracker; every
server's workers hot-swap to each version.

The benchmark polls every server's ``GET /v1/models/ctr`` and records when each version first
answers there. A sample stamped by the join at ``t`` is learned by the first version whose
``created_ms`` (the end of the last trained window) is after ``t``; its freshness is the time
that version answered on the last of the servers minus the sample's ``emit_ts_ms``. Event times
come from the live simulator, whose events are stamped with the wall clock (within one
simulator window). Also reported: label final to released by the join, released to the end of
the window of the version that learned it, and per version export (``created_ms``) to published
(the announcement's send time) and published to live on every server.

Goal: p50 <= 60 s.

    python benchmarks/freshness.py --quick      # 3 servers, 5 minutes
    python benchmarks/freshness.py              # 8 servers, 15 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the S3 endpoint the tests use

from minutely.config import load_config  # noqa: E402
from minutely.data import decode_batch  # noqa: E402
from minutely.errors import CodecError  # noqa: E402
from minutely.pipeline.origin import decode_announcement, reader_registry  # noqa: E402
from minutely.procs import spawn_child  # noqa: E402
from minutely.schema import default_schema  # noqa: E402
from minutely.stream import open_log  # noqa: E402
from s3_server import REGION, S3Server, new_bucket  # noqa: E402

GOAL_P50_S = 60.0


def config_text(endpoint: str, bucket: str, per_s: float) -> str:
    return f"""
[sim]
impressions_per_day = {int(per_s * 86_400)}
[join]
allowed_lateness_s = 5
[train]
window_s = 5
[export]
every_min = 1
min_samples = 100
min_trained_min = 0
[registry]
uri = "s3://{bucket}/registry"
chunk_kib = 1024
[registry.storage_options]
key = "x"
secret = "x"
"client_kwargs.endpoint_url" = "{endpoint}"
"client_kwargs.region_name" = "{REGION}"
[fleet]
poll_interval_s = 2.0
max_transfers = 4
[serve]
poll_interval_s = 0.1
[[models]]
name = "ctr"
label = "click"
attribution_window_s = 30
correction_horizon_s = 600
"""


def poll_servers(run: Path, names: list[str], seen: dict[str, dict[str, float]]) -> None:
    """Record, per server, when each version first answered there (epoch seconds)."""
    for name in names:
        port_file = run / f"{name}.port"
        try:
            port = port_file.read_text().strip()
        except FileNotFoundError:
            continue
        if not port:
            continue
        try:
            r = httpx.get(f"http://127.0.0.1:{port}/v1/models/ctr", timeout=1.0)
        except httpx.HTTPError:
            continue
        if r.status_code != 200:
            continue
        version = r.json().get("version")
        if version is not None:
            seen.setdefault(name, {}).setdefault(version, time.time())


def sample_times(run: Path) -> list[tuple[int, int]]:
    """(join stamp ms, emit_ts_ms) of every sample the join released to the ctr topic."""
    cfg = load_config(None)
    schema = default_schema()
    log = open_log(cfg.stream, run)
    out: list[tuple[int, int]] = []
    try:
        topic = cfg.model("ctr").samples_topic
        for p in range(log.partitions(topic)):
            offset = 0
            while True:
                records = log.read(topic, p, offset, 1_000)
                if not records:
                    break
                for r in records:
                    offset = r.offset + 1
                    if not r.value:
                        continue  # a watermark message
                    try:
                        rb = decode_batch(r.value, schema)
                    except CodecError:
                        continue  # dead-lettered by the trainer as well
                    for emit in rb.column("emit_ts_ms").to_pylist():
                        out.append((r.ts_ms, int(emit)))
    finally:
        log.close()
    return out


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--servers", type=int)
    ap.add_argument("--minutes", type=float)
    ap.add_argument("--impressions-per-s", type=float, default=40.0)
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args()
    servers = args.servers or (3 if args.quick else 8)
    minutes = args.minutes or (5.0 if args.quick else 15.0)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="minutely-freshness-"))
    work.mkdir(parents=True, exist_ok=True)
    run = work / "run"
    s3 = S3Server()
    s3.start()
    up: subprocess.Popen[bytes] | None = None
    seen: dict[str, dict[str, float]] = {}
    names = [f"serve-{i}" for i in range(servers)] if servers > 1 else ["serve"]
    try:
        bucket = new_bucket(s3.endpoint, "fresh")
        cfg_path = work / "freshness.toml"
        cfg_path.write_text(config_text(s3.endpoint, bucket, args.impressions_per_s))
        cmd = [sys.executable, "-m", "minutely.cli", "up", "--config", str(cfg_path)]
        cmd += ["--run-dir", str(run), "--live", "--rate", "1", "--joiners", "1"]
        cmd += ["--servers", str(servers)]
        with (work / "up.log").open("wb") as out:
            up = spawn_child(cmd, stdout=out, stderr=subprocess.STDOUT)
            t_end = time.time() + minutes * 60
            print(f"freshness: {servers} servers for {minutes:g} min; logs in {work}", flush=True)
            while time.time() < t_end:
                if up.poll() is not None:
                    raise SystemExit(f"minutely up exited with {up.returncode}; see {work}")
                poll_servers(run, names, seen)
                time.sleep(0.2)
            up.send_signal(signal.SIGINT)
            up.wait(120)
        cfg = load_config(cfg_path)
        registry = reader_registry(cfg, run)
        created = {v: registry.manifest("ctr", v).created_ms for v in registry.versions("ctr")}
        published: dict[str, float] = {}
        log = open_log(cfg.stream, run)
        try:
            for r in log.read(cfg.registry.announce_topic, 0, 0, 100_000):
                a = decode_announcement(r.value)
                if a.version is not None:
                    published.setdefault(a.version, a.sent_ms / 1000)
        finally:
            log.close()
        everywhere = {
            v: max(seen[n][v] for n in names)
            for v in created
            if all(v in seen.get(n, {}) for n in names)
        }
        order = sorted(everywhere, key=lambda v: created[v])
        fresh: list[float] = []
        released: list[float] = []  # label final -> released by the join
        waited: list[float] = []  # released -> the end of the window of the version learning it
        unserved = 0
        samples = sample_times(run)
        for stamp, emit in samples:
            v = next((v for v in order if created[v] > stamp), None)
            if v is None:
                unserved += 1
                continue
            fresh.append(everywhere[v] - emit / 1000)
            released.append((stamp - emit) / 1000)
            waited.append((created[v] - stamp) / 1000)
        distribute = [everywhere[v] - published[v] for v in order if v in published]
        export_to_publish = [published[v] - created[v] / 1000 for v in order if v in published]
        p50 = pct(fresh, 50)
        result: dict[str, Any] = {
            "benchmark": "freshness",
            "quick": args.quick,
            "servers": servers,
            "minutes": minutes,
            "impressions_per_s": args.impressions_per_s,
            "versions_published": len(created),
            "versions_live_everywhere": len(everywhere),
            "samples": len(samples),
            "samples_measured": len(fresh),
            "samples_not_yet_served": unserved,
            "freshness_s": {"p50": p50, "p90": pct(fresh, 90), "p99": pct(fresh, 99)},
            "label_final_to_released_s_median": pct(released, 50),
            "released_to_version_window_end_s_median": pct(waited, 50),
            "export_to_published_s_median": (
                round(statistics.median(export_to_publish), 2) if export_to_publish else None
            ),
            "published_to_live_everywhere_s": {
                "p50": pct(distribute, 50),
                "max": round(max(distribute), 2) if distribute else None,
            },
            "goal_p50_s": GOAL_P50_S,
            "goal_met": p50 is not None and p50 <= GOAL_P50_S,
            "workdir": str(work),
        }
        if not fresh:
            result["error"] = "no sample was learned by a version live on every server"
    finally:
        if up is not None and up.poll() is None:
            os.kill(up.pid, signal.SIGKILL)
        s3.stop()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
