"""The online pipeline: source -> raw log -> join -> samples log -> train -> export.

One :meth:`OnlinePipeline.tick` advances the whole pipeline by one event-time window. A
checkpoint (written atomically every ``train.checkpoint_every_windows`` windows) holds, as one
unit, the model weights and optimizer state, the join's partitions (positions, joiner states,
exactly-once writers), the samples positions, the exporter's state, the simulator's writer and
the settings that shape all of it, so a crash at any point resumes after the last processed
item: nothing lost, nothing counted twice.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minutely.clock import ReplayClock
from minutely.config import Config, ModelConfig
from minutely.errors import CheckpointError
from minutely.evaluate import WindowReport
from minutely.model import CtrModel
from minutely.pipeline.export import Exporter, ExportState, window_metrics
from minutely.pipeline.join_stage import JoinStage
from minutely.pipeline.learner import OnlineLearner, SampleWindows
from minutely.pipeline.settings import check_settings, output_settings
from minutely.pipeline.source import SimSource
from minutely.registry import Manifest, Registry
from minutely.schema import Schema
from minutely.sim import EventBatch, Market
from minutely.stream import Log
from minutely.train import Trainer, load_latest_checkpoint, save_checkpoint

PIPELINE_STATE = "pipeline.json"


@dataclass(frozen=True)
class TickResult:
    start_ms: int
    end_ms: int
    events: EventBatch
    window: WindowReport | None
    exported: Manifest | None


class OnlinePipeline:
    """Runs every stage for one model, one event-time window per tick."""

    def __init__(
        self,
        cfg: Config,
        model_cfg: ModelConfig,
        schema: Schema,
        log: Log,
        market: Market,
        registry: Registry,
        model: CtrModel,
        trainer: Trainer,
        checkpoint_dir: Path,
        start_ms: int,
        *,
        corrupt_every: int = 0,
        resume: bool = False,
    ) -> None:
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.schema = schema
        self.log = log
        self.model = model
        self.trainer = trainer
        self.checkpoint_dir = checkpoint_dir
        self.clock = ReplayClock(start_ms)
        self.now_ms = start_ms
        self.windows_done = 0
        state: dict[str, Any] | None = None
        if resume:
            extras = load_latest_checkpoint(checkpoint_dir, model, trainer)
            if extras is None:
                raise CheckpointError(f"resume: no checkpoint in {checkpoint_dir}")
            try:
                state = json.loads(extras[PIPELINE_STATE])
            except (KeyError, ValueError) as exc:
                raise CheckpointError(
                    f"resume: checkpoint in {checkpoint_dir} has no readable {PIPELINE_STATE}"
                ) from exc
        try:
            if state is not None:
                check_settings(
                    state.get("settings"),
                    self._settings(corrupt_every),
                    f"resume: checkpoint in {checkpoint_dir}",
                )
                self.now_ms = int(state["now_ms"])
                self.windows_done = int(state["windows_done"])
                self.clock.advance_to(self.now_ms)
            self._build(market, registry, corrupt_every, state)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"resume: checkpoint in {checkpoint_dir} has a malformed {PIPELINE_STATE} ({exc!r})"
            ) from exc

    def _build(
        self,
        market: Market,
        registry: Registry,
        corrupt_every: int,
        state: dict[str, Any] | None,
    ) -> None:
        """The stages, fresh or from a checkpoint's ``state``."""
        cfg, model_cfg, schema, log = self.cfg, self.model_cfg, self.schema, self.log
        models = [model_cfg]
        log.create_topic(cfg.stream.raw_topic, cfg.stream.partitions)
        self.source = SimSource(
            market,
            log,
            cfg.stream.raw_topic,
            corrupt_every=corrupt_every,
            writer=None if state is None else state["source"]["writer"],
            produced=0 if state is None else int(state["source"]["produced"]),
        )
        self.join = JoinStage.from_config(
            log,
            cfg,
            schema,
            self.clock,
            None if state is None else state["join"],
            models=models,
        )
        self.samples = SampleWindows(
            log,
            model_cfg,
            schema,
            cfg.train.batch_size,
            positions=None if state is None else _int_keys(state["learner"]["positions"]),
        )
        self.learner = OnlineLearner(self.trainer, self.samples, cfg.train)
        self._corrupt_every = corrupt_every
        self.exporter = Exporter(
            registry,
            model_cfg,
            schema,
            cfg.export,
            None if state is None else ExportState.from_dict(state["exporter"]),
        )

    def tick(
        self,
        end_ms: int,
        *,
        train: bool = True,
        export: bool = True,
        on_events: Callable[[EventBatch], None] | None = None,
    ) -> TickResult:
        """Advance every stage to ``end_ms``.

        ``on_events`` sees the window's raw events before any stage does: the replay scores
        each impression there, with the version live when its request arrived.
        """
        start = self.now_ms
        events = self.source.produce(start, end_ms)
        if on_events is not None:
            on_events(events)
        self.clock.advance_to(end_ms)
        self.join.run()
        self.join.advance_to(end_ms)
        report = self.learner.run_window(start, end_ms) if train else None
        exported = None
        if export:
            exported = self.exporter.maybe_export(
                self.model, end_ms, self.trainer.samples_seen, window_metrics(report)
            )
        self.now_ms = end_ms
        self.windows_done += 1
        if self.windows_done % self.cfg.train.checkpoint_every_windows == 0:
            self.checkpoint()
        return TickResult(start, end_ms, events, report, exported)

    def close(self) -> None:
        """Close the stages' readers; the log stays open (the caller owns it)."""
        self.join.close()
        self.samples.close()

    def checkpoint(self) -> Path:
        state = {
            "settings": self._settings(self._corrupt_every),
            "now_ms": self.now_ms,
            "windows_done": self.windows_done,
            "source": {"writer": self.source.writer_state(), "produced": self.source.produced},
            "join": self.join.snapshot(),
            "learner": {"positions": self.samples.positions()},
            "exporter": self.exporter.state.to_dict(),
        }
        blob = json.dumps(state, sort_keys=True).encode()
        return save_checkpoint(
            self.checkpoint_dir, self.model, self.trainer, {PIPELINE_STATE: blob}
        )

    def _settings(self, corrupt_every: int) -> dict[str, Any]:
        """Settings that shape what the stages write and learn: a restore must match them, or
        the restored stages would produce other messages than the ones already logged."""
        cfg = self.cfg
        return {
            **output_settings(cfg, "simulate"),
            **output_settings(cfg, "join"),
            **output_settings(cfg, "train", self.model_cfg.name),
            "corrupt_every": corrupt_every,
        }


def _int_keys(d: dict[str, Any]) -> dict[int, int]:
    return {int(k): int(v) for k, v in d.items()}
