"""Running the service topology in tests: in one process (the reference) and as processes."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, ClassVar

from minutely.cli import parse_override
from minutely.clock import ReplayClock
from minutely.config import Config, load_config, merge_tables
from minutely.pipeline.join_service import JoinService
from minutely.pipeline.services import read_statuses
from minutely.pipeline.sim_service import SimulateService
from minutely.pipeline.train_service import TrainService, read_audit
from minutely.procs import spawn_child
from minutely.stream import Log, open_log, read_dead_letters

# A small market for a fast replay; every setting is passed to the processes as --set.
SETTINGS = [
    "sim.impressions_per_day=24000",
    "sim.users=3000",
    "sim.campaigns_per_hour=4",
    'sim.delay_preset="fast"',
    "stream.partitions=4",
    "stream.session_timeout_s=2.0",
    "demo.corrupt_every=97",
    'models=[{name="ctr", buckets=4096, embedding_dim=4, hidden=[16]},'
    ' {name="cvr", label="conversion", attribution_window_s=600, correction_horizon_s=3600,'
    " buckets=4096, embedding_dim=4, hidden=[16]}]",
    "train.batch_size=256",
    "train.checkpoint_every_windows=3",
    "export.min_samples=50",
    "serve.poll_interval_s=0.1",
]
DAYS = 0.25
RATE = 1_500  # the replay as processes: 6 simulated hours in about 15 s


def settings_config(extra: list[str] | None = None) -> Config:
    overrides: dict[str, Any] = {}
    for item in [*SETTINGS, *(extra or [])]:
        overrides = merge_tables(overrides, parse_override(item))
    return load_config(None, overrides)


@dataclass
class Outcome:
    trained: list[tuple[int, int, bool]]
    dead_letters: Counter[tuple[str, str, bytes]]
    next_end_ms: int | None
    samples: int


def outcome(log: Log, run_dir: Path, cfg: Config, next_end_ms: int | None) -> Outcome:
    letters = Counter(
        (d.reason, d.source, d.payload)
        for d in read_dead_letters(log, cfg.stream.dead_letter_topic)
    )
    trained = read_audit(run_dir / "audit" / "ctr")
    return Outcome(trained, letters, next_end_ms, len(trained))


def reference(cfg: Config, run_dir: Path) -> Outcome:
    """The uninterrupted run: every service in this process, one after the other."""
    log = open_log(cfg.stream, run_dir)
    stop = threading.Event()
    sim = SimulateService(cfg, log, run_dir, ReplayClock(0), days=DAYS)
    sim.run(stop)
    join = JoinService(cfg, log, run_dir)
    while join.step(0.5) or join.lag():
        pass
    join.close()
    train = TrainService(cfg, "ctr", run_dir, log, audit_dir=run_dir / "audit" / "ctr")
    while train.step() is not None:
        pass
    train.checkpoint()
    train.close()
    out = outcome(log, run_dir, cfg, train.next_end_ms)
    log.close()
    return out


@dataclass
class Topology:
    """The services as processes on one run folder, each restartable."""

    run_dir: Path
    common: list[str]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: dict[str, IO[bytes]] = field(default_factory=dict)
    starts: Counter[str] = field(default_factory=Counter)

    ARGS: ClassVar[dict[str, list[str]]] = {
        "simulate": ["simulate", "--days", str(DAYS), "--rate", str(RATE)],
        "join-0": ["join", "--name", "join-0"],
        "join-1": ["join", "--name", "join-1"],
        "train-ctr": ["train", "--model", "ctr", "--audit"],
        "serve": ["serve", "--port-file", "PORT_FILE"],
    }

    def start(self, name: str) -> None:
        args = [a.replace("PORT_FILE", str(self.run_dir / "server.port")) for a in self.ARGS[name]]
        argv = [sys.executable, "-m", "minutely.cli", *args, *self.common]
        log = self.logs.get(name)
        if log is None:
            log = self.logs[name] = (self.run_dir / f"{name}.out").open("ab")
        self.procs[name] = spawn_child(argv, stdout=log, stderr=subprocess.STDOUT)
        self.starts[name] += 1

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        proc.kill()
        proc.wait()

    def statuses(self) -> dict[str, dict[str, Any]]:
        return read_statuses(self.run_dir)

    def stop(self) -> dict[str, int | None]:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        codes = {}
        for name, p in self.procs.items():
            try:
                codes[name] = p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                codes[name] = p.wait()
        for f in self.logs.values():
            f.close()
        return codes

    def output(self, name: str) -> str:
        return (self.run_dir / f"{name}.out").read_text(errors="replace")


def wait_for(cond: Any, timeout_s: float, what: str, topo: Topology | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    detail = "" if topo is None else f"; statuses {topo.statuses()}"
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}{detail}")
