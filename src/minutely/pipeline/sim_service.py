"""``minutely simulate``: the simulated ad servers, writing raw events to the raw topic.

The simulator is one producer among others: anything that appends the raw-event JSON (see the
README) to the raw topic, keyed by impression id, feeds the same pipeline. The service writes one
event-time window at a time and checkpoints after each (the next window and its exactly-once
writer's state, in one JSON file replaced atomically), so a restart after SIGKILL continues with
the next window, and a window written before the kill is verified and not written twice.

With ``features.snapshots`` on, each window's impression features are first written to the
feature snapshot tables (replicas resolved inside the run folder) and the impressions are
published by reference (see :class:`~minutely.pipeline.source.SimSource`); :meth:`SimulateService.
close` closes the snapshot writer. Whether snapshots are on is one of the checkpoint's
settings, so a restart that turns them on or off is refused, naming ``features.snapshots``: the
window it would produce again differs from the messages already in the topic.

Two paces: as fast as possible (replays, benchmarks), or ``rate`` times real time on the clock.
With ``live`` the market starts at the clock's now instead of ``sim.start_ms``: at rate 1 every
event is then stamped with the wall-clock time at which it is written, give or take one window.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path
from typing import Any

from minutely.clock import Clock, floor_window
from minutely.config import Config
from minutely.errors import CheckpointError, ConfigError
from minutely.fsutil import replace_atomically
from minutely.pipeline.settings import check_settings, output_settings
from minutely.pipeline.source import SimSource, open_snapshots
from minutely.schema import default_schema
from minutely.sim import Market
from minutely.stream import Log

STATE = "simulate.json"


class SimulateService:
    """Writes ``[start, end)`` of the simulated market to the raw topic, window by window."""

    def __init__(
        self,
        cfg: Config,
        log: Log,
        run_dir: Path,
        clock: Clock,
        *,
        days: float | None = None,
        rate: float | None = None,
        live: bool = False,
    ) -> None:
        if rate is not None and not rate > 0:
            raise ConfigError("--rate", "a number > 0 (times real time)", rate)
        if days is not None and not days > 0:
            raise ConfigError("--days", "a number of days > 0", days)
        self._clock = clock
        self._rate = rate
        self._path = run_dir / "checkpoints" / STATE
        self.window_ms = cfg.train.window_s * 1000
        state = self._load()
        start = cfg.sim.start_ms
        if state is not None:
            start = int(state["start_ms"])
        elif live:
            start = floor_window(clock.now_ms(), self.window_ms)
        sim = dataclasses.replace(cfg.sim, start_ms=start)
        self.cfg = dataclasses.replace(cfg, sim=sim)
        self._settings = output_settings(self.cfg, "simulate")
        if state is not None:
            saved = state["settings"]
            check_settings(saved, self._settings, f"simulate checkpoint {self._path}")
        self.start_ms = start
        self.end_ms = None if days is None else start + int(days * 86_400_000)
        log.create_topic(cfg.stream.raw_topic, cfg.stream.partitions)
        schema = default_schema()
        snapshots = open_snapshots(cfg, schema, run_dir)
        try:
            self.source = SimSource(
                Market(sim, schema),
                log,
                cfg.stream.raw_topic,
                corrupt_every=cfg.demo.corrupt_every,
                writer=None if state is None else state["writer"],
                produced=0 if state is None else int(state["produced"]),
                snapshots=snapshots,
            )
        except BaseException:
            if snapshots is not None:
                snapshots.close(catch_up=False)
            raise
        self.next_ms = start if state is None else int(state["next_ms"])
        self._wall0: tuple[int, int] | None = None  # (wall ms, sim ms) when pacing began

    @property
    def pace_origin(self) -> tuple[int, int] | None:
        """(clock ms, simulated ms) at which paced writing began (``None`` before, or unpaced)."""
        return self._wall0

    @property
    def done(self) -> bool:
        return self.end_ms is not None and self.next_ms >= self.end_ms

    def step(self) -> int:
        """Write the next window (after waiting for its time when paced); returns its events."""
        end = self.next_ms + self.window_ms
        if self.end_ms is not None:
            end = min(end, self.end_ms)
        batch = self.source.produce(self.next_ms, end)
        self.next_ms = end
        self.checkpoint()
        return len(batch)

    def due_in_s(self) -> float:
        """Seconds until the next window may be written (0 when unpaced or late)."""
        if self._rate is None:
            return 0.0
        now = self._clock.now_ms()
        if self._wall0 is None:
            self._wall0 = (now, self.next_ms)
        wall0, sim0 = self._wall0
        due = wall0 + (self.next_ms + self.window_ms - sim0) / self._rate
        return max(0.0, (due - now) / 1000)

    def run(self, stop: threading.Event) -> None:
        """Write windows until the end (if any) or until ``stop`` is set."""
        while not self.done and not stop.is_set():
            wait = self.due_in_s()
            if wait > 0:
                stop.wait(min(wait, 1.0))
                continue
            self.step()

    def close(self) -> None:
        """Close the snapshot writer, if any (every written window is already checkpointed)."""
        self.source.close()

    def checkpoint(self) -> None:
        state = {
            "settings": self._settings,
            "start_ms": self.start_ms,
            "next_ms": self.next_ms,
            "produced": self.source.produced,
            "writer": self.source.writer_state(),
        }
        self._path.parent.mkdir(parents=True, exist_ok=True)
        replace_atomically(self._path, json.dumps(state, sort_keys=True).encode())

    def _load(self) -> dict[str, Any] | None:
        if not self._path.exists():
            return None
        try:
            state: dict[str, Any] = json.loads(self._path.read_bytes())
            missing = [
                k
                for k in ("settings", "start_ms", "next_ms", "produced", "writer")
                if k not in state
            ]
            if missing:
                raise KeyError(missing[0])
        except (OSError, KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(
                f"simulate checkpoint {self._path} is unreadable ({exc!r})"
            ) from exc
        return state
