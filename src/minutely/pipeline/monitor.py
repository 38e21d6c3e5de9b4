"""Quality and progress of the live version, and the record of rollbacks.

One :class:`Monitor` per model. For every trained window the caller passes the predictions of
the live version and of the latest warm-start version on the window's samples (labels matured
over their attribution window). Windows in which an online version served (the live version is
not the warm-start version) are pooled, the last ``monitor.windows`` of them; once the pool holds
``monitor.min_positives`` positives the live version is judged against the warm-start version:
an :class:`Anomaly` ``"auc_drop"`` when its AUC is more than ``monitor.max_auc_drop`` below the
warm-start version's, ``"pcoc"`` when its PCOC is outside ``[monitor.pcoc_min,
monitor.pcoc_max]``, each by more than ``monitor.confidence_z`` standard errors of the pool's
noise. A new warm-start version empties the pool, and so does :meth:`Monitor.reset`
(after a rollback). :meth:`Monitor.check_stall` reports ``"stall"`` when no window was observed
for ``monitor.stall_timeout_s`` on the service's clock; the monitor never reads a clock itself.

:func:`append_event` appends a :class:`RollbackEvent` to a JSON-lines file (fsynced) and logs
it on the ``minutely.monitor`` logger; :func:`read_events` reads the file back.

>>> import numpy as np
>>> from minutely.config import MonitorConfig
>>> mon = Monitor(MonitorConfig(windows=2, min_positives=2), started_ms=0)
>>> y = np.array([0, 1, 0, 1, 0, 0])
>>> warm = np.array([0.1, 0.5, 0.2, 0.4, 0.1, 0.3])
>>> mon.observe(60_000, 2 * warm, warm, y, "v3", "v1", now_ms=61_000).kind
'pcoc'
>>> mon.observe(120_000, warm, warm, y, "v1", "v1", now_ms=121_000) is None
True
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
from numpy.typing import ArrayLike, NDArray

from minutely.config import MonitorConfig
from minutely.errors import CheckpointError, StorageError
from minutely.fsutil import describe_os_error, fsync_dir
from minutely.pipeline.export import check_scores, quality

logger = logging.getLogger("minutely.monitor")

AnomalyKind = Literal["auc_drop", "pcoc", "stall"]
KINDS: tuple[str, ...] = ("auc_drop", "pcoc", "stall")
HISTORY = 360  # per-window quality records kept (six hours of minute windows)


def _auc_standard_error(auc: float, positives: int, negatives: int) -> float:
    """Hanley and McNeil's standard error of an AUC over ``positives`` and ``negatives``
    (0 when the AUC is undefined: no noise to allow for).

    >>> round(_auc_standard_error(0.7, 200, 5_000), 4)
    0.0187
    """
    if not math.isfinite(auc) or positives < 1 or negatives < 1:
        return 0.0
    q1 = auc / (2.0 - auc)
    q2 = 2.0 * auc * auc / (1.0 + auc)
    var = (
        auc * (1.0 - auc) + (positives - 1) * (q1 - auc * auc) + (negatives - 1) * (q2 - auc * auc)
    ) / (positives * negatives)
    return math.sqrt(max(var, 0.0))


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


@dataclass(frozen=True)
class Anomaly:
    """Something wrong with the live version (``auc_drop``, ``pcoc``) or the pipeline
    (``stall``); ``evidence`` holds the numbers, the window range and the versions (JSON values,
    an undefined number as ``None``)."""

    kind: AnomalyKind
    evidence: dict[str, Any]

    def describe(self) -> str:
        """One line: the kind and the evidence, keys sorted."""
        parts = ", ".join(f"{k}={self.evidence[k]}" for k in sorted(self.evidence))
        return f"{self.kind}: {parts}"


@dataclass(frozen=True)
class WindowQuality:
    """One observed window: its end (event time), when it was observed (service clock), rows,
    positives and the AUC, logloss and PCOC of the live and the warm-start version (``None``
    where undefined)."""

    window_end_ms: int
    observed_ms: int
    n: int
    positives: int
    live_version: str
    warm_version: str
    live_auc: float | None
    live_logloss: float | None
    live_pcoc: float | None
    warm_auc: float | None
    warm_logloss: float | None
    warm_pcoc: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Progress:
    """Where the pipeline is: event-time lag of the last trained window behind the clock, the
    throughput, the age of the live version on the clock and the clock time since the last
    observed window (``None`` before any)."""

    lag_s: float
    samples_per_s: float
    live_version_age_s: float
    since_last_window_s: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Window:
    window_end_ms: int
    live_version: str
    live: NDArray[np.float32]
    warm: NDArray[np.float32]
    labels: NDArray[np.uint8]


def _encode(a: NDArray[Any]) -> str:
    return base64.b64encode(a.tobytes()).decode("ascii")


def _decode(text: object, dtype: str, what: str) -> NDArray[Any]:
    if not isinstance(text, str):
        raise CheckpointError(f"monitor state: {what}: expected base64 text, got {text!r:.80}")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
        return np.frombuffer(raw, dtype=dtype).copy()
    except ValueError as exc:
        raise CheckpointError(f"monitor state: {what}: expected base64 {dtype}, got {exc}") from exc


class Monitor:
    """Judges the live version of one model window by window (see the module docstring)."""

    def __init__(
        self, cfg: MonitorConfig, *, started_ms: int | None = None, history: int = HISTORY
    ) -> None:
        if history < 1:
            raise ValueError(f"Monitor: history: expected >= 1, got {history}")
        self._cfg = cfg
        self._pool: deque[_Window] = deque(maxlen=cfg.windows)
        self._pool_warm: str | None = None
        self.history: deque[WindowQuality] = deque(maxlen=history)
        self.last_window_end_ms: int | None = None
        self.last_observed_ms: int | None = started_ms
        self._stall_reported = False

    # -- quality --------------------------------------------------------------------------------

    def observe(
        self,
        window_end_ms: int,
        live_preds: ArrayLike,
        warm_preds: ArrayLike,
        labels: ArrayLike,
        live_version: str,
        warm_version: str,
        *,
        now_ms: int,
    ) -> Anomaly | None:
        """Record a window's predictions by both versions and judge the live version.

        ``window_end_ms`` (event time) must exceed the previous window's; ``now_ms`` is the
        service clock's time of the observation. Returns the anomaly the pooled windows show,
        or ``None``: also while the pool holds fewer than ``min_positives`` positives and
        whenever the live version is the warm-start version. An anomaly is returned (and logged)
        for every window while the pool shows it, until :meth:`reset`.
        """
        if not isinstance(window_end_ms, int) or isinstance(window_end_ms, bool):
            raise ValueError(
                f"Monitor.observe: window_end_ms: expected an int, got {window_end_ms!r}"
            )
        if self.last_window_end_ms is not None and window_end_ms <= self.last_window_end_ms:
            raise ValueError(
                f"Monitor.observe: window_end_ms: expected > {self.last_window_end_ms} (the "
                f"previous window), got {window_end_ms}"
            )
        for what, version in (("live_version", live_version), ("warm_version", warm_version)):
            if not isinstance(version, str) or not version:
                raise ValueError(f"Monitor.observe: {what}: expected a version, got {version!r}")
        live, y = check_scores("Monitor.observe: live_preds", live_preds, labels)
        warm, _ = check_scores("Monitor.observe: warm_preds", warm_preds, labels)
        # Kept as the models give them (float32), so a restored pool judges the same numbers.
        live32, warm32, y8 = live.astype(np.float32), warm.astype(np.float32), y.astype(np.uint8)
        l_auc, l_pcoc, l_ll = quality(live32.astype(np.float64), y)
        w_auc, w_pcoc, w_ll = quality(warm32.astype(np.float64), y)
        self.history.append(
            WindowQuality(
                window_end_ms=window_end_ms,
                observed_ms=now_ms,
                n=int(y.size),
                positives=int(y8.sum()),
                live_version=live_version,
                warm_version=warm_version,
                live_auc=_finite_or_none(l_auc),
                live_logloss=_finite_or_none(l_ll),
                live_pcoc=_finite_or_none(l_pcoc),
                warm_auc=_finite_or_none(w_auc),
                warm_logloss=_finite_or_none(w_ll),
                warm_pcoc=_finite_or_none(w_pcoc),
            )
        )
        self.last_window_end_ms = window_end_ms
        self.last_observed_ms = now_ms
        self._stall_reported = False
        if warm_version != self._pool_warm:
            self._pool.clear()  # a new baseline: windows judged against the old one go
            self._pool_warm = warm_version
        if live_version == warm_version:
            return None  # nothing to roll back to, and nothing to compare
        self._pool.append(_Window(window_end_ms, live_version, live32, warm32, y8))
        return self._judge(live_version, warm_version)

    def _judge(self, live_version: str, warm_version: str) -> Anomaly | None:
        cfg = self._cfg
        labels = np.concatenate([w.labels for w in self._pool]).astype(np.float64)
        positives = int(labels.sum())
        if positives < cfg.min_positives:
            return None
        live = np.concatenate([w.live for w in self._pool]).astype(np.float64)
        warm = np.concatenate([w.warm for w in self._pool]).astype(np.float64)
        l_auc, l_pcoc, l_ll = quality(live, labels)
        w_auc, w_pcoc, w_ll = quality(warm, labels)
        evidence: dict[str, Any] = {
            "live_version": live_version,
            "warm_version": warm_version,
            "pooled_live_versions": sorted({w.live_version for w in self._pool}),
            "windows": len(self._pool),
            "first_window_end_ms": self._pool[0].window_end_ms,
            "last_window_end_ms": self._pool[-1].window_end_ms,
            "n": int(labels.size),
            "positives": positives,
            "live_auc": _finite_or_none(l_auc),
            "warm_auc": _finite_or_none(w_auc),
            "live_pcoc": _finite_or_none(l_pcoc),
            "warm_pcoc": _finite_or_none(w_pcoc),
            "live_logloss": _finite_or_none(l_ll),
            "warm_logloss": _finite_or_none(w_ll),
        }
        kind: AnomalyKind | None = None
        negatives = int(labels.size) - positives
        # A drop or a PCOC off its band counts once it exceeds the pool's noise: confidence_z
        # standard errors of the live AUC (Hanley and McNeil) and of log PCOC (1/sqrt(positives)).
        auc_noise = cfg.confidence_z * _auc_standard_error(l_auc, positives, negatives)
        pcoc_noise = cfg.confidence_z / math.sqrt(positives)
        drop_needed = max(cfg.max_auc_drop, auc_noise)
        log_pcoc = math.log(l_pcoc) if l_pcoc > 0 else -math.inf
        band = (
            math.log(cfg.pcoc_min) - pcoc_noise if cfg.pcoc_min > 0 else -math.inf,
            math.log(cfg.pcoc_max) + pcoc_noise,
        )
        # Both AUCs are defined once the pool holds a negative (it holds positives here).
        if math.isfinite(l_auc) and math.isfinite(w_auc) and l_auc < w_auc - drop_needed:
            kind = "auc_drop"
            evidence["max_auc_drop"] = cfg.max_auc_drop
            evidence["auc_drop_needed"] = drop_needed
        elif not band[0] <= log_pcoc <= band[1]:
            kind = "pcoc"
            evidence["pcoc_min"] = cfg.pcoc_min
            evidence["pcoc_max"] = cfg.pcoc_max
            evidence["pcoc_band_with_noise"] = [math.exp(band[0]), math.exp(band[1])]
        if kind is None:
            return None
        anomaly = Anomaly(kind, evidence)
        logger.warning("live version %s: %s", live_version, anomaly.describe())
        return anomaly

    # -- progress -------------------------------------------------------------------------------

    def progress(
        self,
        now_ms: int,
        *,
        last_window_end_ms: int,
        live_version_created_ms: int,
        samples_per_s: float,
    ) -> Progress:
        """The pipeline's progress at ``now_ms`` (the service clock's time)."""
        if not math.isfinite(samples_per_s) or samples_per_s < 0:
            raise ValueError(
                f"Monitor.progress: samples_per_s: expected a finite number >= 0, got "
                f"{samples_per_s!r}"
            )
        since = None if self.last_observed_ms is None else (now_ms - self.last_observed_ms) / 1e3
        return Progress(
            lag_s=(now_ms - last_window_end_ms) / 1e3,
            samples_per_s=float(samples_per_s),
            live_version_age_s=(now_ms - live_version_created_ms) / 1e3,
            since_last_window_s=since,
        )

    def check_stall(self, now_ms: int) -> Anomaly | None:
        """``Anomaly("stall")`` when no window was observed for ``stall_timeout_s`` before
        ``now_ms`` (counted from ``started_ms`` or the last :meth:`reset` before the first
        window; ``None`` when neither was given). Reported once per silence: the next observed
        window (or a reset) re-arms it."""
        if self.last_observed_ms is None or self._stall_reported:
            return None
        silent_ms = now_ms - self.last_observed_ms
        if silent_ms < self._cfg.stall_timeout_s * 1e3:
            return None
        self._stall_reported = True
        anomaly = Anomaly(
            "stall",
            {
                "silent_s": silent_ms / 1e3,
                "stall_timeout_s": self._cfg.stall_timeout_s,
                "last_observed_ms": self.last_observed_ms,
                "last_window_end_ms": self.last_window_end_ms,
            },
        )
        logger.warning("%s", anomaly.describe())
        return anomaly

    def reset(self, now_ms: int) -> None:
        """Forget the pooled windows (after a rollback the next judgement is on fresh windows)
        and count a silence from ``now_ms``; the history stays."""
        self._pool.clear()
        self.last_observed_ms = now_ms
        self._stall_reported = False

    @property
    def pooled_windows(self) -> int:
        """Windows in the pool now."""
        return len(self._pool)

    # -- checkpoint -----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable state: the pooled windows (at most ``windows``, arrays as base64)
        and the history (at most ``history`` records)."""
        return {
            "pool_warm": self._pool_warm,
            "pool": [
                {
                    "window_end_ms": w.window_end_ms,
                    "live_version": w.live_version,
                    "live": _encode(w.live),
                    "warm": _encode(w.warm),
                    "labels": _encode(w.labels),
                }
                for w in self._pool
            ],
            "history": [h.to_dict() for h in self.history],
            "last_window_end_ms": self.last_window_end_ms,
            "last_observed_ms": self.last_observed_ms,
            "stall_reported": self._stall_reported,
        }

    @classmethod
    def from_dict(cls, cfg: MonitorConfig, d: dict[str, Any], *, history: int = HISTORY) -> Monitor:
        """A monitor in the state :meth:`to_dict` wrote; with a smaller ``cfg.windows`` the
        newest windows are kept. :class:`CheckpointError` names what does not fit."""
        if not isinstance(d, dict):
            raise CheckpointError(f"monitor state: expected a dict, got {type(d).__name__}")
        missing = sorted(_STATE_KEYS - set(d))
        if missing:
            raise CheckpointError(f"monitor state: expected fields {missing}, got {sorted(d)}")
        mon = cls(cfg, history=history)
        try:
            mon._pool_warm = _opt(d["pool_warm"], str, "pool_warm")
            mon.last_window_end_ms = _opt(d["last_window_end_ms"], int, "last_window_end_ms")
            mon.last_observed_ms = _opt(d["last_observed_ms"], int, "last_observed_ms")
            mon._stall_reported = bool(d["stall_reported"])
            for i, w in enumerate(d["pool"]):
                what = f"pool[{i}]"
                live = _decode(w["live"], "<f4", f"{what}.live")
                warm = _decode(w["warm"], "<f4", f"{what}.warm")
                labels = _decode(w["labels"], "u1", f"{what}.labels")
                if not live.size == warm.size == labels.size:
                    raise CheckpointError(
                        f"monitor state: {what}: expected arrays of one length, got "
                        f"{live.size}, {warm.size}, {labels.size}"
                    )
                mon._pool.append(
                    _Window(
                        _opt(w["window_end_ms"], int, f"{what}.window_end_ms", none=False),
                        _opt(w["live_version"], str, f"{what}.live_version", none=False),
                        live.astype(np.float32),
                        warm.astype(np.float32),
                        labels.astype(np.uint8),
                    )
                )
            for h in d["history"]:
                mon.history.append(WindowQuality(**h))
        except (KeyError, TypeError) as exc:
            raise CheckpointError(
                f"monitor state: expected the fields to_dict writes ({exc})"
            ) from exc
        return mon


_STATE_KEYS = {
    "pool_warm",
    "pool",
    "history",
    "last_window_end_ms",
    "last_observed_ms",
    "stall_reported",
}


def _opt(value: object, typ: type, what: str, *, none: bool = True) -> Any:
    if (value is None and none) or (isinstance(value, typ) and not isinstance(value, bool)):
        return value
    raise CheckpointError(f"monitor state: {what}: expected {typ.__name__}, got {value!r:.80}")


# -- rollbacks ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RollbackEvent:
    """Serving of ``model`` pointed back from ``from_version`` (``None``: no version served) to
    ``to_version`` at ``at_ms`` (the service clock) because of an anomaly of ``kind``, with its
    evidence."""

    model: str
    at_ms: int
    from_version: str | None
    to_version: str
    kind: str
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        """One line of JSON (keys sorted)."""
        return json.dumps(asdict(self), sort_keys=True, allow_nan=False)


def append_event(path: Path, event: RollbackEvent) -> None:
    """Append ``event`` to the JSON-lines file ``path`` (created if needed) and fsync it, then
    log it as a warning. A line a crash left unfinished at the end of the file is cut first, so
    the file stays one complete event per line. :class:`StorageError` names the file on an OS
    error."""
    path = Path(path)
    line = (event.to_json() + "\n").encode()
    existed = path.exists()
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                whole = os.pread(fd, size, 0)
                os.ftruncate(fd, whole.rfind(b"\n") + 1)  # 0 when no line was complete
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise StorageError(
            f"{path}: expected to append a rollback event, got {describe_os_error(exc)}"
        ) from exc
    if not existed:
        fsync_dir(path.parent)
    logger.warning(
        "%s: rolled back from %s to %s at %d (%s): %s",
        event.model,
        event.from_version,
        event.to_version,
        event.at_ms,
        event.kind,
        json.dumps(event.evidence, sort_keys=True),
    )


def read_events(path: Path) -> list[RollbackEvent]:
    """The events of the rollback file ``path``, oldest first (``[]`` when it does not exist).

    An unfinished last line (a crash during an append) is ignored; any other line that is not
    an event is a ``ValueError`` naming the file and the line.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")
    complete = lines[:-1]  # the part after the last newline is empty or unfinished
    events: list[RollbackEvent] = []
    for no, raw in enumerate(complete, start=1):
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict):
                raise TypeError(f"a JSON {type(doc).__name__}")
            event = RollbackEvent(**cast(dict[str, Any], doc))
            if not isinstance(event.at_ms, int) or event.kind not in KINDS:
                raise TypeError(f"at_ms {event.at_ms!r}, kind {event.kind!r}")
        except (ValueError, TypeError) as exc:
            raise ValueError(
                f"{path}:{no}: expected a rollback event (model, at_ms, from_version, "
                f"to_version, kind, evidence), got {raw[:80]!r} ({exc})"
            ) from exc
        events.append(event)
    return events
