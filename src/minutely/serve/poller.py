"""The background poller that brings new versions from the registry into the server.

Every ``interval_s`` it asks the registry which version each model should serve (the pinned
one, else the latest). A version that differs from the live one is loaded, verified against
its checksums and the server's schema fingerprint, turned into a predictor and warmed up (one
forward pass on a small synthetic batch), all on the poller's thread, off the request path;
then it is swapped in. A version that fails any of those steps is refused: logged, counted,
remembered (never retried) and the old version keeps serving. A registry that cannot be read at
the moment is counted and retried on the next tick.

After each swap the poller moves what exists into the collector's permanent generation
(``gc.freeze()``, see :func:`freeze_heap`), so no collection walks the model's objects or the
imports' heap while requests wait.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Mapping

from minutely.clock import Clock
from minutely.errors import ArtifactError
from minutely.registry import Registry
from minutely.serve.holder import LoadedModel, ModelHolder, PredictorFactory
from minutely.serve.metrics import ServeMetrics

logger = logging.getLogger(__name__)


def freeze_heap() -> None:
    """Move every object alive now into the permanent generation (``gc.freeze()``).

    Called once the first versions are loaded and after each swap: the model and the imports'
    heap (hundreds of thousands of objects in torch) are never walked by a collection again,
    which is what made full collections take about 200 ms. A swapped-out model is still freed,
    by reference counting (a model holds no reference cycles). A collection of the young
    generations first keeps what just died out of the permanent generation.

    Why freezing and nothing more: measured over 3,000 requests of 100 instances through the
    application (JSON instances, the body that allocates most), a request's dicts and lists die
    by reference counting before they add up to a collection, so young collections were rare
    and short either way (14 of them, 0.04 ms at most, with the heap frozen). What remained
    were the full collections walking the unfrozen heap: 1.25 ms at most there, 190 to 220 ms
    in a server process that had not frozen torch's heap. A larger first threshold or a
    disabled collector with collections on a timer changed neither the median nor the p99
    beyond the run-to-run noise, and a timed collection would hold the interpreter lock while
    requests wait just the same; the thresholds stay Python's.
    """
    gc.collect(1)
    gc.freeze()


class RegistryPoller:
    """Keeps each :class:`ModelHolder` on its registry's serving version."""

    def __init__(
        self,
        registry: Registry,
        holders: Mapping[str, ModelHolder],
        *,
        expected_fingerprint: str,
        factory: PredictorFactory,
        clock: Clock,
        interval_s: float,
        metrics: ServeMetrics | None = None,
        freeze: bool = False,
    ) -> None:
        self._registry = registry
        self._holders = dict(holders)
        self._fingerprint = expected_fingerprint
        self._factory = factory
        self._clock = clock
        self._interval_s = interval_s
        self._metrics = metrics
        self._freeze = freeze
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_error: dict[str, str] = {}

    def now_ms(self) -> int:
        """The time on the poller's clock (what swaps are stamped with)."""
        return self._clock.now_ms()

    def poll_once(self) -> None:
        """Check every model once (callers are serialized: one load at a time)."""
        with self._lock:
            swapped = False
            for name, holder in self._holders.items():
                before = holder.current
                if self._poll(name, holder):
                    self._last_error.pop(name, None)
                swapped |= holder.current is not before
                if self._metrics is not None:
                    self._metrics.refresh_age(name, self._clock.now_ms())
            if swapped and self._freeze:
                freeze_heap()

    def start(self) -> None:
        """Poll every ``interval_s`` on a daemon thread until :meth:`stop`."""
        if self._thread is not None:
            return
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="registry-poller", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop polling; waits for a load in progress to finish (at most ``timeout_s``)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        thread.join(timeout_s)
        if thread.is_alive():
            logger.warning("registry poller still busy after %.1f s; leaving it", timeout_s)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.poll_once()
            except Exception:  # the thread must outlive any one bad poll
                logger.exception("registry poll failed")

    def _poll(self, name: str, holder: ModelHolder) -> bool:
        """One model's check; ``False`` when it could not be completed (retried next tick)."""
        try:
            version = self._registry.serving_version(name)
        except (ArtifactError, OSError) as exc:
            self._transient(name, holder, f"cannot read the serving version: {exc}")
            return False
        current = holder.current
        if version is None or (current is not None and current.version == version):
            return True
        if holder.is_refused(version):
            return True
        try:
            manifest, tensors = self._registry.load(
                name, version, expected_fingerprint=self._fingerprint
            )
        except ArtifactError as exc:
            self._refuse(name, holder, version, str(exc))
            return True
        except OSError as exc:
            self._transient(name, holder, f"cannot read {version}: {exc}")
            return False
        try:
            predictor = self._factory(manifest, tensors)
        except Exception as exc:  # a version the model code cannot build must not be served
            self._refuse(name, holder, version, f"predictor: {type(exc).__name__}: {exc}")
            return True
        del tensors  # the predictor owns them now
        try:
            predictor.warm_up()
        except Exception as exc:
            self._refuse(name, holder, version, f"warm-up: {type(exc).__name__}: {exc}")
            return True
        now_ms = self._clock.now_ms()
        holder.swap(LoadedModel(manifest, predictor, now_ms))
        if self._metrics is not None:
            self._metrics.went_live(name, version, manifest.created_ms, now_ms)
        logger.info(
            "model %s: now serving %s (was %s)",
            name,
            version,
            None if current is None else current.version,
        )
        return True

    def _refuse(self, name: str, holder: ModelHolder, version: str, reason: str) -> None:
        holder.refuse(version, reason)
        if self._metrics is not None:
            self._metrics.refusals.labels(name).inc()
        live = holder.current
        logger.warning(
            "model %s: refused %s, still serving %s: %s",
            name,
            version,
            None if live is None else live.version,
            reason,
        )

    def _transient(self, name: str, holder: ModelHolder, message: str) -> None:
        holder.count_poll_error()
        if self._metrics is not None:
            self._metrics.poll_errors.labels(name).inc()
        # Logged when it changes, not on every tick of a long outage.
        if self._last_error.get(name) != message:
            self._last_error[name] = message
            logger.warning("model %s: %s (will retry)", name, message)
