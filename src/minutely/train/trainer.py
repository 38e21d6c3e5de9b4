"""The online trainer: test-then-train on micro-batches with two optimizers.

Embedding tables are updated by ``SparseAdam`` (learning rate ``cfg.embedding_lr``; the faster
:class:`~minutely.train.optim.RowSparseAdam` implementation), which touches only the rows a
batch looked up; everything else by ``Adam`` (``cfg.lr``). Adam keeps a
constant step size, so the model keeps adapting as traffic drifts; Adagrad, the usual choice for
sparse CTR models, divides every step by the sum of all past squared gradients, so a model that
has run for days takes vanishing steps on exactly the ids that matter most and stops tracking
them. A dense Adam over the tables would read and write every row of every table per step.

The thread count is the caller's (``torch.set_num_threads``): the trainer never changes it.

Three things tie an online trainer to the day model it continues from:

* **warm start**: :meth:`Trainer.warm_start` copies another trainer's weights and, by
  parameter name, its optimizers' state (:class:`~minutely.train.state.TrainingState`), so the
  online model takes the very steps the day model would have taken;
* **frozen parameters**: ``Trainer(..., frozen=names)`` keeps those parameters at their values
  (no gradient, no optimizer state); :func:`frozen_names` names the hour-level group when the
  model's config says ``freeze_hour_level``;
* **distillation**: :meth:`Trainer.set_teacher` mixes a frozen copy of the day model's
  predictions into the loss (:class:`~minutely.train.losses.DistilledLoss`, weight
  ``distill_alpha`` of the model's config).

>>> import torch
>>> from minutely.config import ModelConfig, TrainConfig
>>> from minutely.model import build_model, synthetic_batch
>>> from minutely.schema import default_schema
>>> schema = default_schema()
>>> _ = torch.manual_seed(0)
>>> trainer = Trainer(build_model(ModelConfig(arch="lr", buckets=256), schema), TrainConfig())
>>> preds = trainer.evaluate_then_train(synthetic_batch(schema, 32, buckets=256, seed=0))
>>> preds.shape, trainer.steps, trainer.samples_seen
((32,), 1, 32)
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from minutely.config import TrainConfig
from minutely.data.tensors import TensorBatch
from minutely.errors import CheckpointError, ConfigError, SchemaMismatchError
from minutely.model.base import HOUR_LEVEL, CtrModel, model_groups
from minutely.train.losses import DistilledLoss, Loss, model_loss
from minutely.train.optim import RowSparseAdam
from minutely.train.state import (
    StateValue,
    TrainingState,
    as_dense_step,
    as_sparse_step,
    check_step,
    copy_value,
    logit_space,
)

logger = logging.getLogger(__name__)

SPARSE = "sparse"
DENSE = "dense"
# The per-parameter state of both optimizers (Adam without amsgrad, SparseAdam).
_STATE_KEYS = frozenset({"step", "exp_avg", "exp_avg_sq"})


def frozen_names(model: CtrModel) -> list[str]:
    """The parameters online training keeps frozen: the hour-level group of
    :func:`~minutely.model.model_groups` when ``model.cfg.freeze_hour_level``, else none.

    >>> from minutely.config import ModelConfig
    >>> from minutely.model import build_model
    >>> from minutely.schema import default_schema
    >>> m = build_model(ModelConfig(buckets=16, embedding_dim=2, hidden=(4,)), default_schema())
    >>> frozen_names(m)
    ['hour_dense_linear.weight', 'mlp.from_hour_dense.weight']
    """
    return list(model_groups(model)[HOUR_LEVEL]) if model.cfg.freeze_hour_level else []


@dataclass(frozen=True)
class TrainerState:
    """The trainer's counters: what a checkpoint stores besides weights and optimizer state."""

    steps: int = 0
    samples_seen: int = 0
    skipped_batches: int = 0


class Trainer:
    """Trains ``model`` in place, one micro-batch per call.

    The loss is ``loss`` when given, else the one the model's config names
    (:func:`~minutely.train.losses.model_loss` of ``model.cfg``), so every caller trains the
    configured objective. Corrections (``batch.is_correction``) are trained on as that loss sees
    them. Predictions are the model's :meth:`~minutely.model.CtrModel.probabilities` of its
    logits (calibrated for ``loss = "fnc"``).

    A batch whose loss is not finite (a NaN feature, say) updates nothing: it is counted in
    ``skipped_batches`` and logged, so one bad batch cannot poison the model.

    The parameters named in ``frozen`` (e.g. :func:`frozen_names` of the model) have
    ``requires_grad`` turned off on the model and are given to no optimizer: they keep their
    values and have no optimizer state, in memory or in checkpoints. A name that is not a
    parameter of the model raises ``ValueError`` naming it. Parameters whose ``requires_grad``
    a caller turns off later get no gradient either, and both optimizers leave them alone.

    With a teacher (:meth:`set_teacher`) and ``model.cfg.distill_alpha > 0`` the loss trained
    (and returned by :meth:`train_step`) is :class:`~minutely.train.losses.DistilledLoss` of
    ``loss``; without one, ``loss`` itself.
    """

    def __init__(
        self,
        model: CtrModel,
        cfg: TrainConfig,
        loss: Loss | None = None,
        *,
        frozen: Iterable[str] = (),
    ) -> None:
        self.model = model
        self.cfg = cfg
        self.loss: Loss = loss if loss is not None else model_loss(model.cfg)
        self._lrs = {SPARSE: cfg.embedding_lr, DENSE: cfg.lr}
        self._frozen = _check_frozen(model, frozen)
        self._optimizers: dict[str, torch.optim.Optimizer] = {}
        # The parameter names of each optimizer, in its order: what maps state by name.
        self._names: dict[str, list[str]] = {}
        tables = [(n, p) for n, p in model.embedding_parameters() if n not in self._frozen]
        if tables:
            if not cfg.embedding_lr > 0:
                raise ConfigError("train.embedding_lr", "float > 0 (SparseAdam)", cfg.embedding_lr)
            self._optimizers[SPARSE] = RowSparseAdam([p for _, p in tables], lr=cfg.embedding_lr)
            self._names[SPARSE] = [n for n, _ in tables]
        rest = [(n, p) for n, p in model.dense_parameters() if n not in self._frozen]
        if rest:
            self._optimizers[DENSE] = torch.optim.Adam([p for _, p in rest], lr=cfg.lr)
            self._names[DENSE] = [n for n, _ in rest]
        for name, param in model.named_parameters():
            if name in self._frozen:
                param.requires_grad_(False)
        self._teacher: CtrModel | None = None
        self._state = TrainerState()

    @property
    def steps(self) -> int:
        """Updates applied so far."""
        return self._state.steps

    @property
    def samples_seen(self) -> int:
        """Rows of the batches that updated the model."""
        return self._state.samples_seen

    @property
    def skipped_batches(self) -> int:
        """Batches not applied because their loss was not finite."""
        return self._state.skipped_batches

    @property
    def optimizers(self) -> Mapping[str, torch.optim.Optimizer]:
        """``"sparse"`` (SparseAdam over the tables) and ``"dense"`` (Adam), where present."""
        return dict(self._optimizers)

    @property
    def frozen(self) -> frozenset[str]:
        """The names of the parameters this trainer keeps frozen."""
        return self._frozen

    # -- distillation ---------------------------------------------------------------------

    @property
    def teacher(self) -> CtrModel | None:
        """The frozen copy of the teacher :meth:`set_teacher` was given, or ``None``."""
        return self._teacher

    def set_teacher(self, teacher: CtrModel | None) -> None:
        """Distil from ``teacher`` from the next step on (``None``: stop distilling).

        The trainer keeps its own copy of ``teacher`` as it is now, in eval mode with
        ``requires_grad`` off: the teacher's parameters get no gradient and are never updated,
        and later changes to ``teacher`` do not reach the copy. The weight of the
        distillation term is ``model.cfg.distill_alpha``; at 0 the loss is ``loss`` exactly.

        Raises ``ValueError`` if ``teacher`` is the trained model itself,
        :class:`~minutely.errors.SchemaMismatchError` naming each difference if it is not of
        this model's architecture, schema, buckets and logit space (``fnc`` or not), and
        :class:`~minutely.errors.ConfigError` for a ``distill_alpha`` outside ``[0, 1]``.
        """
        if teacher is None:
            self._teacher = None
            return
        if teacher is self.model:
            raise ValueError(
                "set_teacher: expected a model other than the one this trainer trains, got "
                "the trained model itself"
            )
        alpha = self.model.cfg.distill_alpha
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(
                f"models.{self.model.cfg.name}.distill_alpha", "a number in [0, 1]", alpha
            )
        diffs = _differences(
            self.model,
            arch=teacher.arch,
            fingerprint=teacher.schema.fingerprint(),
            loss=teacher.cfg.loss,
        )
        if teacher.cfg.buckets != self.model.cfg.buckets:
            diffs.append(f"buckets: expected {self.model.cfg.buckets}, got {teacher.cfg.buckets}")
        if diffs:
            raise SchemaMismatchError(
                f"teacher: expected a model that reads batches as this one does; got "
                f"{'; '.join(diffs)}"
            )
        frozen = copy.deepcopy(teacher)
        frozen.eval()
        for p in frozen.parameters():
            p.requires_grad_(False)
            p.grad = None
        self._teacher = frozen

    @property
    def objective(self) -> Loss:
        """The loss a step trains: ``loss``, distilled from the teacher when there is one and
        ``model.cfg.distill_alpha > 0``."""
        alpha = self.model.cfg.distill_alpha
        if self._teacher is None or alpha == 0.0:
            return self.loss
        return DistilledLoss(self.loss, self._teacher, alpha)

    def predict(self, batch: TensorBatch) -> np.ndarray:
        """Probabilities ``[B]`` (float32, the model's ``predict``); no update."""
        return self.model.predict(batch).numpy()

    def train_step(self, batch: TensorBatch) -> float:
        """One update on ``batch``; returns its loss before the update (``nan`` if empty)."""
        return self._step(batch)[0]

    def evaluate_then_train(
        self, batch: TensorBatch, teacher_logits: Tensor | None = None
    ) -> np.ndarray:
        """Score ``batch``, then train on it: returns the predictions made before the update.

        One forward pass serves both (model outputs do not depend on train/eval mode).
        ``teacher_logits`` are the teacher's logits on ``batch`` when the caller has them
        already (it holds the same teacher and scored the batch with it): the distillation term
        then uses them instead of running the teacher again.
        """
        return self._step(batch, teacher_logits)[1]

    def _step(
        self, batch: TensorBatch, teacher_logits: Tensor | None = None
    ) -> tuple[float, np.ndarray]:
        if len(batch) == 0:
            return math.nan, np.empty(0, dtype=np.float32)
        for opt in self._optimizers.values():
            opt.zero_grad(set_to_none=True)
        logits = self.model(batch)
        objective = self.objective
        if teacher_logits is not None and isinstance(objective, DistilledLoss):
            given = teacher_logits
            objective = DistilledLoss(objective.base, lambda _batch: given, objective.alpha)
        loss: Tensor = objective(logits, batch)
        value = float(loss.detach())
        preds = self.model.probabilities(logits.detach()).numpy()
        s = self._state
        if not math.isfinite(value):
            self._state = TrainerState(s.steps, s.samples_seen, s.skipped_batches + 1)
            logger.warning("skipped a batch of %d rows: loss is %s", len(batch), value)
            return value, preds
        torch.autograd.backward(loss)
        for opt in self._optimizers.values():
            opt.step()
        self._state = TrainerState(s.steps + 1, s.samples_seen + len(batch), s.skipped_batches)
        return value, preds

    # -- snapshot -------------------------------------------------------------------------

    def state(self) -> TrainerState:
        return self._state

    def optimizer_state_dicts(self) -> dict[str, dict[str, Any]]:
        """Each optimizer's ``state_dict()``, by name (tensors are shared, not copied).

        Every param group also lists its parameters' names under ``"param_names"``, which
        :meth:`check_restore` compares.
        """
        out: dict[str, dict[str, Any]] = {}
        for name, opt in self._optimizers.items():
            sd = opt.state_dict()
            names = iter(self._names[name])
            for group in sd["param_groups"]:
                group["param_names"] = [next(names) for _ in group["params"]]
            out[name] = sd
        return out

    def check_restore(self, optimizer_states: Mapping[str, Mapping[str, Any]]) -> None:
        """Raise :class:`CheckpointError` unless ``optimizer_states`` fits these optimizers.

        Checks the optimizer names, the parameter count of every group, the parameter names
        where the states list them (a trainer with other frozen parameters has other lists) and
        the shape of every per-parameter state tensor (Adam's moments), so a restore never
        half-succeeds.
        """
        if set(optimizer_states) != set(self._optimizers):
            raise CheckpointError(
                f"optimizer states: expected {sorted(self._optimizers)}, "
                f"got {sorted(optimizer_states)}"
            )
        for name, opt in self._optimizers.items():
            _check_optimizer_state(name, opt, self._names[name], optimizer_states[name])

    def restore(
        self, state: TrainerState, optimizer_states: Mapping[str, Mapping[str, Any]]
    ) -> None:
        """Load counters and optimizer states (after :meth:`check_restore`).

        Learning rates stay those of this trainer's config: the config is the source of truth
        for hyperparameters, the checkpoint only for learned state.
        """
        self.check_restore(optimizer_states)
        for name, opt in self._optimizers.items():
            opt.load_state_dict(dict(optimizer_states[name]))
            for group in opt.param_groups:
                group["lr"] = self._lrs[name]
        self._state = state

    # -- learned state by name: warm start and rollback -----------------------------------

    def set_counters(self, state: TrainerState) -> None:
        """Set :attr:`steps`, :attr:`samples_seen` and :attr:`skipped_batches`: what a trainer
        continuing another one's work (a batch model resumed from its warm-start version)
        counts on from."""
        self._state = state

    def snapshot(self) -> TrainingState:
        """A deep copy of the weights and of every parameter's optimizer state, by name.

        Later steps change neither; :meth:`load_state` puts them back (rollback), into this
        trainer or another of the same model (:meth:`warm_start`).
        """
        optimizer: dict[str, dict[str, StateValue]] = {}
        for opt_name, opt in self._optimizers.items():
            params = [p for g in opt.param_groups for p in g["params"]]
            for name, param in zip(self._names[opt_name], params, strict=True):
                per_param = opt.state.get(param)
                if per_param:
                    optimizer[name] = {k: copy_value(v) for k, v in per_param.items()}
        return TrainingState(
            arch=self.model.arch,
            schema_fingerprint=self.model.schema.fingerprint(),
            loss=self.model.cfg.loss,
            weights={n: p.detach().clone() for n, p in self.model.named_parameters()},
            optimizer=optimizer,
        )

    def check_state(self, state: TrainingState) -> None:
        """Raise :class:`CheckpointError` unless ``state`` fits this trainer's model.

        The state must come from a model of this architecture, schema and logit space, hold
        every parameter's weights with this model's names, shapes and dtypes, and optimizer
        state only for parameters of this model, with the keys ``step``, ``exp_avg`` and
        ``exp_avg_sq``, moments of the parameter's shape and a whole ``step >= 0``.
        """
        diffs = _differences(
            self.model, arch=state.arch, fingerprint=state.schema_fingerprint, loss=state.loss
        )
        if diffs:
            raise CheckpointError(
                f"training state: expected one of this {self.model.arch} model; got "
                f"{'; '.join(diffs)}"
            )
        try:
            self.model.check_flat_state_dict(state.weights)
        except SchemaMismatchError as exc:
            raise CheckpointError(f"training state: {exc}") from exc
        params = dict(self.model.named_parameters())
        unknown = sorted(set(state.optimizer) - set(params))
        if unknown:
            raise CheckpointError(
                f"training state: expected optimizer state of parameters of the model, got "
                f"state of unknown parameters {unknown}"
            )
        for name, per_param in state.optimizer.items():
            if name in self._frozen:
                continue
            where = f"training state: optimizer state of {name!r}"
            if set(per_param) != _STATE_KEYS:
                raise CheckpointError(
                    f"{where}: expected keys {sorted(_STATE_KEYS)}, got {sorted(per_param)}"
                )
            want = list(params[name].shape)
            for key in ("exp_avg", "exp_avg_sq"):
                value = per_param[key]
                if not isinstance(value, Tensor) or list(value.shape) != want:
                    got = (
                        f"shape {list(value.shape)}"
                        if isinstance(value, Tensor)
                        else type(value).__name__
                    )
                    raise CheckpointError(f"{where} {key!r}: expected shape {want}, got {got}")
                if not value.is_floating_point():
                    raise CheckpointError(
                        f"{where} {key!r}: expected a floating-point tensor, got {value.dtype}"
                    )
            try:
                check_step(per_param["step"])
            except (ValueError, TypeError) as exc:
                raise CheckpointError(f"{where} 'step': {exc}") from exc

    def load_state(self, state: TrainingState) -> None:
        """Set the weights and optimizer state to ``state`` (after :meth:`check_state`).

        Every parameter takes its weights from ``state``, frozen ones too (which then keep
        them). Optimizer state goes to parameters by name; the state of parameters frozen here
        is dropped, and a parameter without state in ``state`` starts afresh. Tensors are copied,
        so ``state`` can be loaded again later. Learning rates stay those of this trainer's
        config, and the counters (:attr:`steps`, :attr:`samples_seen`,
        :attr:`skipped_batches`) go on counting: they count this trainer's work. Nothing is
        changed when the check fails.
        """
        self.check_state(state)
        self.model.load_flat_state_dict(state.weights)
        for opt_name, opt in self._optimizers.items():
            as_step = as_sparse_step if opt_name == SPARSE else as_dense_step
            restored: dict[int, dict[str, StateValue]] = {}
            for index, name in enumerate(self._names[opt_name]):
                per_param = state.optimizer.get(name)
                if per_param is None:
                    continue
                restored[index] = {
                    "step": as_step(per_param["step"]),
                    "exp_avg": copy_value(per_param["exp_avg"]),
                    "exp_avg_sq": copy_value(per_param["exp_avg_sq"]),
                }
            sd = opt.state_dict()
            sd["state"] = restored
            opt.load_state_dict(sd)
            for group in opt.param_groups:
                group["lr"] = self._lrs[opt_name]

    def warm_start(self, source: Trainer) -> None:
        """Continue from ``source``: ``self.load_state(source.snapshot())``.

        With nothing frozen here, this trainer then takes exactly the steps ``source`` would
        take on the same batches. Raises :class:`CheckpointError` naming the difference when
        ``source`` trains a model of another architecture, schema, logit space or shape.
        """
        self.load_state(source.snapshot())


def _check_frozen(model: CtrModel, frozen: Iterable[str]) -> frozenset[str]:
    """``frozen`` as a set of the model's parameter names; ``ValueError`` naming the others."""
    if isinstance(frozen, str):
        raise ValueError(
            f"Trainer: frozen: expected an iterable of parameter names, got the string {frozen!r}"
        )
    names = frozenset(frozen)
    own = [n for n, _ in model.named_parameters()]
    unknown = sorted(names - set(own))
    if unknown:
        raise ValueError(
            f"Trainer: frozen: expected parameter names of the {model.arch} model ({own}), "
            f"got unknown names {unknown}"
        )
    return names


def _differences(model: CtrModel, *, arch: str, fingerprint: str, loss: str) -> list[str]:
    """How a model described by ``arch, fingerprint, loss`` differs from ``model``."""
    diffs = []
    if arch != model.arch:
        diffs.append(f"arch: expected {model.arch!r}, got {arch!r}")
    own = model.schema.fingerprint()
    if fingerprint != own:
        diffs.append(f"schema fingerprint: expected {own!r}, got {fingerprint!r}")
    if logit_space(loss) != logit_space(model.cfg.loss):
        diffs.append(
            f"loss: expected one with {logit_space(model.cfg.loss)}-rate logits like "
            f"{model.cfg.loss!r}, got {loss!r} ({logit_space(loss)}-rate logits)"
        )
    return diffs


def _check_optimizer_state(
    name: str, opt: torch.optim.Optimizer, param_names: list[str], saved: Mapping[str, Any]
) -> None:
    groups = saved.get("param_groups")
    states = saved.get("state")
    if not isinstance(groups, list) or not isinstance(states, dict):
        raise CheckpointError(
            f"optimizer {name!r} state: expected 'param_groups' (list) and 'state' (dict), "
            f"got keys {sorted(saved)}"
        )
    got_sizes = [len(g.get("params", ())) if isinstance(g, dict) else -1 for g in groups]
    want_sizes = [len(g["params"]) for g in opt.param_groups]
    if got_sizes != want_sizes:
        raise CheckpointError(
            f"optimizer {name!r} state: expected param groups of sizes {want_sizes}, "
            f"got {got_sizes}"
        )
    saved_names = [g.get("param_names") for g in groups]
    if all(isinstance(n, list) for n in saved_names):
        got_names = [n for names in saved_names if isinstance(names, list) for n in names]
        if got_names != param_names:
            raise CheckpointError(
                f"optimizer {name!r} state: expected the parameters {param_names}, got {got_names}"
            )
    params = [p for g in opt.param_groups for p in g["params"]]
    ids = [i for g in groups for i in g["params"]]
    by_id = dict(zip(ids, params, strict=True))
    for idx, per_param in states.items():
        if idx not in by_id or not isinstance(per_param, dict):
            raise CheckpointError(
                f"optimizer {name!r} state: expected entries for params {ids}, got {idx!r}"
            )
        want = tuple(by_id[idx].shape)
        for key, value in per_param.items():
            if isinstance(value, Tensor) and value.dim() > 0 and tuple(value.shape) != want:
                raise CheckpointError(
                    f"optimizer {name!r} state of param {idx} {key!r}: expected shape "
                    f"{list(want)}, got {list(value.shape)}"
                )
