"""The service commands behind ``minutely simulate | join | train``, and ``minutely train --mode
day|hour``, a one-off batch run.

Each opens the log the configuration names (the embedded SQLite file in the run folder, or a
Kafka cluster), resumes from whatever checkpoints the run folder holds (refusing ones written
under other settings, naming the setting), runs until done or stopped, and checkpoints on the
way out. When the log fails under it (a broker restarting, a network cut), the service drops
what it holds in memory, waits, and starts again from its last checkpoint, as a restarted
process would; its exactly-once writers make the work it repeats invisible downstream.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from minutely.clock import Clock
from minutely.config import Config
from minutely.errors import StreamError
from minutely.pipeline.join_service import JoinService
from minutely.pipeline.model_loop import CutOutcome, run_batch_mode
from minutely.pipeline.origin import Announcer, publisher_registry
from minutely.pipeline.services import serve_loop
from minutely.pipeline.sim_service import SimulateService
from minutely.pipeline.train_service import TrainService
from minutely.schema import default_schema
from minutely.stream import Log, open_log

_log = logging.getLogger("minutely")


@dataclass
class Running:
    """What :func:`supervise` needs of a service built on an open log."""

    step: Callable[[], object]
    status: Callable[[], dict[str, Any]]
    finish: Callable[[], None]  # checkpoint and let go (a clean stop)
    abandon: Callable[[], None]  # let go without a checkpoint (after the log failed)
    done: Callable[[], bool] = lambda: False


def supervise(
    name: str,
    build: Callable[[Log], Running],
    cfg: Config,
    run_dir: Path,
    clock: Clock,
    stop: threading.Event,
    *,
    retry_s: float = 1.0,
    max_retry_s: float = 30.0,
) -> None:
    """Run a service until done or stopped, starting it again from its checkpoint whenever the
    log fails (a :class:`StreamError`); other errors end the service."""
    wait = retry_s
    while not stop.is_set():
        log: Log | None = None
        running: Running | None = None
        try:
            log = open_log(cfg.stream, run_dir)
            running = build(log)
            serve_loop(running.step, running.status, run_dir, name, clock, stop, done=running.done)
            running.finish()
            return
        except StreamError as exc:
            _log.warning(
                "%s: the log failed (%s); starting again from the last checkpoint in %.0f s",
                name,
                exc,
                wait,
            )
            if running is not None:
                with contextlib.suppress(Exception):
                    running.abandon()
            stop.wait(wait)
            wait = min(wait * 2, max_retry_s)
        finally:
            if log is not None:
                with contextlib.suppress(StreamError):
                    log.close()


def run_simulate(
    cfg: Config,
    run_dir: Path,
    clock: Clock,
    stop: threading.Event,
    *,
    days: float | None,
    rate: float | None,
    live: bool = False,
) -> None:
    def build(log: Log) -> Running:
        svc = SimulateService(cfg, log, run_dir, clock, days=days, rate=rate, live=live)

        def step() -> None:
            wait = svc.due_in_s()
            if wait > 0:
                stop.wait(min(wait, 1.0))
            else:
                svc.step()

        def status() -> dict[str, Any]:
            return {
                "position_ms": svc.next_ms,
                "end_ms": svc.end_ms,
                "events": svc.source.produced,
                "pace_origin": svc.pace_origin,
            }

        return Running(step, status, svc.close, svc.close, lambda: svc.done)

    supervise("simulate", build, cfg, run_dir, clock, stop)


def run_join(
    cfg: Config, run_dir: Path, clock: Clock, stop: threading.Event, *, name: str = "join"
) -> None:
    def build(log: Log) -> Running:
        svc = JoinService(cfg, log, run_dir)
        return Running(lambda: svc.step(0.2), svc.status, svc.close, svc.abandon)

    supervise(name, build, cfg, run_dir, clock, stop)


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

    def build(log: Log) -> Running:
        svc = TrainService(
            cfg,
            model,
            run_dir,
            log,
            clock=clock,
            audit_dir=run_dir / "audit" / model if audit else None,
        )

        def status() -> dict[str, Any]:
            st = svc.exporter.state
            return {
                "model": model,
                "position_ms": svc.next_end_ms,
                "windows": svc.windows_done,
                "samples": svc.trainer.samples_seen,
                "last_export": st.last_version,
                "exports": st.exported,
                "dead_letters": svc.dead_letters.count,
                **svc.loop.progress(clock.now_ms()),
            }

        def finish() -> None:
            svc.checkpoint()
            svc.close()

        return Running(lambda: svc.step(0.2), status, finish, svc.close)

    supervise(f"train-{model}", build, cfg, run_dir, clock, stop)


def run_batch(
    cfg: Config,
    run_dir: Path,
    *,
    model: str,
    mode: Literal["day", "hour"],
    end_ms: int,
    start_ms: int | None,
) -> CutOutcome:
    """``minutely train --mode day|hour``: one batch run over the run folder's samples log
    (see :func:`~minutely.pipeline.model_loop.run_batch_mode`)."""
    torch.set_num_threads(1)
    log = open_log(cfg.stream, run_dir)
    try:
        registry = publisher_registry(cfg, run_dir)
        Announcer(registry, log, cfg.registry.announce_topic)
        return run_batch_mode(
            cfg,
            model,
            default_schema(),
            log,
            registry,
            mode=mode,
            end_ms=end_ms,
            start_ms=start_ms,
        )
    finally:
        log.close()
