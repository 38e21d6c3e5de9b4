"""Training losses for a stream with delayed feedback, by name.

A :class:`Loss` maps the logits of a batch and the batch itself to a scalar: the batch carries
what any loss needs (labels, ``is_correction`` flags for delayed-feedback corrections), and a loss
that needs more (a teacher model for distillation) holds it as its own state. Losses are built
by name through :func:`make_loss`, or from a model's config through :func:`model_loss`. One
exists for every value of :attr:`~minutely.config.ModelConfig.loss`:

========  ==================================================================================
``bce``   binary cross-entropy on the labels as given (:class:`BCELoss`)
``pu``    positive-unlabeled: a correction also cancels its earlier negative (:class:`PULoss`)
``fnw``   fake negative weighting (:class:`FNWLoss`)
``fnc``   fake negative calibration: BCE, served through a calibration (:class:`FNCLoss`)
========  ==================================================================================

Any of them can be wrapped in :class:`DistilledLoss`, which mixes in a frozen teacher model's
predictions (distillation from the day model).

``pu``, ``fnw`` and ``fnc`` are those of Ktena et al. (2019), "Addressing delayed feedback for
continuous training with neural networks in CTR prediction" (RecSys). ``pu`` suits any
attribution window; ``fnw`` and ``fnc`` assume attribution window 0, where every sample goes out
at once as a negative and, when its action comes, once more as a positive.

Every loss is written in terms of ``log sigmoid`` of the logits, so it is finite for any finite
logit. ``p = sigmoid(z)`` below is a row's probability, ``z`` its logit and ``B`` the batch's
row count.

>>> import torch
>>> round(float(bce_loss(torch.zeros(4), torch.tensor([0.0, 1.0, 1.0, 0.0]))), 4)
0.6931
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from minutely.config import ModelConfig
from minutely.data.tensors import TensorBatch
from minutely.errors import ConfigError


class Loss(Protocol):
    """A training objective: ``loss(logits [B], batch) -> scalar``, differentiable in logits."""

    def __call__(self, logits: Tensor, batch: TensorBatch) -> Tensor: ...


def bce_loss(logits: Tensor, labels: Tensor, weights: Tensor | None = None) -> Tensor:
    """Binary cross-entropy of ``sigmoid(logits)`` against ``labels`` (weighted mean).

    Computed from logits (log-sum-exp form), so it stays finite for any logit. With ``weights``
    the result is ``sum(w * l) / sum(w)``; an empty batch gives ``nan``.
    """
    if logits.shape != labels.shape or (weights is not None and weights.shape != labels.shape):
        raise ValueError(
            f"bce_loss: expected logits, labels (and weights) of one shape, got "
            f"{list(logits.shape)}, {list(labels.shape)}"
            f"{'' if weights is None else ', ' + str(list(weights.shape))}"
        )
    per_row = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
    if weights is None:
        return per_row.mean()
    w = weights.to(per_row.dtype)
    return (per_row * w).sum() / w.sum()


def _check_logits(loss: str, logits: Tensor, batch: TensorBatch) -> None:
    """Raise ``ValueError`` unless ``logits`` holds one value per row of ``batch``."""
    if logits.shape != batch.labels.shape:
        raise ValueError(
            f"{loss} loss: expected logits of shape {list(batch.labels.shape)} (one per row), "
            f"got {list(logits.shape)}"
        )


class BCELoss:
    """:func:`bce_loss` on the batch's labels: ``mean(-y log p - (1 - y) log(1 - p))``.

    A correction (``batch.is_correction``) is a positive that arrived after its sample had been
    trained on as a negative; here it is trained on as an ordinary positive. The earlier
    negative is not undone, which biases the model low by the fraction of late positives;
    :class:`PULoss` is what removes that bias.
    """

    def __call__(self, logits: Tensor, batch: TensorBatch) -> Tensor:
        _check_logits("bce", logits, batch)
        return bce_loss(logits, batch.labels)


class PULoss:
    """Positive-unlabeled loss: a correction is a positive and undoes its earlier negative.

    Per row::

        negative (label 0)                  -log(1 - p)
        positive (label 1, no correction)   -log p
        correction                          -log p + log(1 - p)  =  -z

    and the loss is the sum over the rows divided by ``B`` (every row counts, corrections
    included), so a batch of negatives and positives only is plain BCE.

    The gradient of a correction row is ``-(1 - p) - p = -1``: its ``-(1 - p)`` trains the
    positive, its ``-p`` cancels the ``+p`` the sample's earlier negative row contributed. A
    negative row plus its correction at the same logit therefore give the gradient of one
    positive row, and a stream whose late positives arrive as corrections trains, in
    expectation, as the stream of true labels would.

    A correction's term is computed as the exact ``-z``. It is finite for any finite logit but
    unbounded below as ``p -> 1``, so a batch's loss can be negative; it is not clamped, since a
    clamp would drop the cancelling ``-p`` exactly where the earlier negative pushed hardest, and
    its gradient is bounded (constant ``-1``), so a step stays bounded.

    Raises ``ValueError`` for a correction row whose label is not 1.
    """

    def __call__(self, logits: Tensor, batch: TensorBatch) -> Tensor:
        _check_logits("pu", logits, batch)
        labels = batch.labels
        corrections = batch.is_correction
        bad = torch.nonzero(corrections & (labels != 1)).flatten()
        if bad.numel():
            row = int(bad[0])
            raise ValueError(
                f"pu loss: expected label 1 on every correction row, got {float(labels[row])} "
                f"at row {row}"
            )
        positive = labels == 1
        per_row = torch.where(
            corrections,
            -logits,
            torch.where(positive, -F.logsigmoid(logits), -F.logsigmoid(-logits)),
        )
        return per_row.sum() / len(batch)


class FNWLoss:
    """Fake negative weighting: importance-weighted BCE for the emit-at-once stream.

    With ``p = sigmoid(z)`` and the weights held constant (no gradient flows through them)::

        positive (label 1, duplicates included)   -(1 + p) log p
        negative (label 0)                        -(1 - p)(1 + p) log(1 - p)

    averaged over the ``B`` rows. On the stream where every sample goes out as a negative and a
    positive once more as a duplicate, a sample of true rate ``q`` brings ``1`` negative row and
    ``q`` positive rows in expectation; their summed gradient ``(1 - p^2)(p - q)`` vanishes at
    ``p = q``, so the model learns the true rate, not the biased ``q / (1 + q)`` of plain BCE.
    ``1 - p`` is computed as ``sigmoid(-z)``, so the weights keep their precision as ``p -> 1``.
    """

    def __call__(self, logits: Tensor, batch: TensorBatch) -> Tensor:
        _check_logits("fnw", logits, batch)
        z = logits.detach()
        p = torch.sigmoid(z)
        positive_weight = 1.0 + p
        negative_weight = torch.sigmoid(-z) * (1.0 + p)
        per_row = torch.where(
            batch.labels == 1,
            -positive_weight * F.logsigmoid(logits),
            -negative_weight * F.logsigmoid(-logits),
        )
        return per_row.mean()


class FNCLoss:
    """Fake negative calibration: plain BCE on the biased stream, calibrated when served.

    Trains ``mean(-y log b - (1 - y) log(1 - b))`` with ``b = sigmoid(z)``, labels as given, on
    the stream where every sample goes out as a negative and a positive once more as a
    duplicate. There a sample of true rate ``p`` is positive in ``p / (1 + p)`` of its rows, so
    ``b`` learns ``p / (1 + p)``, and the model's probability is ``p = b / (1 - b)``, clipped to
    ``[0, 1]`` (:func:`~minutely.model.base.fnc_calibrate`). A model whose config says
    ``loss = "fnc"`` applies that calibration in
    :meth:`~minutely.model.base.CtrModel.probabilities`, which predictions, test-then-train
    scores and serving all go through.
    """

    def __call__(self, logits: Tensor, batch: TensorBatch) -> Tensor:
        _check_logits("fnc", logits, batch)
        return bce_loss(logits, batch.labels)


class DistilledLoss:
    """``(1 - alpha) * base(logits, batch) + alpha * BCE(logits, sigmoid(teacher(batch)))``.

    ``teacher`` maps a batch to the teacher's logits ``[B]`` (a frozen
    :class:`~minutely.model.CtrModel`, say the day model); its soft target ``sigmoid(teacher
    logits)`` is computed under ``torch.no_grad()``, so no gradient ever reaches the teacher.
    The distillation term is ``binary_cross_entropy_with_logits(logits, target)``, the mean over
    the ``B`` rows, on the student's logits: it pulls the student towards what the teacher
    predicts and costs one teacher forward pass per batch. Student and teacher logits are of the
    same space (both trained with ``fnc``, or both not), so the target needs no calibration, and
    the wrapper composes with every base loss: its corrections, weights and checks are the
    base's own.

    With ``alpha == 0`` the result is ``base(logits, batch)`` itself, bit for bit, and the
    teacher is not run. Raises ``ValueError`` for ``alpha`` outside ``[0, 1]`` and for teacher
    logits of another shape than the student's.

    >>> from minutely.model import synthetic_batch
    >>> from minutely.schema import default_schema
    >>> batch = synthetic_batch(default_schema(), 4, buckets=16, seed=0)
    >>> teacher = lambda b: torch.zeros(len(b))  # predicts 0.5 everywhere
    >>> loss = DistilledLoss(BCELoss(), teacher, alpha=1.0)
    >>> round(float(loss(torch.zeros(4), batch)), 4)  # BCE of 0.5 against 0.5
    0.6931
    """

    def __init__(self, base: Loss, teacher: Callable[[TensorBatch], Tensor], alpha: float) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"DistilledLoss: expected alpha in [0, 1], got {alpha!r}")
        self.base = base
        self.teacher = teacher
        self.alpha = float(alpha)

    def __call__(self, logits: Tensor, batch: TensorBatch) -> Tensor:
        base = self.base(logits, batch)
        if self.alpha == 0.0:
            return base
        with torch.no_grad():
            teacher_logits = self.teacher(batch)
        if teacher_logits.shape != logits.shape:
            raise ValueError(
                f"distillation: expected teacher logits of the student's shape "
                f"{list(logits.shape)}, got {list(teacher_logits.shape)}"
            )
        target = torch.sigmoid(teacher_logits.detach().to(logits.dtype))
        distill = F.binary_cross_entropy_with_logits(logits, target)
        return (1.0 - self.alpha) * base + self.alpha * distill


_LOSSES: dict[str, Callable[..., Loss]] = {
    "bce": BCELoss,
    "pu": PULoss,
    "fnw": FNWLoss,
    "fnc": FNCLoss,
}


def loss_names() -> list[str]:
    """The names :func:`make_loss` knows, sorted."""
    return sorted(_LOSSES)


def register_loss(name: str, factory: Callable[..., Loss]) -> None:
    """Make ``factory(**kwargs)`` available as ``make_loss(name, **kwargs)``."""
    if name in _LOSSES:
        raise ValueError(f"register_loss: expected a new name, got {name!r} (already registered)")
    _LOSSES[name] = factory


def make_loss(name: str, **kwargs: Any) -> Loss:
    """The loss registered as ``name``, built with ``kwargs``.

    Raises :class:`~minutely.errors.ConfigError` (field ``loss``) for an unknown name.

    >>> make_loss("bce")  # doctest: +ELLIPSIS
    <minutely.train.losses.BCELoss object at ...>
    """
    try:
        factory = _LOSSES[name]
    except KeyError:
        raise ConfigError("loss", f"one of {loss_names()}", name) from None
    return factory(**kwargs)


def model_loss(cfg: ModelConfig) -> Loss:
    """The loss ``cfg.loss`` names; :class:`ConfigError` naming ``models.<name>.loss`` if unknown.

    >>> model_loss(ModelConfig(loss="pu"))  # doctest: +ELLIPSIS
    <minutely.train.losses.PULoss object at ...>
    """
    name: str = cfg.loss
    if name not in _LOSSES:
        raise ConfigError(f"models.{cfg.name}.loss", f"one of {loss_names()}", name)
    return make_loss(name)
