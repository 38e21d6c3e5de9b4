"""The online pipeline: source -> raw log -> join -> samples log -> train -> export.

One :meth:`OnlinePipeline.tick` advances the whole pipeline by one event-time window: one join
stage writes every model's samples, and each model's
:class:`~minutely.pipeline.model_loop.ModelLoop` reads its own samples topic (monitor, gated
export, test then train) and makes the schedule's cuts. A checkpoint (written atomically every
``train.checkpoint_every_windows`` windows) holds, as one unit, every model's online and batch
weights, optimizer states, sample positions, exporter and monitor state, the join's partitions
(positions, joiner states, exactly-once writers), the simulator's writer and the settings that
shape all of it, so a crash at any point resumes after the last processed item: nothing lost,
nothing counted twice.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from minutely.clock import MS_PER_HOUR, ReplayClock
from minutely.config import Config
from minutely.errors import CheckpointError
from minutely.evaluate import WindowReport
from minutely.features import open_resolver
from minutely.model import CtrModel, build_model
from minutely.pipeline.join_stage import JoinStage
from minutely.pipeline.model_loop import (
    CutOutcome,
    ModelLoop,
    WindowOutcome,
    cuts_between,
    model_extras,
    restore_model,
)
from minutely.pipeline.settings import check_settings, output_settings
from minutely.pipeline.source import SimSource, open_snapshots
from minutely.registry import Manifest, Registry
from minutely.schema import Schema
from minutely.sim import EventBatch, Market
from minutely.stream import Log
from minutely.train import Trainer, frozen_names, load_latest_checkpoint, save_checkpoint

PIPELINE_STATE = "pipeline.json"


@dataclass(frozen=True)
class TickResult:
    """What one tick did: the window's raw events and, per model, what its window did
    (``outcomes``: report, version published, gate verdict, anomaly, rollback; none when the
    tick did not train) and the cuts it made (batch model trained and published as a
    warm-start version)."""

    start_ms: int
    end_ms: int
    events: EventBatch
    outcomes: dict[str, WindowOutcome] = field(default_factory=dict)
    cuts: dict[str, list[CutOutcome]] = field(default_factory=dict)

    @property
    def windows(self) -> dict[str, WindowReport]:
        """Per model, the window its online model trained."""
        return {n: o.report for n, o in self.outcomes.items() if o.report is not None}

    @property
    def exported(self) -> dict[str, Manifest]:
        """Per model, the version it published."""
        return {n: o.exported for n, o in self.outcomes.items() if o.exported is not None}


class OnlinePipeline:
    """Runs every stage for the models named in ``models`` (every configured model by
    default), one event-time window per tick.

    Models are built in the order named, from torch's global generator (seed it first for a
    reproducible run). On ``resume`` the newest checkpoint in ``checkpoint_dir`` is restored:
    the first model's weights and optimizer states are the checkpoint's own, every other
    model's travel with it as named extras, so the checkpoint stays one atomic unit.
    """

    def __init__(
        self,
        cfg: Config,
        schema: Schema,
        log: Log,
        market: Market,
        registry: Registry,
        checkpoint_dir: Path,
        start_ms: int,
        *,
        models: Sequence[str] | None = None,
        corrupt_every: int = 0,
        resume: bool = False,
        run_dir: Path | None = None,
        on_trained: Callable[[str, str, pa.Table], None] | None = None,
        hourly_shadow: bool = False,
        transform: Callable[[str, int, pa.Table], pa.Table] | None = None,
    ) -> None:
        names = [m.name for m in cfg.models] if models is None else list(models)
        if not names:
            raise ValueError("OnlinePipeline: expected at least one model name, got none")
        if len(set(names)) != len(names):
            raise ValueError(f"OnlinePipeline: expected distinct model names, got {names}")
        self.cfg = cfg
        self.schema = schema
        self.log = log
        self.model_cfgs = [cfg.model(n) for n in names]
        self.checkpoint_dir = checkpoint_dir
        self._on_trained = on_trained
        self._hourly_shadow = hourly_shadow
        self._transform = transform
        # Relative feature snapshot replicas live in the run folder.
        self.run_dir = checkpoint_dir.parent if run_dir is None else run_dir
        self.clock = ReplayClock(start_ms)
        self.now_ms = start_ms
        self.windows_done = 0
        built: list[tuple[CtrModel, Trainer]] = []
        for mc in self.model_cfgs:
            model = build_model(mc, schema)
            built.append((model, Trainer(model, cfg.train, frozen=frozen_names(model))))
        state: dict[str, Any] | None = None
        extras: dict[str, bytes] = {}
        if resume:
            loaded = load_latest_checkpoint(checkpoint_dir, *built[0])
            if loaded is None:
                raise CheckpointError(f"resume: no checkpoint in {checkpoint_dir}")
            extras = loaded
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
                for mc, (model, trainer) in zip(self.model_cfgs[1:], built[1:], strict=True):
                    restore_model(extras, mc.name, model, trainer, checkpoint_dir)
            self._build(market, registry, corrupt_every, state, built, extras)
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
        built: list[tuple[CtrModel, Trainer]],
        extras: Mapping[str, bytes],
    ) -> None:
        """The stages, fresh or from a checkpoint's ``state``."""
        cfg, schema, log = self.cfg, self.schema, self.log
        log.create_topic(cfg.stream.raw_topic, cfg.stream.partitions)
        self.source = SimSource(
            market,
            log,
            cfg.stream.raw_topic,
            corrupt_every=corrupt_every,
            writer=None if state is None else state["source"]["writer"],
            produced=0 if state is None else int(state["source"]["produced"]),
            snapshots=open_snapshots(cfg, schema, self.run_dir),
        )
        # Missing snapshots are timed on the replay's clock.
        self.resolver = open_resolver(cfg, schema, self.run_dir, self.clock)
        self.join = JoinStage.from_config(
            log,
            cfg,
            schema,
            self.clock,
            None if state is None else state["join"],
            models=self.model_cfgs,
            store_dir=self.checkpoint_dir / "join",  # one store per raw partition
            resolver=self.resolver,
        )
        self._corrupt_every = corrupt_every
        self.models: dict[str, ModelLoop] = {}
        for mc, (model, trainer) in zip(self.model_cfgs, built, strict=True):
            self.models[mc.name] = ModelLoop(
                cfg,
                mc,
                schema,
                log,
                registry,
                state=None if state is None else state["models"][mc.name],
                extras=extras,
                model=model,
                trainer=trainer,
                events_dir=self.run_dir,
                on_trained=None if self._on_trained is None else _tagged(self._on_trained, mc.name),
                hourly_shadow=self._hourly_shadow,
                transform=None if self._transform is None else _bound(self._transform, mc.name),
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
        cuts: dict[str, list[CutOutcome]] = {}
        outcomes: dict[str, WindowOutcome] = {}
        for name, loop in self.models.items():
            if not train:
                continue
            outcomes[name] = loop.window(start, end_ms, now_ms=end_ms, export=export)
            if loop.hourly is not None:
                for hour in range(start // MS_PER_HOUR + 1, end_ms // MS_PER_HOUR + 1):
                    loop.hour_end(hour * MS_PER_HOUR)
            for cut in cuts_between(self.cfg, start, end_ms):
                cuts.setdefault(name, []).append(loop.cut(cut))
        self.now_ms = end_ms
        self.windows_done += 1
        if self.windows_done % self.cfg.train.checkpoint_every_windows == 0:
            self.checkpoint()
        return TickResult(start, end_ms, events, outcomes, cuts)

    def cut(self, cut_ms: int) -> dict[str, CutOutcome]:
        """Make a cut at ``cut_ms`` now for every model that has not made one at or after it
        (see :meth:`ModelLoop.cut`): what starts a replay that joined history without
        training."""
        return {
            name: loop.cut(cut_ms)
            for name, loop in self.models.items()
            if loop.last_cut_ms is None or loop.last_cut_ms < cut_ms
        }

    def close(self) -> None:
        """Close the stages' readers and the snapshot tables' clients; the log stays open (the
        caller owns it)."""
        self.join.close()
        for loop in self.models.values():
            loop.close()
        self.source.close()
        if self.resolver is not None:
            self.resolver.close()

    def checkpoint(self) -> Path:
        state = {
            "settings": self._settings(self._corrupt_every),
            "now_ms": self.now_ms,
            "windows_done": self.windows_done,
            "source": {"writer": self.source.writer_state(), "produced": self.source.produced},
            "join": self.join.snapshot(),
            "models": {name: loop.state() for name, loop in self.models.items()},
        }
        extras = {PIPELINE_STATE: json.dumps(state, sort_keys=True).encode()}
        first, *others = self.models.values()
        for loop in others:
            extras.update(model_extras(loop.name, loop.model, loop.trainer))
        for loop in self.models.values():
            extras.update(loop.extras())
        return save_checkpoint(self.checkpoint_dir, first.model, first.trainer, extras)

    def _settings(self, corrupt_every: int) -> dict[str, Any]:
        """Settings that shape what the stages write and learn: a restore must match them, or
        the restored stages would produce other messages than the ones already logged. Every
        model's settings are among the join's (``models[i].*``)."""
        cfg = self.cfg
        return {
            **output_settings(cfg, "simulate"),
            **output_settings(cfg, "join"),
            **output_settings(cfg, "train"),
            "pipeline.models": [m.name for m in self.model_cfgs],
            "corrupt_every": corrupt_every,
        }


def _bound(
    fn: Callable[[str, int, pa.Table], pa.Table], name: str
) -> Callable[[int, pa.Table], pa.Table]:
    return lambda end_ms, table: fn(name, end_ms, table)


def _tagged(fn: Callable[[str, str, pa.Table], None], name: str) -> Callable[[str, pa.Table], None]:
    return lambda kind, table: fn(name, kind, table)
