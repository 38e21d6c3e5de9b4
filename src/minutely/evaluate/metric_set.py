"""AUC, PR-AUC, logloss, PCOC and counts, per window and over the whole stream.

The test-then-train loop feeds every scored batch to one :class:`MetricSet`, closes a window
every few minutes of event time (a :class:`WindowReport` per window) and reads the lifetime
view whenever it needs it.

>>> import numpy as np
>>> ms = MetricSet()
>>> ms.update(np.array([0.2, 0.7, 0.4]), np.array([0, 1, 1]))
>>> report = ms.close_window(window_start_ms=0)
>>> report.n, report.positives, report.auc, round(report.pcoc, 3)
(3, 2, 1.0, 0.65)
>>> ms.update(np.array([0.9]), np.array([0]))
>>> ms.lifetime()["n"], ms.windows[0].window_start_ms
(4.0, 0)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import ArrayLike

from minutely.evaluate.metrics import AUC, PCOC, PRAUC, LogLoss, as_inputs


@dataclass(frozen=True)
class WindowReport:
    """The metrics of one window of the stream (``nan`` where undefined)."""

    window_start_ms: int
    n: int  # rows
    positives: int  # rows with label 1
    auc: float
    logloss: float
    pcoc: float
    prauc: float = math.nan

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


class _Bundle:
    def __init__(self) -> None:
        self.auc = AUC()
        self.prauc = PRAUC()
        self.logloss = LogLoss()
        self.pcoc = PCOC()
        self.positives = 0

    def update(self, p: np.ndarray, y: np.ndarray, w: np.ndarray) -> None:
        for m in (self.auc, self.prauc, self.logloss, self.pcoc):
            m.update(p, y, w)
        self.positives += int(np.count_nonzero(y))

    @property
    def n(self) -> int:
        return self.auc.n


class MetricSet:
    """Window and lifetime views of AUC, PR-AUC, logloss, PCOC, rows and positives.

    Labels must be 0 or 1 and predictions probabilities. The lifetime AUC and PR-AUC are
    exact, so the lifetime view keeps every prediction (24 bytes a row) until :meth:`reset`.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget the window, the lifetime view and the closed windows."""
        self._window = _Bundle()
        self._lifetime = _Bundle()
        self.windows: list[WindowReport] = []

    def update(self, preds: ArrayLike, labels: ArrayLike, weights: ArrayLike | None = None) -> None:
        """Add a scored batch to the open window and to the lifetime view."""
        p, y, w = as_inputs("MetricSet", preds, labels, weights, soft=False)
        if not ((p >= 0) & (p <= 1)).all():
            raise ValueError(f"MetricSet.update: expected predictions in [0, 1], got {p[:3]}...")
        self._window.update(p, y, w)
        self._lifetime.update(p, y, w)

    @property
    def window_n(self) -> int:
        """Rows in the open window."""
        return self._window.n

    def close_window(self, window_start_ms: int) -> WindowReport:
        """Report the open window as starting at ``window_start_ms``, then open a new one.

        Windows are closed in order: ``window_start_ms`` must exceed the previous one's.
        """
        if self.windows and window_start_ms <= self.windows[-1].window_start_ms:
            raise ValueError(
                f"MetricSet.close_window: expected window_start_ms > "
                f"{self.windows[-1].window_start_ms}, got {window_start_ms}"
            )
        b = self._window
        report = WindowReport(
            window_start_ms=int(window_start_ms),
            n=b.n,
            positives=b.positives,
            auc=b.auc.get(),
            logloss=b.logloss.get(),
            pcoc=b.pcoc.get(),
            prauc=b.prauc.get(),
        )
        self.windows.append(report)
        self._window = _Bundle()
        return report

    def lifetime(self) -> dict[str, float]:
        """``n``, ``positives``, ``auc``, ``prauc``, ``logloss``, ``pcoc`` over everything seen."""
        b = self._lifetime
        return {
            "n": float(b.n),
            "positives": float(b.positives),
            "auc": b.auc.get(),
            "prauc": b.prauc.get(),
            "logloss": b.logloss.get(),
            "pcoc": b.pcoc.get(),
        }
