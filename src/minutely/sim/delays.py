"""How long after the impression a click, and after the click a conversion, is logged.

Delays are mixtures of log-normals truncated at a cap (drawn again past the cap, so no mass piles
up at it). Clicks come seconds to minutes after the impression. Conversions:

* ``criteo``: the shape published for the Criteo conversion logs (Chapelle, KDD 2014): about 35%
  of conversions within an hour of the click, about half within a day, a tail to 30 days;
* ``fast``: all within ten minutes, for tests that need every label inside a short replay.

>>> m = DELAY_PRESETS["criteo"]
>>> m.max_total_ms // 86_400_000
30
"""

from __future__ import annotations

from dataclasses import dataclass
from math import erf, log, sqrt

import numpy as np
from numpy.typing import NDArray

from minutely.clock import MS_PER_DAY, MS_PER_HOUR, MS_PER_MIN, MS_PER_S


@dataclass(frozen=True)
class LogNormalMixture:
    """Components ``(weight, median_ms, sigma)``, truncated to ``[floor_ms, cap_ms]``."""

    components: tuple[tuple[float, float, float], ...]
    floor_ms: int
    cap_ms: int

    def sample(self, g: np.random.Generator, n: int) -> NDArray[np.int64]:
        weights = np.array([c[0] for c in self.components])
        medians = np.log([c[1] for c in self.components])
        sigmas = np.array([c[2] for c in self.components])
        comp = g.choice(len(weights), size=n, p=weights / weights.sum())
        out = np.exp(medians[comp] + sigmas[comp] * g.standard_normal(n))
        for _ in range(64):
            over = np.flatnonzero(out > self.cap_ms)
            if len(over) == 0:
                break
            c = comp[over]
            out[over] = np.exp(medians[c] + sigmas[c] * g.standard_normal(len(over)))
        return np.clip(np.rint(out), self.floor_ms, self.cap_ms).astype(np.int64)

    def cdf(self, t_ms: float) -> float:
        """P(delay <= t_ms) of the truncated mixture (for reports and tests)."""
        total = sum(c[0] for c in self.components)
        p = 0.0
        for w, med, sig in self.components:
            cap = _phi((log(self.cap_ms) - log(med)) / sig)
            p += w / total * min(_phi((log(max(t_ms, 1e-9)) - log(med)) / sig) / cap, 1.0)
        return p


def _phi(x: float) -> float:
    return 0.5 * (1.0 + erf(x / sqrt(2.0)))


@dataclass(frozen=True)
class DelayModel:
    click: LogNormalMixture
    conversion: LogNormalMixture

    @property
    def max_total_ms(self) -> int:
        """The longest possible impression-to-conversion delay."""
        return self.click.cap_ms + self.conversion.cap_ms


_CLICK = LogNormalMixture(((1.0, 30 * MS_PER_S, 1.1),), floor_ms=MS_PER_S, cap_ms=30 * MS_PER_MIN)

DELAY_PRESETS: dict[str, DelayModel] = {
    "criteo": DelayModel(
        click=_CLICK,
        conversion=LogNormalMixture(
            ((0.36, 8 * MS_PER_MIN, 1.0), (0.64, 76 * MS_PER_HOUR, 1.5)),
            floor_ms=MS_PER_S,
            cap_ms=30 * MS_PER_DAY,
        ),
    ),
    "fast": DelayModel(
        click=_CLICK,
        conversion=LogNormalMixture(
            ((1.0, 90 * MS_PER_S, 0.8),), floor_ms=MS_PER_S, cap_ms=10 * MS_PER_MIN
        ),
    ),
}
