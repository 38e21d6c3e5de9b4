"""One model's training loop: the batch model on a schedule, the online model warm-started from it,
gated exports, monitoring and automatic rollback.

The same :class:`ModelLoop` runs inside the in-process replay (:mod:`minutely.pipeline.runner`) and
the ``minutely train`` service (:mod:`minutely.pipeline.train_service`); both own the clock and
the checkpoint, the loop owns what happens to the model.

* **Batch model** (day or hour mode, ``schedule.cadence``): at every cut (``schedule.at_s`` into
  each period, on the event-time clock) it trains on every sample released since the previous
  cut, labels final (:func:`~minutely.pipeline.day.train_batch_mode`), continuing from its own
  previous state, and is published as a *warm-start version*: marked in the registry, with the
  trainer state that resumes it and the samples stream positions it covers.
* **Online model** (``schedule.online``): it tests then trains on each window; before the first
  cut from its initial weights (a cold start). At every cut it restarts from the batch model:
  weights and optimizer state, and the batch model's stream positions, so the samples it learns
  from are exactly those after the batch model's (none lost, none twice); parameters of
  hour-level features stay frozen at the batch model's values; the batch model is its
  distillation teacher until the next cut.
* **Gated export**: when the export policy is due, the online model as it stands (the candidate)
  and the live version score the window about to be trained on, held back from both, and the
  candidate is published only if it passes the gate.
* **Monitoring and rollback**: the live version and the warm-start version score each window's
  samples (labels matured over their attribution window); on an anomaly the loop pins serving to
  the warm-start version, records the event with its evidence, and restarts online training from
  the warm-start state.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import safetensors.torch
import torch
from torch import Tensor

from minutely.clock import MS_PER_S
from minutely.config import Config, ModelConfig
from minutely.data.tensors import TensorBatch
from minutely.errors import CheckpointError, ConfigError, SchemaMismatchError, StorageError
from minutely.evaluate import WindowReport
from minutely.model import CtrModel, build_model
from minutely.model.artifact import load_model
from minutely.pipeline.day import BatchModeReport, train_batch_mode
from minutely.pipeline.export import (
    Exporter,
    ExportState,
    GateVerdict,
    score_batches,
    window_metrics,
)
from minutely.pipeline.learner import OnlineLearner, SampleWindows
from minutely.pipeline.monitor import Anomaly, Monitor, RollbackEvent, append_event
from minutely.registry import Manifest, Registry
from minutely.schema import Schema
from minutely.stream import DeadLetterSink, Log
from minutely.train import Trainer, TrainerState, TrainingState, frozen_names

logger = logging.getLogger("minutely.loop")

TRAINING_STATE = "training_state.bin"
COUNTERS = "trainer.json"
EVENTS_FILE = "events.jsonl"


def cuts_between(cfg: Config, start_ms: int, end_ms: int) -> list[int]:
    """The schedule's cut times in ``(start_ms, end_ms]``, oldest first.

    >>> from minutely.config import load_config
    >>> cfg = load_config(None, {"schedule": {"cadence": "hour", "at_s": 600}})
    >>> cuts_between(cfg, 0, 2 * 3_600_000)
    [600000, 4200000]
    """
    period = cfg.schedule.period_s * MS_PER_S
    offset = cfg.schedule.at_s * MS_PER_S
    first = ((start_ms - offset) // period + 1) * period + offset
    return list(range(first, end_ms + 1, period))


@dataclass(frozen=True)
class WindowOutcome:
    """What one window did to a model: the online model's test-then-train report (``None``
    when it did not train), the version published, the gate's verdict, the anomaly found and
    the version serving was rolled back to."""

    report: WindowReport | None
    exported: Manifest | None = None
    verdict: GateVerdict | None = None
    anomaly: Anomaly | None = None
    rolled_back_to: str | None = None


@dataclass(frozen=True)
class CutOutcome:
    """What a cut did: the batch model's report and the warm-start version published."""

    cut_ms: int
    report: BatchModeReport
    version: Manifest


@dataclass
class _Shadow:
    """The hourly comparison model: weights, trainer, its reader of the samples topic."""

    model: CtrModel
    trainer: Trainer
    samples: SampleWindows


@dataclass
class _Version:
    """A registry version held in memory: its name, the model rebuilt from it and the event
    time its weights reflect."""

    version: str
    model: CtrModel
    created_ms: int


class ModelLoop:
    """Everything that trains, publishes and guards one model (see the module docstring).

    ``state`` and ``extras`` are what :meth:`state` and :meth:`extras` returned at the last
    checkpoint (``None`` for a fresh start); the online model's own weights and optimizer state
    are the caller's to checkpoint (:attr:`model`, :attr:`trainer`). ``events_dir`` receives
    ``events.jsonl``, one line per rollback. ``on_trained(kind, table)`` sees every table a
    model trains on (``kind`` ``"batch"``, ``"online"`` or ``"hourly"``), for audits.

    With ``hourly_shadow`` an hour model runs beside the schedule, for comparison only (never
    published): at each cut it restarts from the batch model, and at the end of every hour it
    trains on the samples released during the hour (:attr:`hourly_model`). ``transform(end_ms,
    table)`` rewrites each online window's samples before anything sees them: fault injection
    for tests and experiments (flipped labels, a shifted label rate).
    """

    def __init__(
        self,
        cfg: Config,
        model_cfg: ModelConfig,
        schema: Schema,
        log: Log,
        registry: Registry,
        *,
        state: Mapping[str, Any] | None = None,
        extras: Mapping[str, bytes] | None = None,
        model: CtrModel | None = None,
        trainer: Trainer | None = None,
        events_dir: Path | None = None,
        dead_letters: DeadLetterSink | None = None,
        on_trained: Callable[[str, pa.Table], None] | None = None,
        hourly_shadow: bool = False,
        transform: Callable[[int, pa.Table], pa.Table] | None = None,
    ) -> None:
        self.config = cfg
        self.cfg = model_cfg
        self.schema = schema
        self.registry = registry
        self._events_dir = events_dir
        self._on_trained = on_trained
        name = model_cfg.name
        # The online model first, then the batch model: torch's generator draws in that order.
        self.model = model if model is not None else build_model(model_cfg, schema)
        self.trainer = (
            trainer
            if trainer is not None
            else Trainer(self.model, cfg.train, frozen=frozen_names(self.model))
        )
        self.batch_model = build_model(model_cfg, schema)
        self.batch_trainer = Trainer(self.batch_model, cfg.train)
        st = dict(state or {})

        def reader(key: str) -> SampleWindows:
            """A reader of the model's samples topic from the checkpointed positions ``key``."""
            positions = _int_keys(st.get(key, {}))
            return SampleWindows(
                log,
                model_cfg,
                schema,
                cfg.train.batch_size,
                positions=positions,
                dead_letters=dead_letters,
            )

        self.samples = reader("positions")
        self.batch_samples = reader("batch_positions")
        self.learner = OnlineLearner(self.trainer, self.samples, cfg.train)
        self._transform = transform
        self.hourly: _Shadow | None = None
        if hourly_shadow:
            hourly_model = build_model(model_cfg, schema)
            self.hourly = _Shadow(
                hourly_model, Trainer(hourly_model, cfg.train), reader("hourly_positions")
            )
        self.exporter = Exporter(
            registry,
            model_cfg,
            schema,
            cfg.export,
            ExportState.from_dict(st["exporter"]) if "exporter" in st else None,
            delta_chain_max=cfg.registry.delta_chain_max,
        )
        self.monitor = Monitor(cfg.monitor)
        if "monitor" in st:
            self.monitor = Monitor.from_dict(cfg.monitor, st["monitor"])
        self.last_cut_ms: int | None = st.get("last_cut_ms")
        self.rolled_back: bool = bool(st.get("rolled_back", False))
        self.rollbacks: int = int(st.get("rollbacks", 0))
        self._last_report: WindowReport | None = None
        self._last_now_ms: int | None = None
        self._last_window_end_ms: int | None = None
        self._samples_per_s = 0.0
        self.warm: _Version | None = None
        self.live: _Version | None = None
        self._warm_state: TrainingState | None = None
        batch_key = f"{name}.batch"
        if extras is not None and _extra_names(batch_key, [])[0] in extras:
            restore_model(extras, batch_key, self.batch_model, self.batch_trainer, "resume")
        hourly_key = f"{name}.hourly"
        if (
            self.hourly is not None
            and extras is not None
            and _extra_names(hourly_key, [])[0] in extras
        ):
            restore_model(extras, hourly_key, self.hourly.model, self.hourly.trainer, "resume")
        warm_version = st.get("warm_version")
        if warm_version is not None:
            self._load_warm(str(warm_version))
        live_version = st.get("live_version")
        if live_version is not None:
            self.live = self._version(str(live_version))

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def online(self) -> bool:
        """Whether the online model trains (``schedule.online``)."""
        return self.config.schedule.online

    # -- the schedule ---------------------------------------------------------------------

    def cut(self, cut_ms: int) -> CutOutcome:
        """Train the batch model on every sample released before ``cut_ms`` since the last cut,
        publish it as a warm-start version and, when online, restart the online model from it."""
        report = self._train_slice("batch", self.batch_trainer, self.batch_samples, cut_ms)
        state = self.batch_trainer.snapshot()
        positions = self.batch_samples.positions()
        manifest = self.exporter.export(
            self.batch_model,
            cut_ms,
            self.batch_trainer.samples_seen,
            {"train_auc": report.train_auc, "train_logloss": report.train_logloss},
            as_base=True,
            mode=self.config.schedule.cadence,
            resume={
                TRAINING_STATE: state.to_bytes(),
                COUNTERS: _counters_json(self.batch_trainer.state()),
            },
            resume_positions=positions,
        )
        self.last_cut_ms = cut_ms
        teacher = _frozen_copy(self.batch_model)
        self.warm = _Version(manifest.version, teacher, manifest.created_ms)
        self._warm_state = state
        self.live = self.warm
        if self.rolled_back:
            self.registry.unpin(self.name)
            self.rolled_back = False
        if self.config.schedule.online:
            self._restart_online(positions)
        if self.hourly is not None:
            self.hourly.trainer.load_state(state)
            # It continues the batch model's work (and is no fresh model whose bias
            # train_batch_mode would set).
            self.hourly.trainer.set_counters(self.batch_trainer.state())
            self.hourly.samples.seek(positions)
        self.exporter.warm_started(cut_ms, manifest.version, self.trainer.samples_seen)
        self.monitor.reset(cut_ms)
        logger.info(
            "%s: cut at %d: batch model trained on %d samples, published %s",
            self.name,
            cut_ms,
            report.samples,
            manifest.version,
        )
        return CutOutcome(cut_ms, report, manifest)

    def hour_end(self, end_ms: int) -> BatchModeReport | None:
        """The hourly shadow's step at the end of an hour: train on the samples released since
        its last step (nothing before the first cut)."""
        if self.hourly is None or self.warm is None:
            return None
        return self._train_slice("hourly", self.hourly.trainer, self.hourly.samples, end_ms)

    def _train_slice(
        self, kind: str, trainer: Trainer, samples: SampleWindows, end_ms: int
    ) -> BatchModeReport:
        """Batch-train ``trainer`` on what ``samples`` holds released before ``end_ms``."""
        return train_batch_mode(
            trainer,
            samples,
            end_ms,
            self.config.train.day_epochs,
            self.config.train.seed,
            on_table=lambda table: self._audit(kind, table),
        )

    @property
    def hourly_model(self) -> CtrModel | None:
        """The hourly shadow's model (``None`` without one)."""
        return None if self.hourly is None else self.hourly.model

    def _restart_online(self, positions: Mapping[int, int]) -> None:
        """Restart the online model from the warm-start state, at ``positions``."""
        assert self.warm is not None
        assert self._warm_state is not None
        self.trainer.load_state(self._warm_state)
        self.trainer.set_teacher(self.warm.model if self.cfg.distill_alpha > 0 else None)
        self.samples.seek(positions)

    def continue_batch_from(self, version: str) -> None:
        """Continue the batch model from warm-start ``version``: its trainer state and the
        stream positions it covers."""
        manifest, blobs = self.registry.load_resume(self.name, version)
        self.batch_trainer.load_state(TrainingState.from_bytes(blobs[TRAINING_STATE]))
        if COUNTERS in blobs:
            self.batch_trainer.set_counters(_counters(blobs[COUNTERS], f"{self.name} {version}"))
        self.batch_samples.seek(_int_keys(manifest.resume_positions))
        self.exporter.state.last_version = version

    # -- one window -----------------------------------------------------------------------

    def window(
        self, start_ms: int, end_ms: int, *, now_ms: int, export: bool = True
    ) -> WindowOutcome:
        """The online model's window ``[start_ms, end_ms)``: monitor the live version, maybe
        publish the candidate (gated), then test and train. Without ``schedule.online`` the
        window is left unread. Before the first cut there is no warm-start version: the online
        model trains from its initial weights and nothing is monitored."""
        if not self.online:
            return WindowOutcome(None)
        table = self.samples.read_table(end_ms)
        if table is not None and self._transform is not None:
            table = self._transform(end_ms, table)
        batches = [] if table is None else list(self.samples.micro_batches(table))
        anomaly: Anomaly | None = None
        rolled_to: str | None = None
        live_preds: np.ndarray | None = None
        teacher_logits: list[Tensor] | None = None
        if self.config.monitor.enabled and batches and self.warm is not None:
            anomaly, live_preds, warm_logits = self._observe(end_ms, now_ms, batches)
            # The distillation teacher is the warm-start model: its logits serve both.
            teacher_logits = warm_logits if self.trainer.teacher is not None else None
            if anomaly is not None and self.config.monitor.rollback:
                rolled_to = self.rollback(anomaly, now_ms)
                live_preds = None
        exported: Manifest | None = None
        verdict: GateVerdict | None = None
        if export and rolled_to is None:
            outcome = self.exporter.maybe_export_gated(
                self.model,
                end_ms,
                self.trainer.samples_seen,
                window_metrics(self._last_report),
                batches,
                None if self.live is None else self.live.model,
                live_preds=live_preds,
                live_version=None if self.live is None else self.live.version,
            )
            exported, verdict = outcome.manifest, outcome.verdict
            if exported is not None:
                self.live = _Version(exported.version, _frozen_copy(self.model), end_ms)
                if self.rolled_back:
                    self.registry.unpin(self.name)
                    self.rolled_back = False
        if table is not None:
            self._audit("online", table)
        self.learner.train_batches(batches, teacher_logits=teacher_logits)
        report = self.learner.metrics.close_window(start_ms)
        self._last_report = report
        if self._last_now_ms is not None and now_ms > self._last_now_ms:
            self._samples_per_s = report.n / ((now_ms - self._last_now_ms) / 1e3)
        self._last_now_ms = now_ms
        self._last_window_end_ms = end_ms
        return WindowOutcome(report, exported, verdict, anomaly, rolled_to)

    def _observe(
        self, end_ms: int, now_ms: int, batches: list[TensorBatch]
    ) -> tuple[Anomaly | None, np.ndarray, list[Tensor]]:
        """Score the window with the live and the warm-start version: the monitor's verdict,
        the live version's predictions (the gate's too) and the warm-start model's logits per
        batch (the distillation teacher's, so training does not compute them again)."""
        assert self.warm is not None
        warm_model = self.warm.model
        with torch.no_grad():
            warm_logits = [warm_model(b) for b in batches]
        keeps = [~b.is_correction.numpy() for b in batches]
        warm_preds = np.concatenate(
            [
                warm_model.probabilities(z).numpy().astype(np.float64)[k]
                for z, k in zip(warm_logits, keeps, strict=True)
            ]
        )
        labels = np.concatenate(
            [b.labels.numpy().astype(np.float64)[k] for b, k in zip(batches, keeps, strict=True)]
        )
        live = self.live if self.live is not None else self.warm
        live_preds = (
            warm_preds
            if live.version == self.warm.version
            else score_batches(live.model, batches)[0]
        )
        anomaly = self.monitor.observe(
            end_ms,
            live_preds,
            warm_preds,
            labels,
            live_version=live.version,
            warm_version=self.warm.version,
            now_ms=now_ms,
        )
        return anomaly, live_preds, warm_logits

    def progress(self, now_ms: int) -> dict[str, Any]:
        """Lag of the last trained window behind ``now_ms`` (the service clock), throughput of
        the last window, age of the live version, and the versions serving and warm-started
        (JSON; figures absent before the first window)."""
        out: dict[str, Any] = {
            "live_version": None if self.live is None else self.live.version,
            "warm_version": None if self.warm is None else self.warm.version,
            "rollbacks": self.rollbacks,
            "exports_refused": self.exporter.state.refused,
            "exports_skipped": self.exporter.state.skipped,
        }
        if self._last_window_end_ms is not None:
            live_created = self._last_window_end_ms if self.live is None else self.live.created_ms
            out.update(
                self.monitor.progress(
                    now_ms,
                    last_window_end_ms=self._last_window_end_ms,
                    live_version_created_ms=live_created,
                    samples_per_s=self._samples_per_s,
                ).to_dict()
            )
        return out

    def check_stall(self, now_ms: int) -> str | None:
        """Roll back when no window was trained for ``monitor.stall_timeout_s``; the version
        serving was pointed to, or ``None``."""
        if not (self.online and self.config.monitor.enabled) or self.warm is None:
            return None
        anomaly = self.monitor.check_stall(now_ms)
        if anomaly is None or not self.config.monitor.rollback:
            return None
        return self.rollback(anomaly, now_ms)

    def rollback(self, anomaly: Anomaly, now_ms: int) -> str | None:
        """Point serving to the warm-start version, record the event, restart online training
        from the warm-start state; the version rolled back to (``None`` if already there)."""
        assert self.warm is not None
        assert self._warm_state is not None
        live = self.live.version if self.live is not None else None
        if live == self.warm.version:
            return None
        self.registry.pin(self.name, self.warm.version)
        event = RollbackEvent(
            model=self.name,
            at_ms=now_ms,
            from_version=live,
            to_version=self.warm.version,
            kind=anomaly.kind,
            evidence=anomaly.evidence,
        )
        if self._events_dir is not None:
            append_event(self._events_dir / EVENTS_FILE, event)  # logs it too
        else:
            logger.warning(
                "%s: rolled back from %s to %s (%s)", self.name, live, event.to_version, event.kind
            )
        self.trainer.load_state(self._warm_state)
        self.live = self.warm
        self.rolled_back = True
        self.rollbacks += 1
        self.monitor.reset(now_ms)
        return self.warm.version

    # -- checkpoints ----------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the loop besides the online model (JSON)."""
        return {
            "positions": {str(p): o for p, o in self.samples.positions().items()},
            "batch_positions": {str(p): o for p, o in self.batch_samples.positions().items()},
            "exporter": self.exporter.state.to_dict(),
            "monitor": self.monitor.to_dict(),
            "last_cut_ms": self.last_cut_ms,
            "warm_version": None if self.warm is None else self.warm.version,
            "live_version": None if self.live is None else self.live.version,
            "rolled_back": self.rolled_back,
            "rollbacks": self.rollbacks,
            **(
                {}
                if self.hourly is None
                else {
                    "hourly_positions": {
                        str(p): o for p, o in self.hourly.samples.positions().items()
                    }
                }
            ),
        }

    def extras(self) -> dict[str, bytes]:
        """The batch model's (and the hourly shadow's) weights, optimizer state and counters,
        as checkpoint extras."""
        out = model_extras(f"{self.name}.batch", self.batch_model, self.batch_trainer)
        if self.hourly is not None:
            out.update(model_extras(f"{self.name}.hourly", self.hourly.model, self.hourly.trainer))
        return out

    def close(self) -> None:
        self.samples.close()
        self.batch_samples.close()
        if self.hourly is not None:
            self.hourly.samples.close()

    # -- internals ------------------------------------------------------------------------

    def _load_warm(self, version: str) -> None:
        """The warm-start version and its trainer state, from the registry (on a resume)."""
        _, blobs = self.registry.load_resume(self.name, version)
        self._warm_state = TrainingState.from_bytes(blobs[TRAINING_STATE])
        self.warm = self._version(version)
        if self.config.schedule.online:
            self.trainer.set_teacher(self.warm.model if self.cfg.distill_alpha > 0 else None)

    def _version(self, version: str) -> _Version:
        manifest, model = load_model(
            self.registry, self.name, version, expected_fingerprint=self.schema.fingerprint()
        )
        return _Version(version, model, manifest.created_ms)

    def _audit(self, kind: str, table: pa.Table) -> None:
        if self._on_trained is not None:
            self._on_trained(kind, table)


def _frozen_copy(model: CtrModel) -> CtrModel:
    out = copy.deepcopy(model).eval()
    for p in out.parameters():
        p.requires_grad_(False)
    return out


# -- a model's state as checkpoint extras --------------------------------------------------------


def _extra_names(name: str, optimizers: list[str]) -> tuple[str, str, dict[str, str]]:
    """The checkpoint extras that hold model ``name``: weights, counters, optimizer states."""
    prefix = f"model.{name}"
    return (
        f"{prefix}.weights.safetensors",
        f"{prefix}.trainer.json",
        {opt: f"{prefix}.optim.{opt}.pt" for opt in optimizers},
    )


def _counters_json(s: TrainerState) -> bytes:
    return json.dumps(
        {"steps": s.steps, "samples_seen": s.samples_seen, "skipped_batches": s.skipped_batches}
    ).encode()


def _counters(blob: bytes, where: str) -> TrainerState:
    try:
        d = json.loads(blob)
        return TrainerState(
            steps=int(d["steps"]),
            samples_seen=int(d["samples_seen"]),
            skipped_batches=int(d["skipped_batches"]),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{where}: trainer counters: expected JSON counters ({exc!r})"
        ) from exc


def model_extras(name: str, model: CtrModel, trainer: Trainer) -> dict[str, bytes]:
    """Model ``name``'s weights, optimizer states and counters as checkpoint extras."""
    optimizers = trainer.optimizer_state_dicts()
    weights, counters, optims = _extra_names(name, sorted(optimizers))
    out = {
        weights: safetensors.torch.save(model.flat_state_dict()),
        counters: _counters_json(trainer.state()),
    }
    for opt, sd in optimizers.items():
        buf = io.BytesIO()
        torch.save(sd, buf)
        out[optims[opt]] = buf.getvalue()
    return out


def restore_model(
    extras: Mapping[str, bytes], name: str, model: CtrModel, trainer: Trainer, where: Any
) -> None:
    """Load model ``name`` from a checkpoint's extras (written by :func:`model_extras`).

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
        state = _counters(extras[counters_name], f"model {name!r}")
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


def _int_keys(d: Mapping[str, Any]) -> dict[int, int]:
    return {int(k): int(v) for k, v in d.items()}


__all__ = [
    "CutOutcome",
    "ModelLoop",
    "WindowOutcome",
    "cuts_between",
    "model_extras",
    "restore_model",
]


def run_batch_mode(
    cfg: Config,
    model_name: str,
    schema: Schema,
    log: Log,
    registry: Registry,
    *,
    mode: Literal["day", "hour"],
    end_ms: int,
    start_ms: int | None = None,
) -> CutOutcome:
    """``minutely train --mode day|hour``: train the batch model on the samples released in
    ``[start_ms, end_ms)`` (one period before ``end_ms`` by default) and publish it as a
    warm-start version.

    It continues from the newest warm-start version of the model in ``registry`` (its weights,
    optimizer state and stream positions) when there is one, else from a fresh model; samples
    before ``start_ms`` that it has not trained on are skipped. It refuses a range whose samples
    the log does not yet hold completely (every partition must show the join's time at or past
    ``end_ms``), naming how far they are.
    """
    if mode not in ("day", "hour"):
        raise ConfigError("--mode", "'day' or 'hour' for a batch run", mode)
    batch_cfg = dataclasses.replace(
        cfg, schedule=dataclasses.replace(cfg.schedule, cadence=mode, online=False)
    )
    period_ms = batch_cfg.schedule.period_s * MS_PER_S
    start = end_ms - period_ms if start_ms is None else start_ms
    if not start < end_ms:
        raise ConfigError("--start", f"a time before --end ({end_ms})", start)
    loop = ModelLoop(batch_cfg, cfg.model(model_name), schema, log, registry)
    try:
        previous = registry.warm_start_versions(model_name)
        if previous:
            loop.continue_batch_from(previous[-1])
        if not loop.batch_samples.fill(end_ms):
            reached = loop.batch_samples.complete_until()
            raise StorageError(
                f"samples topic {loop.cfg.samples_topic}: expected samples released up to "
                f"{end_ms} on every partition, got "
                + ("none" if reached is None else f"up to {reached}")
                + "; let the join run further or choose an earlier --end"
            )
        skipped = loop.batch_samples.read_table(start)
        if skipped is not None:
            logger.info(
                "%s: skipped %d samples released before %d", model_name, skipped.num_rows, start
            )
        return loop.cut(end_ms)
    finally:
        loop.close()
