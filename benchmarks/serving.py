"""Serving latency under an open-loop load: today's path against minutely's best, with swaps.

Run: ``.venv/bin/python benchmarks/serving.py [--quick]``.

Each configuration gets a registry holding a DeepFM of the default
:class:`~minutely.config.ModelConfig` on :func:`~minutely.schema.default_schema` (random weights)
and a real server process on it (``python -m minutely.serve``), started once. A load generator
in another process (this script's ``_loadgen`` mode: asyncio, raw HTTP/1.1 on keep-alive
connections) sends ``--candidates``-instance predict requests at a fixed rate: request ``i`` is
due at ``start + i / rate`` whatever the answers before it did (an open loop). A send more than
``LATE_MS`` after its due time is counted late; a new connection is opened whenever every open
one is busy (one idle for ``IDLE_CLOSE_S`` is closed rather than reused, before the server's
keep-alive timeout closes it under a request). Latency runs from the due time to the last byte
of the answer, so a slow server is not excused by a client that sent late; ``send_p99_ms``
(from the actual send) is reported too. A request fails on a connection error, a status other
than 200, or a wrong number of predictions. Each window starts with ``WARMUP_S`` of the same
load, not measured. ``server_cpu_ms_per_request`` is the CPU time of the server's processes
during a window divided by the requests answered.

Scenarios, in turns (``--rounds`` windows each):

* ``baseline``: 1 worker, ``{"instances": [...]}`` JSON bodies, no batching (today's path);
* ``best``: ``--workers`` workers, the ``--body`` body (``columns`` JSON or ``arrow``), batching
  (``--batch-max-rows``, ``--batch-max-wait-ms``);
* ``baseline_swaps``, ``best_swaps``: the same while this process publishes a new version of the
  model (new weights) into that server's registry every ``--swap-every-s`` seconds (the first
  2 s into the window), which every worker loads, warms up and swaps in.

Goals: p99 <= 20 ms at 300 req/s for ``best``; no failed request during swaps. A scenario's
figures are medians over its windows (counts are summed); ratios compare scenarios of the same
run. The machine's 1-minute load average before and after is reported: other processes on the
same cores slow every window, and not always equally. Prints a JSON object as its last line.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

LATE_MS = 2.0
WARMUP_S = 2.0
IDLE_CLOSE_S = 3.0  # below uvicorn's keep-alive timeout (5 s)
GOAL_P99_MS = 20.0


# --- the load generator (its own process) ------------------------------------------------------


@dataclasses.dataclass
class _Stats:
    latencies: list[float] = dataclasses.field(default_factory=list)
    send_latencies: list[float] = dataclasses.field(default_factory=list)
    late: int = 0
    failed: int = 0
    errors: dict[str, int] = dataclasses.field(default_factory=dict)
    versions: set[str] = dataclasses.field(default_factory=set)

    def fail(self, why: str) -> None:
        self.failed += 1
        self.errors[why] = self.errors.get(why, 0) + 1


async def _load(
    port: int, request: bytes, rate: float, duration_s: float, expected: int
) -> dict[str, Any]:
    import msgspec

    loop = asyncio.get_running_loop()
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
    decoder = msgspec.json.Decoder()
    opened = [0]

    async def connection() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        while idle:
            reader, writer, last = idle.pop()
            if loop.time() - last < IDLE_CLOSE_S:
                return reader, writer
            writer.close()  # the server may be closing it (keep-alive timeout): not reused
        opened[0] += 1
        return await asyncio.open_connection("127.0.0.1", port)

    async def one(due: float, stats: _Stats | None) -> None:
        sent = loop.time()
        try:
            reader, writer = await connection()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            body = await reader.readexactly(length)
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            if stats is not None:
                stats.fail(type(exc).__name__)
            return
        done = loop.time()
        idle.append((reader, writer, done))
        if stats is None:
            return
        if status != 200:
            stats.fail(f"HTTP {status}")
            return
        doc = decoder.decode(body)
        if len(doc.get("predictions", ())) != expected:
            stats.fail("wrong number of predictions")
            return
        stats.versions.add(doc["version"])
        stats.latencies.append((done - due) * 1e3)
        stats.send_latencies.append((done - sent) * 1e3)

    async def phase(seconds: float, stats: _Stats | None) -> float:
        n = int(seconds * rate)
        start = loop.time() + 0.05
        tasks = []
        for i in range(n):
            due = start + i / rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if stats is not None and (loop.time() - due) * 1e3 > LATE_MS:
                stats.late += 1
            tasks.append(loop.create_task(one(due, stats)))
        await asyncio.gather(*tasks)
        return loop.time() - start

    await phase(WARMUP_S, None)
    stats = _Stats()
    elapsed = await phase(duration_s, stats)
    for _, writer, _ in idle:
        writer.close()
    lat = sorted(stats.latencies)
    send = sorted(stats.send_latencies)

    def pct(values: list[float], q: float) -> float | None:
        return round(values[min(len(values) - 1, int(q * len(values)))], 3) if values else None

    return {
        "sent": int(duration_s * rate),
        "ok": len(lat),
        "failed": stats.failed,
        "errors": stats.errors,
        "late_sends": stats.late,
        "achieved_req_per_s": round(len(lat) / elapsed, 1),
        "p50_ms": round(statistics.median(lat), 3) if lat else None,
        "p90_ms": pct(lat, 0.90),
        "p99_ms": pct(lat, 0.99),
        "max_ms": round(lat[-1], 3) if lat else None,
        "send_p99_ms": pct(send, 0.99),
        "connections_opened": opened[0],
        "versions_seen": len(stats.versions),
    }


def _loadgen_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--body", type=Path, required=True)
    p.add_argument("--content-type", required=True)
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--expected", type=int, required=True)
    args = p.parse_args(argv)
    body = args.body.read_bytes()
    head = (
        f"POST /v1/models/ctr:predict HTTP/1.1\r\nHost: 127.0.0.1:{args.port}\r\n"
        f"Content-Type: {args.content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    request = head.encode() + body
    result = asyncio.run(_load(args.port, request, args.rate, args.duration, args.expected))
    print(json.dumps(result))
    return 0


# --- the benchmark ----------------------------------------------------------------------------


def _model_state(seed: int) -> Any:
    import torch

    from minutely.config import ModelConfig
    from minutely.model import build_model
    from minutely.schema import default_schema

    torch.manual_seed(seed)
    model = build_model(ModelConfig(), default_schema())
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return model.flat_state_dict()


def _publish(registry: Any, state: Any, seed: int) -> str:
    from minutely.config import ModelConfig
    from minutely.model.artifact import model_config_doc
    from minutely.schema import default_schema

    cfg = ModelConfig()
    manifest = registry.publish(
        "ctr",
        state,
        created_ms=int(time.time() * 1000),
        arch=cfg.arch,
        model_config=model_config_doc(cfg),
        schema=default_schema(),
        metrics={},
        samples_seen=seed,
    )
    return str(manifest.version)


def _bodies(candidates: int, folder: Path) -> dict[str, tuple[Path, str]]:
    """One request of ``candidates`` instances (one user, several ads) in each body kind."""
    import msgspec

    from minutely.schema import default_schema
    from minutely.serve.codec import ARROW_STREAM, encode_arrow

    schema = default_schema()
    rng = random.Random(7)
    user = {"user_id": rng.randrange(10**6), "device": 1, "hour_of_day": 14, "slot": 3}
    interests = [rng.randrange(500) for _ in range(5)]
    instances = []
    for _ in range(candidates):
        inst: dict[str, Any] = {}
        for f in schema.features:
            if f.name in user:
                inst[f.name] = user[f.name]
            elif f.kind == "sparse":
                inst[f.name] = rng.randrange(10**6)
            elif f.kind == "multi_sparse":
                inst[f.name] = interests
            else:
                inst[f.name] = round(rng.random() * 100, 3)
        instances.append(inst)
    columns = {f.name: [inst[f.name] for inst in instances] for f in schema.features}
    out = {}
    for kind, data, media in (
        ("instances", msgspec.json.encode({"instances": instances}), "application/json"),
        ("columns", msgspec.json.encode({"columns": columns}), "application/json"),
        ("arrow", encode_arrow(columns, schema), ARROW_STREAM),
    ):
        path = folder / f"body.{kind}"
        path.write_bytes(data)
        out[kind] = (path, media)
    return out


class _Server:
    def __init__(self, registry: Path, folder: Path, flags: list[str]) -> None:
        from minutely.procs import spawn_child

        self.port_file = folder / "server.port"
        self.port_file.unlink(missing_ok=True)
        self.log = (folder / "server.log").open("ab")
        cmd = [sys.executable, "-m", "minutely.serve", "--registry", str(registry)]
        cmd += ["--model", "ctr", "--port", "0", "--port-file", str(self.port_file)]
        cmd += ["--poll-interval", "0.2", "--log-level", "warning", *flags]
        self.proc = spawn_child(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not (self.port_file.exists() and self.port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not start; see {folder / 'server.log'}")
            time.sleep(0.05)
        self.port = int(self.port_file.read_text())

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the server's processes used so far (Linux)."""
        total = 0.0
        tick = os.sysconf("SC_CLK_TCK")
        pids = [self.proc.pid]
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
            pids += [int(c) for c in children.split()]
            for pid in pids:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, ValueError):
            return float("nan")
        return total

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self.log.closed:
            self.log.close()
        return self.proc.returncode


def _window(
    name: str,
    server: _Server,
    registry: Any,
    body: tuple[Path, str],
    args: argparse.Namespace,
    swap_states: list[Any] | None,
) -> dict[str, Any]:
    """One measured window of load on ``server`` (publishing new versions when given some)."""
    published: list[str] = []
    stop = threading.Event()

    def publisher() -> None:
        assert swap_states is not None
        first = WARMUP_S + min(2.0, args.swap_every_s / 2)
        for i, state in enumerate(swap_states):
            if stop.wait(args.swap_every_s if i else first):
                return
            published.append(_publish(registry, state, 1000 + i))

    thread = threading.Thread(target=publisher, daemon=True) if swap_states else None
    cmd = [sys.executable, __file__, "_loadgen", "--port", str(server.port)]
    cmd += ["--body", str(body[0]), "--content-type", body[1]]
    cmd += ["--rate", str(args.rate), "--duration", str(args.duration)]
    cmd += ["--expected", str(args.candidates)]
    cpu_before = server.cpu_s()
    try:
        if thread is not None:
            thread.start()
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    finally:
        stop.set()
        if thread is not None:
            thread.join()
    cpu = server.cpu_s() - cpu_before
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    # Warm-up and measured window together: the server's CPU per request answered.
    answered = result["ok"] + int(WARMUP_S * args.rate)
    result["server_cpu_ms_per_request"] = round(cpu * 1e3 / answered, 3)
    result["published"] = len(published)
    print(f"{name}: {json.dumps(result)}", file=sys.stderr, flush=True)
    return result


def _summary(windows: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over a scenario's windows (sums for counts), and the windows themselves."""
    out: dict[str, Any] = {}
    for key in ("p50_ms", "p90_ms", "p99_ms", "max_ms", "send_p99_ms", "achieved_req_per_s"):
        values = [w[key] for w in windows if w[key] is not None]
        out[key] = round(statistics.median(values), 3) if values else None
    out["server_cpu_ms_per_request"] = round(
        statistics.median(w["server_cpu_ms_per_request"] for w in windows), 3
    )
    for key in ("sent", "ok", "failed", "late_sends", "published"):
        out[key] = sum(w[key] for w in windows)
    out["versions_seen"] = max(w["versions_seen"] for w in windows)
    out["windows"] = windows
    return out


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_loadgen":
        return _loadgen_main(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="3 rounds of 7 s windows")
    p.add_argument("--duration", type=float, help="seconds of load per window")
    p.add_argument("--rounds", type=int, help="windows per scenario, taken in turns")
    p.add_argument("--rate", type=float, default=300.0, help="requests per second")
    p.add_argument("--candidates", type=int, default=100, help="instances per request")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--body", choices=["columns", "arrow"], default="arrow")
    p.add_argument("--batch-max-rows", type=int, default=1024)
    p.add_argument("--batch-max-wait-ms", type=float, default=0.0)
    p.add_argument("--swap-every-s", type=float, default=10.0)
    p.add_argument(
        "--scenarios",
        default="baseline,best,baseline_swaps,best_swaps",
        help="comma-separated subset of the scenarios",
    )
    args = p.parse_args()
    if args.duration is None:
        args.duration = 7.0 if args.quick else 30.0
    if args.rounds is None:
        args.rounds = 3
    names = args.scenarios.split(",")

    from minutely.registry import Registry

    folder = Path(tempfile.mkdtemp(prefix="minutely-serving-bench-"))
    servers: dict[str, _Server] = {}
    try:
        bodies = _bodies(args.candidates, folder)
        first = _model_state(0)
        n_swaps = int(args.duration // args.swap_every_s) + 1
        best_flags = ["--workers", str(args.workers)]
        best_flags += ["--batch-max-rows", str(args.batch_max_rows)]
        best_flags += ["--batch-max-wait-ms", str(args.batch_max_wait_ms)]
        # One server (and registry) per configuration, started once: a window's swaps reach
        # only the server it measures.
        setups = {
            "baseline": (["--batch-max-rows", "0"], bodies["instances"]),
            "best": (best_flags, bodies[args.body]),
        }
        registries = {}
        for kind, (flags, _) in setups.items():
            if not any(n.split("_")[0] == kind for n in names):
                continue
            sub = folder / kind
            sub.mkdir()
            registries[kind] = Registry(sub / "registry")
            _publish(registries[kind], first, 0)
            servers[kind] = _Server(registries[kind].root, sub, flags)
        load_before = os.getloadavg()[0]
        windows: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        seed = 100
        for _ in range(args.rounds):
            for name in names:
                kind = name.split("_")[0]
                states = None
                if name.endswith("_swaps"):
                    states = [_model_state(seed + i) for i in range(n_swaps)]
                    seed += n_swaps
                windows[name].append(
                    _window(name, servers[kind], registries[kind], setups[kind][1], args, states)
                )
        load_after = os.getloadavg()[0]
        exits = {kind: server.stop() for kind, server in servers.items()}
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(folder, ignore_errors=True)
    scenarios = {name: _summary(w) for name, w in windows.items()}

    def ratio(a: str, b: str, key: str) -> float | None:
        x, y = scenarios.get(a, {}).get(key), scenarios.get(b, {}).get(key)
        return round(x / y, 3) if x and y else None

    best = scenarios.get("best", {})
    swaps_failed = sum(s["failed"] for n, s in scenarios.items() if n.endswith("_swaps"))
    result = {
        "rate_req_per_s": args.rate,
        "candidates": args.candidates,
        "window_s": args.duration,
        "rounds": args.rounds,
        "workers": args.workers,
        "body": args.body,
        "batch_max_rows": args.batch_max_rows,
        "batch_max_wait_ms": args.batch_max_wait_ms,
        "cores": os.cpu_count(),
        "load_avg_1m": [round(load_before, 2), round(load_after, 2)],
        "server_exit_codes": exits,
        "scenarios": scenarios,
        "best_p99_over_baseline": ratio("best", "baseline", "p99_ms"),
        "best_p50_over_baseline": ratio("best", "baseline", "p50_ms"),
        "best_cpu_over_baseline": ratio("best", "baseline", "server_cpu_ms_per_request"),
        "best_p99_ms": best.get("p99_ms"),
        "goal_p99_ms": GOAL_P99_MS,
        "goal_p99_met": best.get("p99_ms") is not None and best["p99_ms"] <= GOAL_P99_MS,
        "failed_during_swaps": swaps_failed,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
