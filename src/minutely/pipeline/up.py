"""``minutely up``: the whole topology on this machine, as child processes.

One ``simulate``, ``joiners`` join processes (one consumer group), one ``train`` per model and
``servers`` inference servers, all on the same configuration and run folder; with more than one
server, a tracker too, and each server fetches new versions through its distribution agent from
its peers (one region on this machine). The run's signing keys are made before anything starts.
Every child dies with its parent (see :mod:`minutely.procs`), writes its output to
``<run>/logs/<name>.log`` and its status to ``<run>/status/<name>.json``; ``up`` prints one
status line per service while they run. Ctrl-C (or SIGTERM) stops them all: each gets SIGTERM,
checkpoints and exits; one that has not exited after ``grace_s`` is killed (it resumes from its
last checkpoint next time).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from minutely.config import Config
from minutely.pipeline.origin import ensure_keys
from minutely.pipeline.services import read_statuses
from minutely.procs import spawn_child, wait_for_port_file


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: IO[bytes]


def serve_names(servers: int) -> list[str]:
    """The names of ``servers`` inference servers: ``serve``, or ``serve-0``, ``serve-1``..."""
    return ["serve"] if servers == 1 else [f"serve-{i}" for i in range(servers)]


def topology(
    cfg: Config,
    joiners: int,
    common: Sequence[str],
    sim_args: Sequence[str],
    run_dir: Path,
    *,
    servers: int = 1,
    serve_args: Sequence[str] = (),
) -> list[tuple[str, list[str]]]:
    """(name, argv) of every service ``up`` starts; ``common`` carries the config options and
    ``serve_args`` the servers' extra ones (a tracker's URL)."""
    me = [sys.executable, "-m", "minutely.cli"]
    out = [("simulate", [*me, "simulate", *common, *sim_args])]
    for i in range(joiners):
        out.append((f"join-{i}", [*me, "join", *common, "--name", f"join-{i}"]))
    for m in cfg.models:
        out.append((f"train-{m.name}", [*me, "train", *common, "--model", m.name]))
    for name in serve_names(servers):
        port_file = str(run_dir / f"{name}.port")
        argv = [*me, "serve", *common, *serve_args, "--name", name, "--port-file", port_file]
        out.append((name, argv))
    return out


def status_line(name: str, st: dict[str, Any] | None, proc: subprocess.Popen[bytes]) -> str:
    code = proc.poll()
    state = "running" if code is None else f"exited {code}"
    if st is None:
        return f"{name:<14} {state:<10} starting"
    keys = (
        "url",
        "position_ms",
        "lag",
        "events",
        "samples",
        "windows",
        "last_export",
        "live_version",
        "warm_version",
        "lag_s",
        "samples_per_s",
        "live_version_age_s",
        "rollbacks",
        "exports_refused",
        "dead_letters",
    )
    parts = [f"{k}={st[k]}" for k in keys if k in st and st[k] is not None]
    if "partitions" in st:
        parts.insert(0, f"partitions={st['partitions']}")
    return f"{name:<14} {state:<10} " + " ".join(parts)


def run_up(
    cfg: Config,
    run_dir: Path,
    stop: threading.Event,
    *,
    joiners: int,
    common: Sequence[str],
    sim_args: Sequence[str],
    servers: int = 1,
    echo: Callable[[str], None] = print,
    every_s: float = 2.0,
    grace_s: float = 30.0,
) -> int:
    """Start the topology, print status until ``stop`` or until every child exited; stop all.
    Returns 0 when every child exited cleanly."""
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    ensure_keys(cfg, run_dir)  # before the servers start: they verify with the public key
    children: list[Child] = []
    names = serve_names(servers)
    try:
        for name in names:
            (run_dir / f"{name}.port").unlink(missing_ok=True)
        serve_args: list[str] = []
        if servers > 1 and not cfg.fleet.tracker:
            # One region on this machine: its tracker first, so the servers can name it.
            port_file = run_dir / "tracker.port"
            port_file.unlink(missing_ok=True)
            argv = [sys.executable, "-m", "minutely.cli", "tracker", *common, "--port", "0"]
            argv += ["--host", cfg.serve.host, "--port-file", str(port_file)]
            f = (logs / "tracker.log").open("ab")
            tracker = Child("tracker", spawn_child(argv, stdout=f, stderr=subprocess.STDOUT), f)
            children.append(tracker)
            port = wait_for_port_file(port_file, tracker.proc, "tracker", timeout_s=60.0)
            serve_args = ["--set", f'fleet.tracker="http://{cfg.serve.host}:{port}"']
        for name, argv in topology(
            cfg, joiners, common, sim_args, run_dir, servers=servers, serve_args=serve_args
        ):
            f = (logs / f"{name}.log").open("ab")
            children.append(Child(name, spawn_child(argv, stdout=f, stderr=subprocess.STDOUT), f))
        echo(f"minutely up: {len(children)} services, run folder {run_dir}, logs in {logs}")
        while not stop.wait(every_s):
            statuses = read_statuses(run_dir)
            for name in names:
                port_file = run_dir / f"{name}.port"
                if port_file.exists() and port_file.read_text().strip():
                    url = f"http://{cfg.serve.host}:{port_file.read_text().strip()}"
                    statuses[name] = {"url": url}
            for c in children:
                echo(status_line(c.name, statuses.get(c.name), c.proc))
            servers_and_tracker = {*names, "tracker"}
            if all(
                c.proc.poll() is not None for c in children if c.name not in servers_and_tracker
            ):
                break
    finally:
        codes = stop_all(children, grace_s)
    bad = {n: c for n, c in codes.items() if c not in (0, None)}
    if bad:
        echo(f"minutely up: services that failed: {bad} (see {logs})")
    return 1 if bad else 0


def stop_all(children: list[Child], grace_s: float) -> dict[str, int | None]:
    """SIGTERM every child still running, wait up to ``grace_s``, SIGKILL the rest."""
    for c in children:
        if c.proc.poll() is None:
            c.proc.terminate()
    deadline = time.monotonic() + grace_s
    for c in children:
        try:
            c.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            c.proc.kill()
            c.proc.wait()
        c.log.close()
    return {c.name: c.proc.returncode for c in children}
