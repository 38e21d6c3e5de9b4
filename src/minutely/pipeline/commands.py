"""The service commands behind ``minutely simulate | join | train | up``.

Each opens the log the configuration names (the embedded SQLite file in the run folder, or a
Kafka cluster), resumes from whatever checkpoints the run folder holds (refusing ones written
under other settings, naming the setting), runs until done or stopped, and checkpoints on the
way out.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch

from minutely.clock import Clock
from minutely.config import Config
from minutely.pipeline.join_service import JoinService
from minutely.pipeline.services import serve_loop
from minutely.pipeline.sim_service import SimulateService
from minutely.pipeline.train_service import TrainService
from minutely.stream import open_log

_log = logging.getLogger("minutely")


def run_simulate(
    cfg: Config,
    run_dir: Path,
    clock: Clock,
    stop: threading.Event,
    *,
    days: float | None,
    rate: float | None,
    live: bool = False,
) -> SimulateService:
    log = open_log(cfg.stream, run_dir)
    try:
        svc = SimulateService(cfg, log, run_dir, clock, days=days, rate=rate, live=live)

        def step() -> None:
            wait = svc.due_in_s()
            if wait > 0:
                stop.wait(min(wait, 1.0))
            else:
                svc.step()

        serve_loop(
            step,
            lambda: {
                "position_ms": svc.next_ms,
                "end_ms": svc.end_ms,
                "events": svc.source.produced,
                "pace_origin": svc.pace_origin,
            },
            run_dir,
            "simulate",
            clock,
            stop,
            done=lambda: svc.done,
        )
        return svc
    finally:
        log.close()


def run_join(
    cfg: Config, run_dir: Path, clock: Clock, stop: threading.Event, *, name: str = "join"
) -> None:
    log = open_log(cfg.stream, run_dir)
    try:
        svc = JoinService(cfg, log, run_dir)
        try:
            serve_loop(lambda: svc.step(0.2), svc.status, run_dir, name, clock, stop)
        finally:
            svc.close()
    finally:
        log.close()


def run_train(
    cfg: Config,
    run_dir: Path,
    clock: Clock,
    stop: threading.Event,
    *,
    model: str,
    audit: bool = False,
) -> None:
    torch.set_num_threads(1)
    log = open_log(cfg.stream, run_dir)
    try:
        svc = TrainService(
            cfg,
            model,
            run_dir,
            log,
            clock=clock,
            audit_dir=run_dir / "audit" / model if audit else None,
        )

        def status() -> dict[str, object]:
            st = svc.exporter.state
            return {
                "model": model,
                "position_ms": svc.next_end_ms,
                "windows": svc.windows_done,
                "samples": svc.trainer.samples_seen,
                "last_export": st.last_version,
                "exports": st.exported,
            }

        try:
            serve_loop(lambda: svc.step(0.2), status, run_dir, f"train-{model}", clock, stop)
        finally:
            svc.checkpoint()
            svc.close()
    finally:
        log.close()
