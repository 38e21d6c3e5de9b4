"""The online pipeline: source -> raw log -> join -> samples log -> train -> export.

One :meth:`OnlinePipeline.tick` advances the whole pipeline by one event-time window: one join
stage writes every model's samples, and each model (:class:`ModelStages`) reads its own samples
topic, tests then trains, and exports. A checkpoint (written atomically every
``train.checkpoint_every_windows`` windows) holds, as one unit, every model's weights, optimizer
state, sample positions and exporter state, the join's partitions (positions, joiner states,
exactly-once writers), the simulator's writer and the settings that shape all of it, so a crash
at any point resumes after the last processed item: nothing lost, nothing counted twice.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from minutely.clock import ReplayClock
from minutely.config import Config, ModelConfig
from minutely.errors import CheckpointError, SchemaMismatchError
from minutely.evaluate import WindowReport
from minutely.features import open_resolver
from minutely.model import CtrModel, build_model
from minutely.pipeline.export import Exporter, ExportState, window_metrics
from minutely.pipeline.join_stage import JoinStage
from minutely.pipeline.learner import OnlineLearner, SampleWindows
from minutely.pipeline.settings import check_settings, output_settings
from minutely.pipeline.source import SimSource, open_snapshots
from minutely.registry import Manifest, Registry
from minutely.schema import Schema
from minutely.sim import EventBatch, Market
from minutely.stream import Log
from minutely.train import Trainer, TrainerState, load_latest_checkpoint, save_checkpoint

PIPELINE_STATE = "pipeline.json"


@dataclass(frozen=True)
class TickResult:
    """What one tick did: the window's raw events, and per model the window it trained
    (``windows``, empty when the tick did not train) and the version it published."""

    start_ms: int
    end_ms: int
    events: EventBatch
    windows: dict[str, WindowReport]
    exported: dict[str, Manifest]


@dataclass
class ModelStages:
    """One model's stages: its weights and trainer (built with the model's configured loss),
    the reader of its samples topic, the test-then-train learner and the exporter."""

    cfg: ModelConfig
    model: CtrModel
    trainer: Trainer
    samples: SampleWindows
    learner: OnlineLearner
    exporter: Exporter

    @property
    def name(self) -> str:
        return self.cfg.name


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
        # Relative feature snapshot replicas live in the run folder.
        self.run_dir = checkpoint_dir.parent if run_dir is None else run_dir
        self.clock = ReplayClock(start_ms)
        self.now_ms = start_ms
        self.windows_done = 0
        built: list[tuple[CtrModel, Trainer]] = []
        for mc in self.model_cfgs:
            model = build_model(mc, schema)
            built.append((model, Trainer(model, cfg.train)))
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
                    _restore_model(extras, mc.name, model, trainer, checkpoint_dir)
            self._build(market, registry, corrupt_every, state, built)
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
        self.models: dict[str, ModelStages] = {}
        for mc, (model, trainer) in zip(self.model_cfgs, built, strict=True):
            saved = None if state is None else state["models"][mc.name]
            samples = SampleWindows(
                log,
                mc,
                schema,
                cfg.train.batch_size,
                positions=None if saved is None else _int_keys(saved["positions"]),
            )
            self.models[mc.name] = ModelStages(
                cfg=mc,
                model=model,
                trainer=trainer,
                samples=samples,
                learner=OnlineLearner(trainer, samples, cfg.train),
                exporter=Exporter(
                    registry,
                    mc,
                    schema,
                    cfg.export,
                    None if saved is None else ExportState.from_dict(saved["exporter"]),
                ),
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
        windows: dict[str, WindowReport] = {}
        exported: dict[str, Manifest] = {}
        for name, st in self.models.items():
            report = st.learner.run_window(start, end_ms) if train else None
            if report is not None:
                windows[name] = report
            if export:
                m = st.exporter.maybe_export(
                    st.model, end_ms, st.trainer.samples_seen, window_metrics(report)
                )
                if m is not None:
                    exported[name] = m
        self.now_ms = end_ms
        self.windows_done += 1
        if self.windows_done % self.cfg.train.checkpoint_every_windows == 0:
            self.checkpoint()
        return TickResult(start, end_ms, events, windows, exported)

    def close(self) -> None:
        """Close the stages' readers and the snapshot tables' clients; the log stays open (the
        caller owns it)."""
        self.join.close()
        for st in self.models.values():
            st.samples.close()
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
            "models": {
                name: {
                    "positions": st.samples.positions(),
                    "exporter": st.exporter.state.to_dict(),
                }
                for name, st in self.models.items()
            },
        }
        extras = {PIPELINE_STATE: json.dumps(state, sort_keys=True).encode()}
        first, *others = self.models.values()
        for st in others:
            extras.update(_model_extras(st.name, st.model, st.trainer))
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


def _extra_names(name: str, optimizers: Sequence[str]) -> tuple[str, str, dict[str, str]]:
    """The checkpoint extras that hold model ``name``: weights, counters, optimizer states."""
    prefix = f"model.{name}"
    return (
        f"{prefix}.weights.safetensors",
        f"{prefix}.trainer.json",
        {opt: f"{prefix}.optim.{opt}.pt" for opt in optimizers},
    )


def _model_extras(name: str, model: CtrModel, trainer: Trainer) -> dict[str, bytes]:
    """Model ``name``'s weights, optimizer states and counters as checkpoint extras."""
    optimizers = trainer.optimizer_state_dicts()
    weights, counters, optims = _extra_names(name, sorted(optimizers))
    s = trainer.state()
    out = {
        weights: safetensors.torch.save(model.flat_state_dict()),
        counters: json.dumps(
            {"steps": s.steps, "samples_seen": s.samples_seen, "skipped_batches": s.skipped_batches}
        ).encode(),
    }
    for opt, sd in optimizers.items():
        buf = io.BytesIO()
        torch.save(sd, buf)
        out[optims[opt]] = buf.getvalue()
    return out


def _restore_model(
    extras: Mapping[str, bytes], name: str, model: CtrModel, trainer: Trainer, where: Path
) -> None:
    """Load model ``name`` from a checkpoint's extras (written by :func:`_model_extras`).

    Everything is read and checked against the model and its optimizers before anything is
    changed; a missing, unreadable or ill-fitting part raises :class:`CheckpointError`.
    """
    weights_name, counters_name, optims = _extra_names(name, sorted(trainer.optimizers))
    missing = [n for n in (weights_name, counters_name, *optims.values()) if n not in extras]
    if missing:
        raise CheckpointError(
            f"resume: checkpoint in {where}: expected the state of model {name!r}, got no "
            f"{missing[0]}"
        )
    try:
        weights = safetensors.torch.load(extras[weights_name])
        optim = {
            opt: torch.load(io.BytesIO(extras[file]), weights_only=True)
            for opt, file in optims.items()
        }
        counters = json.loads(extras[counters_name])
        state = TrainerState(
            steps=int(counters["steps"]),
            samples_seen=int(counters["samples_seen"]),
            skipped_batches=int(counters["skipped_batches"]),
        )
    except Exception as exc:
        raise CheckpointError(
            f"resume: checkpoint in {where}: the state of model {name!r} is unreadable ({exc!r})"
        ) from exc
    try:
        model.check_flat_state_dict(weights)
        trainer.check_restore(optim)
    except (SchemaMismatchError, CheckpointError) as exc:
        raise CheckpointError(
            f"resume: checkpoint in {where}: the state of model {name!r} does not fit it ({exc})"
        ) from exc
    model.load_flat_state_dict(weights)
    trainer.restore(state, optim)


def _int_keys(d: dict[str, Any]) -> dict[int, int]:
    return {int(k): int(v) for k, v in d.items()}
