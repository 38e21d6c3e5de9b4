"""Training losses, by name.

A :class:`Loss` maps the logits of a batch and the batch itself to a scalar: the batch carries
what any loss needs (labels, ``is_correction`` flags for delayed-feedback corrections), and a loss
that needs more (a teacher model for distillation) holds it as its own state. Losses are built
by name through :func:`make_loss`; only ``"bce"`` exists so far.

>>> import torch
>>> round(float(bce_loss(torch.zeros(4), torch.tensor([0.0, 1.0, 1.0, 0.0]))), 4)
0.6931
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch.nn.functional as F  # noqa: N812
from torch import Tensor

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


class BCELoss:
    """:func:`bce_loss` on the batch's labels.

    A correction (``batch.is_correction``) is a positive that arrived after its sample had been
    trained on as a negative; here it is trained on as an ordinary positive. The earlier
    negative is not undone, which biases the model low by the fraction of late positives; a
    positive-unlabeled loss is what removes that bias.
    """

    def __call__(self, logits: Tensor, batch: TensorBatch) -> Tensor:
        return bce_loss(logits, batch.labels)


_LOSSES: dict[str, Callable[..., Loss]] = {"bce": BCELoss}


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

    >>> make_loss("bce")  # doctest: +ELLIPSIS
    <minutely.train.losses.BCELoss object at ...>
    """
    try:
        factory = _LOSSES[name]
    except KeyError:
        raise ConfigError("train.loss", f"one of {loss_names()}", name) from None
    return factory(**kwargs)
