"""What a server holds per model: the live version, and what it refused to load.

The live version is one immutable :class:`LoadedModel` behind one reference. A swap is a single
reference assignment (atomic under the interpreter), and a request reads the reference once at
its start, so a request in flight finishes on the version it started with while the next
request already sees the new one. No lock is on the request path.

>>> holder = ModelHolder("ctr")
>>> holder.current is None
True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt
import torch

from minutely.data.tensors import FeatureColumns
from minutely.registry import Manifest

Predictions = Sequence[float] | npt.NDArray[np.floating]
"""One probability per row, as a list or a one-dimensional NumPy array."""


class Predictor(Protocol):
    """Scores validated request rows with one model version.

    ``predict_columns`` gets the rows of one request, or of several merged by the batcher, as
    :class:`~minutely.data.tensors.FeatureColumns` already checked against the server's schema,
    and returns one probability per row. It may be called from several threads at once
    (unbatched requests run on a thread pool). ``warm_up`` runs it once on a small synthetic
    batch before the version goes live, so the first request does not pay for lazily built
    state.
    """

    def predict_columns(self, columns: FeatureColumns) -> Predictions: ...

    def warm_up(self) -> None: ...


PredictorFactory = Callable[[Manifest, dict[str, torch.Tensor]], Predictor]
"""Builds the predictor of a verified artifact (its manifest and its tensors by name)."""


@dataclass(frozen=True)
class LoadedModel:
    """One loaded version: its manifest, its predictor, and when it went live (epoch ms)."""

    manifest: Manifest
    predictor: Predictor
    loaded_ms: int

    @property
    def version(self) -> str:
        return self.manifest.version


@dataclass(frozen=True)
class Refusal:
    """A version that was not loaded, and why (it is not tried again)."""

    version: str
    reason: str


class ModelHolder:
    """The live version of one model and the bookkeeping of its swaps and refusals.

    Only the registry poller writes (one thread at a time); request handlers only read.
    Collections that readers see are replaced, never mutated in place, so a reader never
    observes one half-updated.
    """

    def __init__(self, name: str, *, max_refusals: int = 256, max_history: int = 64) -> None:
        self.name = name
        self._current: LoadedModel | None = None
        self._swaps = 0
        self._refusals: tuple[Refusal, ...] = ()
        self._refused_total = 0
        self._poll_errors = 0
        self._max_refusals = max_refusals
        self._history: tuple[str, ...] = ()
        self._max_history = max_history

    @property
    def current(self) -> LoadedModel | None:
        """The live version; take it once per request and use that reference throughout."""
        return self._current

    def swap(self, new: LoadedModel) -> None:
        """Make ``new`` the live version (a single reference assignment)."""
        self._current = new
        self._swaps += 1
        self._history = (*self._history[-(self._max_history - 1) :], new.version)

    def refuse(self, version: str, reason: str) -> None:
        """Remember that ``version`` must not be loaded (the oldest of too many are forgotten)."""
        kept = self._refusals[-(self._max_refusals - 1) :] if self._max_refusals > 1 else ()
        self._refusals = (*kept, Refusal(version, reason))
        self._refused_total += 1

    def is_refused(self, version: str) -> bool:
        return any(r.version == version for r in self._refusals)

    def refusal_reason(self, version: str) -> str | None:
        """Why ``version`` was refused (the latest reason), or ``None`` if it was not."""
        for r in reversed(self._refusals):
            if r.version == version:
                return r.reason
        return None

    def count_poll_error(self) -> None:
        self._poll_errors += 1

    @property
    def swaps(self) -> int:
        """Versions made live since start (the first load counts as one)."""
        return self._swaps

    @property
    def history(self) -> tuple[str, ...]:
        """The versions made live, oldest first (the latest ``max_history`` swaps)."""
        return self._history

    def previous_version(self) -> str | None:
        """The version that was live before the live one (another version), or ``None``."""
        current = self._current
        if current is None:
            return None
        for version in reversed(self._history):
            if version != current.version:
                return version
        return None

    @property
    def refusals(self) -> tuple[Refusal, ...]:
        """The remembered refusals, oldest first."""
        return self._refusals

    @property
    def refused_total(self) -> int:
        return self._refused_total

    @property
    def poll_errors(self) -> int:
        """Polls that failed for a reason that may pass (registry unreadable), not a refusal."""
        return self._poll_errors
