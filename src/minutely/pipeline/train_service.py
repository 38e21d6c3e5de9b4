"""``minutely train --model NAME``: a model's samples topic -> test-then-train -> exports.

The service reads every partition of the model's samples topic, closes a window ``(s, e]`` once
every partition has passed ``e`` (see :class:`~minutely.pipeline.learner.SampleWindows`) and
hands it to the model's :class:`~minutely.pipeline.model_loop.ModelLoop`: monitor, gated
export, test then train, and the schedule's cuts; while no window completes it checks the
monitor's stall timeout on its clock. Its checkpoint (one atomic directory,
:mod:`minutely.train.checkpoint`) holds the online weights and optimizer state, the loop's state
(positions, exporter, monitor, batch model), the next window and the settings that shape what it
trains on. Killed at any moment and restarted, it
resumes after the last checkpointed window and trains the same windows again, with the same
contents: a window's contents depend only on the log, never on when the service read it.

With ``audit_dir`` the service writes, per window it trains, the (sample id, label,
is_correction) triples, each sample's event time and the clock's time of training to
``<audit_dir>/<window end>.npz``; a restore removes the files of windows after its checkpoint,
so the files always describe exactly what the model's state has learned from.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from minutely.clock import Clock, WallClock, floor_window
from minutely.config import Config
from minutely.errors import CheckpointError
from minutely.evaluate import WindowReport
from minutely.model import build_model
from minutely.pipeline.appender import ExactlyOnceWriter
from minutely.pipeline.model_loop import ModelLoop, cuts_between
from minutely.pipeline.origin import Announcer, publisher_registry
from minutely.pipeline.settings import check_settings, output_settings
from minutely.registry import Manifest
from minutely.schema import default_schema
from minutely.stream import DeadLetterSink, Log
from minutely.train import Trainer, frozen_names, load_latest_checkpoint, save_checkpoint

STATE = "train_service.json"
_log = logging.getLogger("minutely.train")


class TrainService:
    """One model's online trainer as a restartable service."""

    def __init__(
        self,
        cfg: Config,
        model_name: str,
        run_dir: Path,
        log: Log,
        *,
        clock: Clock | None = None,
        audit_dir: Path | None = None,
    ) -> None:
        self.cfg = cfg
        self.model_cfg = cfg.model(model_name)
        self.schema = default_schema()
        torch.manual_seed(cfg.train.seed)
        self.model = build_model(self.model_cfg, self.schema)
        self.trainer = Trainer(self.model, cfg.train, frozen=frozen_names(self.model))
        self.registry = publisher_registry(cfg, run_dir)
        Announcer(self.registry, log, cfg.registry.announce_topic)
        self.checkpoint_dir = run_dir / "checkpoints" / f"train-{model_name}"
        self.window_ms = cfg.train.window_s * 1000
        self._audit_dir = audit_dir
        self._clock = clock if clock is not None else WallClock()
        settings = output_settings(cfg, "train", model_name)
        self._settings = settings
        self._extras: dict[str, bytes] | None = None
        state = self._load_state()
        if state is not None:
            check_settings(
                state["settings"], settings, f"train checkpoint in {self.checkpoint_dir}"
            )
        log.create_topic(self.model_cfg.samples_topic, cfg.stream.partitions)
        dl_topic = cfg.stream.dead_letter_topic
        log.create_topic(dl_topic, 1)
        self._dead_out = ExactlyOnceWriter(
            log,
            dl_topic,
            f"train/{model_name}",
            None if state is None else state.get("dead_letters"),
        )
        self.dead_letters = DeadLetterSink(
            log,
            dl_topic,
            write=self._dead_out.append_keyed,
            counts_by_reason=None if state is None else state.get("dead_letter_counts"),
        )
        self._window_tables: list[pa.Table] = []
        self.loop = ModelLoop(
            cfg,
            self.model_cfg,
            self.schema,
            log,
            self.registry,
            state=None if state is None else state.get("loop"),
            extras=self._extras,
            model=self.model,
            trainer=self.trainer,
            events_dir=run_dir,
            dead_letters=self.dead_letters,
            on_trained=self._on_trained,
        )
        self.samples = self.loop.samples
        self.learner = self.loop.learner
        self.exporter = self.loop.exporter
        self.next_end_ms: int | None = None if state is None else state["next_end_ms"]
        self.windows_done = 0 if state is None else int(state["windows_done"])
        if audit_dir is not None:
            self._prune_audit()

    # -- running ----------------------------------------------------------------------------------

    def step(self, timeout_s: float = 0.0) -> tuple[WindowReport, Manifest | None] | None:
        """Train the next window if the log shows it complete; ``None`` if it is not yet."""
        if self.next_end_ms is None:
            self.samples.fill(None, timeout_s)
            first = self.samples.earliest_ts()
            if first is None:
                return None
            self.next_end_ms = floor_window(first, self.window_ms) + self.window_ms
        end = self.next_end_ms
        if not self.samples.fill(end, timeout_s):
            self.loop.check_stall(self._clock.now_ms())
            return None
        self._window_tables = []
        out = self.loop.window(end - self.window_ms, end, now_ms=self._clock.now_ms())
        if self._audit_dir is not None:
            self._write_audit(end, self._window_tables)
        for cut in cuts_between(self.cfg, end - self.window_ms, end):
            self.loop.cut(cut)
        self.next_end_ms = end + self.window_ms
        self.windows_done += 1
        if self.windows_done % self.cfg.train.checkpoint_every_windows == 0:
            self.checkpoint()
        if out.report is None:
            return None
        return out.report, out.exported

    def checkpoint(self) -> Path:
        state = {
            "settings": self._settings,
            "loop": self.loop.state(),
            "next_end_ms": self.next_end_ms,
            "windows_done": self.windows_done,
            "dead_letters": self._dead_out.state(),
            "dead_letter_counts": self.dead_letters.counts_by_reason,
        }
        blob = json.dumps(state, sort_keys=True).encode()
        extras = {STATE: blob, **self.loop.extras()}
        return save_checkpoint(self.checkpoint_dir, self.model, self.trainer, extras)

    def close(self) -> None:
        self.loop.close()

    def _on_trained(self, kind: str, table: pa.Table) -> None:
        if kind == "online":
            self._window_tables.append(table)

    # -- internals --------------------------------------------------------------------------------

    def _load_state(self) -> dict[str, Any] | None:
        extras = load_latest_checkpoint(self.checkpoint_dir, self.model, self.trainer)
        if extras is None:
            return None
        self._extras = extras
        try:
            state: dict[str, Any] = json.loads(extras[STATE])
            missing = [
                k for k in ("settings", "loop", "next_end_ms", "windows_done") if k not in state
            ]
            if missing:
                raise KeyError(missing[0])
        except (KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(
                f"train checkpoint in {self.checkpoint_dir} has no readable {STATE} ({exc!r})"
            ) from exc
        return state

    def _write_audit(self, end_ms: int, tables: list[pa.Table]) -> None:
        assert self._audit_dir is not None
        self._audit_dir.mkdir(parents=True, exist_ok=True)
        cols: dict[str, Any] = {
            "sample_id": [],
            "label": [],
            "is_correction": [],
            "event_ts_ms": [],
        }
        for t in tables:
            cols["sample_id"].append(t["sample_id"].to_numpy())
            cols["label"].append(t["label"].to_numpy())
            cols["is_correction"].append(t["is_correction"].to_numpy(zero_copy_only=False))
            cols["event_ts_ms"].append(t["event_ts_ms"].to_numpy())
        arrays = {
            k: (np.concatenate(v) if v else np.zeros(0, dtype=np.int64)) for k, v in cols.items()
        }
        tmp = self._audit_dir / f".{end_ms}.npz.tmp"
        with tmp.open("wb") as f:
            np.savez(
                f,
                sample_id=arrays["sample_id"],
                label=arrays["label"],
                is_correction=arrays["is_correction"],
                event_ts_ms=arrays["event_ts_ms"],
                trained_at_ms=np.int64(self._clock.now_ms()),
            )
        tmp.replace(self._audit_dir / f"{end_ms}.npz")

    def _prune_audit(self) -> None:
        assert self._audit_dir is not None
        if not self._audit_dir.exists():
            return
        for f in self._audit_dir.glob("*.npz"):
            end = int(f.stem)
            if self.next_end_ms is None or end >= self.next_end_ms:
                _log.info("removing audit of window %s, trained after the checkpoint", end)
                f.unlink()


def read_audit_lags(audit_dir: Path) -> list[tuple[int, int]]:
    """(event time, clock time when trained) of every sample an audited trainer trained on."""
    out: list[tuple[int, int]] = []
    for f in sorted(audit_dir.glob("*.npz")):
        with np.load(f) as z:
            at = int(z["trained_at_ms"])
            out += [(int(t), at) for t in z["event_ts_ms"].tolist()]
    return out


def read_audit(audit_dir: Path) -> list[tuple[int, int, bool]]:
    """Every (sample id, label, is_correction) an audited trainer has trained on, sorted."""
    out: list[tuple[int, int, bool]] = []
    for f in sorted(audit_dir.glob("*.npz")):
        with np.load(f) as z:
            out += zip(
                z["sample_id"].tolist(),
                z["label"].tolist(),
                z["is_correction"].tolist(),
                strict=True,
            )
    return sorted(out)
