"""The online trainer: test-then-train on micro-batches with two optimizers.

Embedding tables are updated by ``SparseAdam`` (learning rate ``cfg.embedding_lr``; the faster
:class:`~minutely.train.optim.RowSparseAdam` implementation), which touches only the rows a
batch looked up; everything else by ``Adam`` (``cfg.lr``). Adam keeps a
constant step size, so the model keeps adapting as traffic drifts; Adagrad, the usual choice for
sparse CTR models, divides every step by the sum of all past squared gradients, so a model that
has run for days takes vanishing steps on exactly the ids that matter most and stops tracking
them. A dense Adam over the tables would read and write every row of every table per step.

The thread count is the caller's (``torch.set_num_threads``): the trainer never changes it.

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

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from minutely.config import TrainConfig
from minutely.data.tensors import TensorBatch
from minutely.errors import CheckpointError, ConfigError
from minutely.model.base import CtrModel
from minutely.train.losses import Loss, model_loss
from minutely.train.optim import RowSparseAdam

logger = logging.getLogger(__name__)

SPARSE = "sparse"
DENSE = "dense"


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

    Parameters with ``requires_grad`` off get no gradient and are left alone by both
    optimizers, which is how a group of :func:`~minutely.model.model_groups` is frozen.
    """

    def __init__(self, model: CtrModel, cfg: TrainConfig, loss: Loss | None = None) -> None:
        self.model = model
        self.cfg = cfg
        self.loss: Loss = loss if loss is not None else model_loss(model.cfg)
        self._lrs = {SPARSE: cfg.embedding_lr, DENSE: cfg.lr}
        self._optimizers: dict[str, torch.optim.Optimizer] = {}
        tables = [p for _, p in model.embedding_parameters()]
        if tables:
            if not cfg.embedding_lr > 0:
                raise ConfigError("train.embedding_lr", "float > 0 (SparseAdam)", cfg.embedding_lr)
            self._optimizers[SPARSE] = RowSparseAdam(tables, lr=cfg.embedding_lr)
        rest = [p for _, p in model.dense_parameters()]
        if rest:
            self._optimizers[DENSE] = torch.optim.Adam(rest, lr=cfg.lr)
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

    def predict(self, batch: TensorBatch) -> np.ndarray:
        """Probabilities ``[B]`` (float32, the model's ``predict``); no update."""
        return self.model.predict(batch).numpy()

    def train_step(self, batch: TensorBatch) -> float:
        """One update on ``batch``; returns its loss before the update (``nan`` if empty)."""
        return self._step(batch)[0]

    def evaluate_then_train(self, batch: TensorBatch) -> np.ndarray:
        """Score ``batch``, then train on it: returns the predictions made before the update.

        One forward pass serves both (model outputs do not depend on train/eval mode).
        """
        return self._step(batch)[1]

    def _step(self, batch: TensorBatch) -> tuple[float, np.ndarray]:
        if len(batch) == 0:
            return math.nan, np.empty(0, dtype=np.float32)
        for opt in self._optimizers.values():
            opt.zero_grad(set_to_none=True)
        logits = self.model(batch)
        loss: Tensor = self.loss(logits, batch)
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
        """Each optimizer's ``state_dict()``, by name (tensors are shared, not copied)."""
        return {name: opt.state_dict() for name, opt in self._optimizers.items()}

    def check_restore(self, optimizer_states: Mapping[str, Mapping[str, Any]]) -> None:
        """Raise :class:`CheckpointError` unless ``optimizer_states`` fits these optimizers.

        Checks the optimizer names, the parameter count of every group and the shape of every
        per-parameter state tensor (Adam's moments), so a restore never half-succeeds.
        """
        if set(optimizer_states) != set(self._optimizers):
            raise CheckpointError(
                f"optimizer states: expected {sorted(self._optimizers)}, "
                f"got {sorted(optimizer_states)}"
            )
        for name, opt in self._optimizers.items():
            _check_optimizer_state(name, opt, optimizer_states[name])

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


def _check_optimizer_state(name: str, opt: torch.optim.Optimizer, saved: Mapping[str, Any]) -> None:
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
