"""Streaming metrics of binary predictions: ``update`` with a batch, ``get`` the value.

Every metric takes predictions (probabilities; AUC and PR-AUC only need them to rank), labels in
``{0, 1}`` (:class:`LogLoss` and :class:`PCOC` also accept soft labels in ``[0, 1]``) and
optional non-negative sample weights; ``get`` is ``nan`` where the metric is undefined (no data,
or one class only for the ranking metrics). AUC and PR-AUC are exact over everything seen: they
keep the inputs, in chunks concatenated on ``get``; LogLoss and PCOC keep running sums.

>>> import numpy as np
>>> auc = AUC()
>>> auc.update(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
>>> auc.get()
0.75
>>> auc.n, auc.bigger_is_better
(4, True)
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
from numpy.typing import ArrayLike, NDArray

F64 = NDArray[np.float64]
LOGLOSS_EPS = 1e-7  # predictions are clipped to [eps, 1 - eps]: float32 sigmoids reach 0 and 1


def as_inputs(
    name: str, preds: ArrayLike, labels: ArrayLike, weights: ArrayLike | None, *, soft: bool
) -> tuple[F64, F64, F64]:
    """Validate one update's inputs and return them as float64 arrays (weights default 1).

    ``soft``: predictions must be probabilities and labels may be anywhere in ``[0, 1]``;
    otherwise predictions are any finite scores and labels exactly 0 or 1.
    """
    p = np.asarray(preds, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    w = np.ones_like(p) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    if not p.shape == y.shape == w.shape:
        raise ValueError(
            f"{name}.update: expected preds, labels and weights of one length, got "
            f"{p.size}, {y.size}, {w.size}"
        )
    bad_p = ~((p >= 0) & (p <= 1)) if soft else ~np.isfinite(p)
    if bad_p.any():
        raise ValueError(
            f"{name}.update: expected predictions {'in [0, 1]' if soft else 'finite'}, "
            f"got {p[bad_p][:3]}"
        )
    bad_y = ~((y >= 0) & (y <= 1)) if soft else ~((y == 0) | (y == 1))
    if bad_y.any():
        raise ValueError(
            f"{name}.update: expected labels in {'[0, 1]' if soft else '{0, 1}'}, "
            f"got {y[bad_y][:3]}"
        )
    bad_w = ~(np.isfinite(w) & (w >= 0))
    if bad_w.any():
        raise ValueError(f"{name}.update: expected finite weights >= 0, got {w[bad_w][:3]}")
    return p, y, w


class Metric:
    """Base of the streaming metrics: ``update``, ``get``, ``reset``, ``n``.

    ``bigger_is_better`` says which way a metric improves; a metric with an ``ideal`` value that
    is not an extreme (PCOC: 1) improves towards it instead.
    """

    bigger_is_better: ClassVar[bool]
    ideal: ClassVar[float]
    probabilistic: ClassVar[bool] = False  # predictions in [0, 1]; soft labels allowed

    def __init__(self) -> None:
        self.reset()

    @property
    def n(self) -> int:
        """Rows seen since the last reset."""
        return self._n

    def update(self, preds: ArrayLike, labels: ArrayLike, weights: ArrayLike | None = None) -> None:
        p, y, w = as_inputs(type(self).__name__, preds, labels, weights, soft=self.probabilistic)
        self._n += p.size
        if p.size:
            self._update(p, y, w)

    def _update(self, p: F64, y: F64, w: F64) -> None:
        raise NotImplementedError

    def get(self) -> float:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget everything seen."""
        self._n = 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}: {self.get():.6f} (n={self.n})"


class _Ranked(Metric):
    """Keeps every (prediction, label, weight) seen, for the exact ranking metrics."""

    bigger_is_better = True
    ideal = 1.0

    def reset(self) -> None:
        super().reset()
        self._chunks: list[tuple[F64, F64, F64]] = []
        self._cached: float | None = None

    def _update(self, p: F64, y: F64, w: F64) -> None:
        self._chunks.append((p, y, w))
        self._cached = None

    def arrays(self) -> tuple[F64, F64, F64]:
        """Everything seen, concatenated (and kept as one chunk from then on)."""
        if not self._chunks:
            empty = np.empty(0, dtype=np.float64)
            return empty, empty, empty
        if len(self._chunks) > 1:
            p, y, w = (np.concatenate([c[i] for c in self._chunks]) for i in range(3))
            self._chunks = [(p, y, w)]
        return self._chunks[0]

    def get(self) -> float:
        if self._cached is None:
            p, y, w = self.arrays()
            keep = w > 0
            self._cached = self._compute(p[keep], y[keep], w[keep])
        return self._cached

    def _compute(self, p: F64, y: F64, w: F64) -> float:
        raise NotImplementedError


def _tie_groups(sorted_scores: F64) -> NDArray[np.intp]:
    """Start index of each run of equal values in a sorted array."""
    starts = np.flatnonzero(np.diff(sorted_scores)) + 1
    return np.concatenate(([0], starts)).astype(np.intp)


class AUC(_Ranked):
    """Area under the ROC curve: the weighted probability that a positive outranks a negative.

    Exact (Mann-Whitney): ties between a positive and a negative count one half.
    """

    def _compute(self, p: F64, y: F64, w: F64) -> float:
        if p.size == 0:
            return math.nan
        order = np.argsort(p, kind="stable")
        starts = _tie_groups(p[order])
        pos = np.add.reduceat(w[order] * y[order], starts)
        neg = np.add.reduceat(w[order] * (1.0 - y[order]), starts)
        total_pos, total_neg = pos.sum(), neg.sum()
        if total_pos <= 0 or total_neg <= 0:
            return math.nan
        neg_below = np.cumsum(neg) - neg
        return float((pos * (neg_below + 0.5 * neg)).sum() / (total_pos * total_neg))


class PRAUC(_Ranked):
    """Area under the precision-recall curve, as average precision.

    ``sum_k (R_k - R_{k-1}) P_k`` over the distinct thresholds, highest first (tied predictions
    form one threshold); the step-wise estimate, which never interpolates precision. ``nan``
    without a positive; 1 when every row is positive.
    """

    def _compute(self, p: F64, y: F64, w: F64) -> float:
        if p.size == 0:
            return math.nan
        order = np.argsort(-p, kind="stable")
        starts = _tie_groups(-p[order])
        tp = np.cumsum(np.add.reduceat(w[order] * y[order], starts))
        seen = np.cumsum(np.add.reduceat(w[order], starts))
        total_pos = tp[-1]
        if total_pos <= 0:
            return math.nan
        recall_step = np.diff(tp, prepend=0.0) / total_pos
        return float((recall_step * tp / seen).sum())


class LogLoss(Metric):
    """Weighted mean negative log-likelihood; predictions clipped to ``[1e-7, 1 - 1e-7]``."""

    bigger_is_better = False
    ideal = 0.0
    probabilistic = True

    def reset(self) -> None:
        super().reset()
        self._loss = 0.0
        self._weight = 0.0

    def _update(self, p: F64, y: F64, w: F64) -> None:
        q = np.clip(p, LOGLOSS_EPS, 1.0 - LOGLOSS_EPS)
        self._loss += float((w * -(y * np.log(q) + (1.0 - y) * np.log1p(-q))).sum())
        self._weight += float(w.sum())

    def get(self) -> float:
        return self._loss / self._weight if self._weight > 0 else math.nan


class PCOC(Metric):
    """Predicted clicks over observed clicks: ``sum(w * p) / sum(w * y)``; calibrated is 1.

    Neither direction is better: a gate compares ``abs(pcoc - ideal)``, and
    ``bigger_is_better`` is False only because a larger value is not better. ``nan`` until a
    positive label is seen.
    """

    bigger_is_better = False
    ideal = 1.0
    probabilistic = True

    def reset(self) -> None:
        super().reset()
        self._pred = 0.0
        self._label = 0.0

    def _update(self, p: F64, y: F64, w: F64) -> None:
        self._pred += float((w * p).sum())
        self._label += float((w * y).sum())

    def get(self) -> float:
        return self._pred / self._label if self._label > 0 else math.nan
