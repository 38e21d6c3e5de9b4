"""Scoring requests one by one or merged: the requests of a short window share a forward pass.

A :class:`Batcher` belongs to one model of one server process and runs on its event loop.
A request hands it the version that was live when the request arrived and its validated rows;
the batcher queues them and one dispatcher task scores the queue: it merges the requests that
arrived within ``max_wait_ms`` of the first one waiting (or until ``max_rows`` rows are waiting)
into one :class:`~minutely.data.tensors.FeatureColumns`, runs the model once on a dedicated
thread, and hands each request its slice of the predictions. Requests that arrive while a
forward pass runs wait for the next one, so under load batches form even with
``max_wait_ms = 0``, and an idle server scores a lone request at once.

Only requests on the same version are merged: when a swap happens, the requests that arrived
before it are scored by the old version, those after by the new one, and each request is
answered by exactly one version. A request whose client went away is dropped from the queue.

``max_rows = 0`` turns batching off: each request is scored on its own, on a thread of the
thread pool, as the rows arrive.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from minutely.data.tensors import FeatureColumns, concat_columns
from minutely.errors import ConfigError
from minutely.serve.holder import LoadedModel


@dataclass(frozen=True)
class BatchSettings:
    """``max_rows``: rows merged into one forward pass at most (a single larger request is
    scored alone; 0 turns batching off); ``max_wait_ms``: how long the first request waiting
    may wait for others to join it (0: only the requests that queued during the previous
    forward pass join)."""

    max_rows: int = 0
    max_wait_ms: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.max_rows, bool) or not isinstance(self.max_rows, int):
            raise ConfigError("serve.batch_max_rows", "an int >= 0", self.max_rows)
        if self.max_rows < 0:
            raise ConfigError("serve.batch_max_rows", "an int >= 0", self.max_rows)
        if not 0.0 <= self.max_wait_ms <= 1_000.0:
            raise ConfigError("serve.batch_max_wait_ms", "a float in [0, 1000]", self.max_wait_ms)

    @property
    def enabled(self) -> bool:
        return self.max_rows > 0


class PredictionCountError(RuntimeError):
    """The model answered another number of predictions than rows it was given."""


@dataclass
class _Pending:
    loaded: LoadedModel
    columns: FeatureColumns
    future: asyncio.Future[list[float]]
    arrived: float


BatchObserver = Callable[[int, int], None]
"""Called with (rows, requests) of every forward pass the batcher runs."""


class Batcher:
    """Merges concurrent requests of one model into shared forward passes (see the module)."""

    def __init__(self, settings: BatchSettings, executor: Executor, observe: BatchObserver) -> None:
        if not settings.enabled:
            raise ValueError(f"Batcher: expected batching settings, got {settings}")
        self._max_rows = settings.max_rows
        self._max_wait_s = settings.max_wait_ms / 1_000.0
        self._executor = executor
        self._observe = observe
        self._queue: collections.deque[_Pending] = collections.deque()
        self._rows = 0
        self._task: asyncio.Task[None] | None = None
        self._full = asyncio.Event()

    async def predict(self, loaded: LoadedModel, columns: FeatureColumns) -> list[float]:
        """The predictions of ``loaded``'s version for ``columns``, from a shared forward pass.

        Raises what the model raised, or :class:`PredictionCountError`.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[float]] = loop.create_future()
        self._queue.append(_Pending(loaded, columns, future, loop.time()))
        self._rows += len(columns)
        if self._task is None:
            self._task = loop.create_task(self._dispatch())
        elif self._rows >= self._max_rows:
            self._full.set()
        return await future

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                delay = self._queue[0].arrived + self._max_wait_s - loop.time()
                if delay > 0 and self._rows < self._max_rows:
                    self._full.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._full.wait(), delay)
                batch = self._take()
                if batch:
                    await self._run(loop, batch)
        finally:
            self._task = None

    def _take(self) -> list[_Pending]:
        """The next batch: the oldest waiting requests on one version, up to ``max_rows``."""
        batch: list[_Pending] = []
        rows = 0
        while self._queue:
            head = self._queue[0]
            n = len(head.columns)
            if not head.future.done():
                if batch and (head.loaded is not batch[0].loaded or rows + n > self._max_rows):
                    break
                batch.append(head)
                rows += n
            self._queue.popleft()
            self._rows -= n
        return batch

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending]) -> None:
        merged = concat_columns([p.columns for p in batch])
        predictor = batch[0].loaded.predictor
        self._observe(len(merged), len(batch))
        try:
            out = await loop.run_in_executor(self._executor, predictor.predict_columns, merged)
            probs = np.asarray(out, dtype=np.float64)
            if probs.shape != (len(merged),):
                raise PredictionCountError(f"expected {len(merged)} predictions, got {probs.size}")
        except Exception as exc:
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        start = 0
        for p in batch:
            end = start + len(p.columns)
            if not p.future.done():
                p.future.set_result(probs[start:end].tolist())
            start = end
