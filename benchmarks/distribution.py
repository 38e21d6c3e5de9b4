"""Distributing a model version to a fleet: peer to peer through a tracker vs from the origin.

Run: ``.venv/bin/python benchmarks/distribution.py [--quick] [--agents N] [--mib M]``.
The origin is a local S3 endpoint (moto's server, started as the tests start it and stopped by
PID); every agent is a ``python -m minutely.fleet.agent`` process on 127.0.0.1 with a cache and
a local registry of its own, polling the origin; all agents are one region. A model of ``M`` MiB
of float32 embeddings (256 by default, rows of 64) is published signed with a fresh key, in
turn under three model names, each once its agents are up:

* ``single``: one agent, no tracker: the single-transfer time;
* ``peer``: ``N`` agents (16 with ``--quick``, 64 otherwise) and a tracker process; then a
  delta of that version (``--delta-rows`` of the rows changed, 1% by default) published with
  ``delta_from``;
* ``origin``: ``N`` agents without a tracker, every one pulling from the origin.

Per phase: the bytes the origin served (summed from the agents' own counts of what they read
with ``read_range``) in model copies, the time from the publish (the manifest written) to the
last agent's install (also the median and the first agent), and the CPU seconds the agents
spent meanwhile (median per agent, and all of them over the machine's cores: a floor for the
phase's time on this machine). A phase of every agent pulling from the origin that outlasts
``--origin-timeout`` reports how many agents were live and what the origin had served by then.
Goals reported as met or not: the origin serves at most 1.5
copies per region in peer mode, and every agent is live within 3x the single-transfer time.
Every agent runs on the same machine, so the fleet's transfers, hashing and installs share its
cores: the time goal is a goal for one host per agent.

Chunks are 4 MiB (``--chunk-mib``), 16 MiB with ``--quick``: moto's server reads the whole
object for every range request (about 120 ms for a 256 MiB object, whatever the range), so
the origin's time per chunk, unlike a real object store's, does not shrink with the chunk, and
sixteen agents pulling 4 MiB chunks from it take minutes. Prints one JSON object as its last
line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the S3 endpoint the tests use

from minutely.procs import spawn_child  # noqa: E402
from minutely.registry import Manifest, Registry, Signer  # noqa: E402
from minutely.schema import default_schema  # noqa: E402
from s3_server import REGION, S3Server, new_bucket, s3_storage_options  # noqa: E402

GOAL_ORIGIN_COPIES = 1.5
GOAL_TIME_OVER_SINGLE = 3.0
DIM = 64


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Proc:
    """A child process (tracker or agent) that writes its port to a file once listening."""

    def __init__(self, name: str, argv: list[str], work: Path) -> None:
        self.name = name
        self.port_file = work / f"{name}.port"
        self.log_path = work / f"{name}.log"
        with self.log_path.open("ab") as out:
            self.proc = spawn_child(
                [*argv, "--port", "0", "--port-file", str(self.port_file)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{tail}")
        return self.port_file.exists() and bool(self.port_file.read_text().strip())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{int(self.port_file.read_text())}"

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the process used so far (0 where /proc is absent)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_ready(procs: list[Proc], timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    for p in procs:
        while not p.ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{p.name} did not listen within {timeout_s} s")
            time.sleep(0.05)


def start_agents(
    n: int,
    *,
    prefix: str,
    model: str,
    work: Path,
    origin: str,
    options: list[str],
    public_key: Path,
    tracker: str | None,
    poll_interval: float,
    max_transfers: int,
) -> list[Proc]:
    agents = []
    for i in range(n):
        name = f"{prefix}{i:03d}"
        argv = [
            *(sys.executable, "-m", "minutely.fleet.agent", "--origin", origin),
            *(a for o in options for a in ("--origin-option", o)),
            *("--cache", str(work / name / "cache")),
            *("--local-registry", str(work / name / "registry")),
            *("--region", "bench", "--model", model, "--public-key", str(public_key)),
            *("--peer-id", name, "--poll-interval", str(poll_interval)),
            *("--max-transfers", str(max_transfers), "--log-level", "warning"),
            *(("--tracker", tracker) if tracker is not None else ()),
        ]
        agents.append(Proc(name, argv, work))
    wait_ready(agents)
    return agents


def wait_installed(
    agents: list[Proc], model: str, version: str, timeout_s: float, *, partial: bool = False
) -> list[dict[str, Any]]:
    """Each agent's status for ``model`` once every agent has installed ``version``; with
    ``partial``, the statuses at the deadline when some have not (RuntimeError otherwise)."""
    deadline = time.monotonic() + timeout_s
    pending = {a.name: a for a in agents}
    done: dict[str, dict[str, Any]] = {}
    with httpx.Client(timeout=10) as client:
        while pending:
            for name, a in list(pending.items()):
                a.ready()  # raises if it died
                try:
                    doc = client.get(f"{a.url}/v1/status").json()["models"][model]
                except httpx.TransportError:
                    continue  # a busy agent dropped the connection: asked again next round
                if version in doc["installed"] and doc["fetches"].get(version, {}).get("installed"):
                    done[name] = doc
                    del pending[name]
            if pending:
                if time.monotonic() > deadline and partial:
                    for name, a in pending.items():
                        with contextlib.suppress(httpx.TransportError):
                            doc = client.get(f"{a.url}/v1/status").json()["models"][model]
                            done[name] = doc
                    return [done[a.name] for a in agents if a.name in done]
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{len(pending)} agents did not install {model} {version} within "
                        f"{timeout_s} s: {sorted(pending)[:5]}"
                    )
                time.sleep(0.5)
    return [done[a.name] for a in agents]


def summarize(
    statuses: list[dict[str, Any]],
    version: str,
    published: float,
    copy_bytes: int,
    cpu_s: list[float],
    before: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Times from the publish, what was transferred (``before``: the same agents' statuses
    before this version, whose counters are subtracted) and the agents' CPU seconds."""
    seconds = [
        s["fetches"][version]["installed"] - published
        for s in statuses
        if s["fetches"].get(version, {}).get("installed")
    ]
    live = len(seconds)
    counters = [s["counters"] for s in statuses]
    if before is not None:
        counters = [
            {k: v - b["counters"][k] for k, v in c.items()}
            for c, b in zip(counters, before, strict=True)
        ]
    origin_bytes = sum(c["bytes_from_origin"] for c in counters)
    return {
        "live": live,
        "agents": len(statuses),
        "seconds_all": round(max(seconds), 3) if live == len(statuses) else None,
        "seconds_median": round(statistics.median(seconds), 3) if seconds else None,
        "seconds_first": round(min(seconds), 3) if seconds else None,
        "origin_bytes": origin_bytes,
        "origin_copies": round(origin_bytes / copy_bytes, 3),
        "chunks_from_peers": sum(c["chunks_from_peers"] for c in counters),
        "chunks_from_origin": sum(c["chunks_from_origin"] for c in counters),
        "peers_dropped": sum(c["peers_dropped"] for c in counters),
        "refusals": sum(c["refusals"] for c in counters),
        "agent_cpu_s_median": round(statistics.median(cpu_s), 3),
        "agents_cpu_s_over_cores": round(sum(cpu_s) / (os.cpu_count() or 1), 3),
    }


def cpu_since(procs: list[Proc], before: list[float]) -> list[float]:
    return [p.cpu_s() - b for p, b in zip(procs, before, strict=True)]


def publish(reg: Registry, model: str, weights: dict[str, torch.Tensor], **kw: Any) -> Manifest:
    return reg.publish(
        model,
        weights,
        created_ms=int(time.time() * 1000),
        arch="lr",
        model_config={"arch": "lr"},
        schema=default_schema(),
        metrics={"auc": 0.75},
        samples_seen=0,
        **kw,
    )


def version_bytes(m: Manifest) -> int:
    return sum(e.bytes for e in m.files.values())


def report_warnings(procs: list[Proc], phase: str) -> int:
    """Log the warnings and errors the processes logged (the first few); how many there were."""
    lines = []
    for p in procs:
        try:
            text = p.log_path.read_text(errors="replace")
        except OSError:
            continue
        lines += [f"{p.name}: {line}" for line in text.splitlines() if " WARNING " in line]
        lines += [f"{p.name}: {line}" for line in text.splitlines() if " ERROR " in line]
    for line in lines[:10]:
        log(f"{phase}: {line[:300]}")
    return len(lines)


def stop_all(procs: list[Proc], grace_s: float = 30.0) -> None:
    """SIGTERM to every process, then SIGKILL to those still running after ``grace_s`` in all
    (an agent blocked on an overloaded origin's read may not stop at once)."""
    for p in procs:
        if p.proc.poll() is None:
            os.kill(p.proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.kill(p.proc.pid, signal.SIGKILL)
            p.proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 agents instead of 64")
    parser.add_argument("--agents", type=int, help="agents per fleet (default 64, 16 --quick)")
    parser.add_argument("--mib", type=float, default=256.0, help="model size in MiB")
    parser.add_argument(
        "--chunk-mib", type=float, help="chunk size in MiB (default 4, 16 with --quick)"
    )
    parser.add_argument("--delta-rows", type=float, default=0.01, help="share of rows changed")
    parser.add_argument("--max-transfers", type=int, default=4)
    parser.add_argument(
        "--poll-interval",
        type=float,
        help="agents' origin poll, seconds (default: 0.5, or agents/32 when larger, so that the "
        "polls of a large fleet do not saturate the single S3 server process)",
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="per phase, seconds")
    parser.add_argument(
        "--origin-timeout",
        type=float,
        help="how long the every-agent-from-the-origin phase may take (default --timeout); "
        "what the agents had by then is reported when not all are live",
    )
    parser.add_argument("--workdir", type=Path, help="where agents keep files (default: a tmp)")
    args = parser.parse_args()
    n = args.agents if args.agents is not None else (16 if args.quick else 64)
    poll = args.poll_interval if args.poll_interval is not None else max(0.5, n / 32)
    torch.set_num_threads(1)

    work = Path(tempfile.mkdtemp(prefix="minutely-distribution-", dir=args.workdir))
    s3 = S3Server()
    procs: list[Proc] = []
    try:
        s3.start()
        bucket = new_bucket(s3.endpoint, "distribution")
        url = f"s3://{bucket}/registry"
        options = [
            "key=x",
            "secret=x",
            f"client_kwargs.endpoint_url={s3.endpoint}",
            f"client_kwargs.region_name={REGION}",
        ]
        signer = Signer.generate()
        public_key = work / "publisher.pub"
        public_key.write_bytes(signer.public_key_pem())
        chunk_mib = args.chunk_mib if args.chunk_mib is not None else (16 if args.quick else 4)
        chunk_bytes = int(chunk_mib * (1 << 20))
        origin = Registry(
            url,
            storage_options=s3_storage_options(s3.endpoint),
            signer=signer,
            chunk_bytes=chunk_bytes,
        )
        rows = int(args.mib * (1 << 20)) // (4 * DIM)
        gen = torch.Generator().manual_seed(0)
        weights = {"emb": torch.randn(rows, DIM, generator=gen), "bias": torch.zeros(1)}
        common = {
            "work": work,
            "origin": url,
            "options": options,
            "public_key": public_key,
            "poll_interval": poll,
            "max_transfers": args.max_transfers,
        }
        result: dict[str, Any] = {
            "agents": n,
            "regions": 1,
            "chunk_bytes": chunk_bytes,
            "poll_interval_s": poll,
        }

        # one agent alone, from the origin
        log("single: starting 1 agent")
        single = start_agents(1, prefix="single", model="single", tracker=None, **common)
        procs += single
        t = time.time()
        cpu = [p.cpu_s() for p in single]
        m = publish(origin, "single", weights)
        published = time.time()
        log(f"single: published {version_bytes(m)} bytes in {published - t:.1f} s")
        copy_bytes = version_bytes(m)
        result["model_bytes"] = copy_bytes
        result["publish_s"] = round(published - t, 3)
        statuses = wait_installed(single, "single", m.version, args.timeout)
        result["single"] = summarize(
            statuses, m.version, published, copy_bytes, cpu_since(single, cpu)
        )
        single_s = result["single"]["seconds_all"]
        log(f"single: {single_s:.2f} s")
        result["single"]["warnings"] = report_warnings(single, "single")
        stop_all(single)
        shutil.rmtree(work / "single000", ignore_errors=True)

        # peer to peer through a tracker, then a delta
        log(f"peer: starting a tracker and {n} agents")
        tracker = Proc(
            "tracker",
            [sys.executable, "-m", "minutely.fleet.tracker", "--log-level", "warning"],
            work,
        )
        procs.append(tracker)
        wait_ready([tracker])
        agents = start_agents(n, prefix="peer", model="peer", tracker=tracker.url, **common)
        procs += agents
        cpu = [p.cpu_s() for p in agents]
        m = publish(origin, "peer", weights)
        published = time.time()
        statuses = wait_installed(agents, "peer", m.version, args.timeout)
        result["peer"] = summarize(
            statuses, m.version, published, copy_bytes, cpu_since(agents, cpu)
        )
        log(f"peer: {json.dumps(result['peer'])}")
        changed = max(1, int(rows * args.delta_rows))
        new = {k: v.clone() for k, v in weights.items()}
        idx = torch.randperm(rows, generator=gen)[:changed]
        new["emb"][idx] += 0.01
        cpu = [p.cpu_s() for p in agents]
        d = publish(origin, "peer", new, delta_from=(m.version, weights))
        published = time.time()
        del new
        delta_bytes = version_bytes(d)
        before = statuses
        statuses = wait_installed(agents, "peer", d.version, args.timeout)
        delta = summarize(
            statuses, d.version, published, delta_bytes, cpu_since(agents, cpu), before
        )
        delta["is_delta"] = d.delta_of is not None
        delta["delta_bytes"] = delta_bytes
        result["delta"] = delta
        result["delta_over_full_bytes"] = round(delta_bytes / copy_bytes, 5)
        log(f"delta: {json.dumps(delta)}")
        result["peer"]["warnings"] = report_warnings([*agents, tracker], "peer")
        stop_all([*agents, tracker])
        for a in agents:
            shutil.rmtree(work / a.name, ignore_errors=True)

        # every agent from the origin
        log(f"origin: starting {n} agents without a tracker")
        agents = start_agents(n, prefix="origin", model="origin", tracker=None, **common)
        procs += agents
        cpu = [p.cpu_s() for p in agents]
        m = publish(origin, "origin", weights)
        published = time.time()
        statuses = wait_installed(
            agents, "origin", m.version, args.origin_timeout or args.timeout, partial=True
        )
        result["origin_only"] = summarize(
            statuses, m.version, published, copy_bytes, cpu_since(agents, cpu)
        )
        log(f"origin: {json.dumps(result['origin_only'])}")
        result["origin_only"]["warnings"] = report_warnings(agents, "origin")
        stop_all(agents)

        peer, only = result["peer"], result["origin_only"]
        result["peer_over_single"] = round(peer["seconds_all"] / single_s, 3)
        if only["seconds_all"] is not None:
            result["origin_only_over_single"] = round(only["seconds_all"] / single_s, 3)
            ratio = peer["seconds_all"] / only["seconds_all"]
            result["peer_over_origin_only_time"] = round(ratio, 3)
        result["goals"] = {
            "origin_copies_per_region_le_1_5": peer["origin_copies"] <= GOAL_ORIGIN_COPIES,
            "all_live_within_3x_single": peer["seconds_all"] <= GOAL_TIME_OVER_SINGLE * single_s,
        }
        result["cores"] = os.cpu_count()
    finally:
        stop_all(procs)
        s3.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
