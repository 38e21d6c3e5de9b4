"""Export policy and gate: when the online model publishes, and whether a candidate may.

A version is due every ``export.every_min`` event-time minutes once ``export.min_samples``
samples were trained on since the last export and ``export.min_trained_min`` minutes of stream
since the last warm start (:meth:`Exporter.warm_started`). When the minutes have passed but the
samples or the trained minutes have not, the export is skipped: counted once per ``every_min``
minutes of waiting, with its reason, in the checkpointed :class:`ExportState`.

With ``export.gate``, :meth:`Exporter.maybe_export_gated` scores the candidate and the live
version on the same held-back samples and publishes only when :func:`judge` passes the candidate
(see :class:`GateVerdict`); a refusal is counted, remembered with its numbers and logged on the
``minutely.export`` logger.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray

from minutely.config import ExportConfig, ModelConfig
from minutely.data.tensors import TensorBatch
from minutely.errors import ArtifactError, CheckpointError
from minutely.evaluate import AUC, PCOC, LogLoss, WindowReport
from minutely.model import CtrModel
from minutely.model.artifact import model_config_doc
from minutely.registry import Manifest, Registry
from minutely.schema import Schema

logger = logging.getLogger("minutely.export")

MINUTE_MS = 60_000

F64 = NDArray[np.float64]
# What the gate scores on: held-back batches (each model's ``predict``, corrections left out), or
# a callable that returns one model's ``(predictions, labels)`` on the held-back samples.
HeldBack = Sequence[TensorBatch] | Callable[[CtrModel], tuple[ArrayLike, ArrayLike]]


@dataclass
class ExportState:
    """What the exporter remembers across checkpoints.

    ``warm_start_ms`` is the event time of the last warm start (``None`` before any), from which
    ``min_trained_min`` counts. ``skipped`` and ``refused`` count exports the policy skipped and
    the gate refused; ``last_skip`` and ``last_refusal`` say why, with the numbers, and
    ``last_skip_ms`` is when the last skip was counted.
    """

    last_export_ms: int | None = None
    samples_at_last_export: int = 0
    last_version: str | None = None
    base_version: str | None = None
    exported: int = 0
    warm_start_ms: int | None = None
    skipped: int = 0
    last_skip: str | None = None
    last_skip_ms: int | None = None
    refused: int = 0
    last_refusal: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExportState:
        """The state ``to_dict`` wrote; a field missing (a checkpoint older than it) takes its
        default. :class:`CheckpointError` names an unknown field or a value of the wrong type."""
        if not isinstance(d, dict):
            raise CheckpointError(
                f"exporter state: expected a dict, got {type(d).__name__} {d!r:.80}"
            )
        unknown = sorted(set(d) - set(_STATE_TYPES))
        if unknown:
            raise CheckpointError(
                f"exporter state: expected fields among {sorted(_STATE_TYPES)}, got unknown "
                f"{unknown}"
            )
        for name, value in d.items():
            types = _STATE_TYPES[name]
            if isinstance(value, bool) or not isinstance(value, types):
                want = " or ".join("None" if t is type(None) else t.__name__ for t in types)
                raise CheckpointError(
                    f"exporter state: field {name!r}: expected {want}, got "
                    f"{type(value).__name__} {value!r:.80}"
                )
        return cls(**d)


_INT = (int,)
_OPT_INT = (int, type(None))
_OPT_STR = (str, type(None))
_STATE_TYPES: dict[str, tuple[type, ...]] = {
    "last_export_ms": _OPT_INT,
    "samples_at_last_export": _INT,
    "last_version": _OPT_STR,
    "base_version": _OPT_STR,
    "exported": _INT,
    "warm_start_ms": _OPT_INT,
    "skipped": _INT,
    "last_skip": _OPT_STR,
    "last_skip_ms": _OPT_INT,
    "refused": _INT,
    "last_refusal": _OPT_STR,
}


@dataclass(frozen=True)
class GateVerdict:
    """The gate's judgement of a candidate on the held-back samples.

    ``n`` and ``positives`` count the scored rows; ``auc``, ``pcoc`` and ``logloss`` are the
    candidate's, ``live_*`` the live version's (``nan`` where undefined or without a live
    version). ``reason`` says which rules were judged, with the numbers.
    """

    passed: bool
    reason: str
    n: int
    positives: int
    auc: float
    pcoc: float
    logloss: float
    live_auc: float = math.nan
    live_pcoc: float = math.nan
    live_logloss: float = math.nan

    def metrics(self) -> dict[str, float]:
        """The numbers as manifest metrics (``gate_auc``, ``gate_live_auc``, ...), finite only."""
        out = {
            "gate_n": float(self.n),
            "gate_positives": float(self.positives),
            "gate_auc": self.auc,
            "gate_pcoc": self.pcoc,
            "gate_logloss": self.logloss,
            "gate_live_auc": self.live_auc,
            "gate_live_pcoc": self.live_pcoc,
            "gate_live_logloss": self.live_logloss,
        }
        return {k: v for k, v in out.items() if math.isfinite(v)}


@dataclass(frozen=True)
class ExportOutcome:
    """What :meth:`Exporter.maybe_export_gated` did: the published ``manifest`` (``None`` when
    nothing was published), the gate's ``verdict`` (``None`` when the gate did not run) and the
    ``skipped`` reason when the export was due by time but held back by the policy."""

    manifest: Manifest | None
    verdict: GateVerdict | None = None
    skipped: str | None = None


def check_scores(what: str, preds: ArrayLike, labels: ArrayLike) -> tuple[F64, F64]:
    """``preds`` and ``labels`` as 1-d float64 arrays of one length, predictions in ``[0, 1]``
    and labels 0 or 1; ``ValueError`` starting with ``what`` names anything else."""
    p = np.asarray(preds, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if p.ndim != 1 or y.ndim != 1:
        raise ValueError(
            f"{what}: expected 1-d predictions and labels, got shapes {p.shape} and {y.shape}"
        )
    if p.size != y.size:
        raise ValueError(
            f"{what}: expected predictions and labels of one length, got {p.size} and {y.size}"
        )
    bad = ~((p >= 0) & (p <= 1))
    if bad.any():
        raise ValueError(f"{what}: expected predictions in [0, 1], got {p[bad][:3].tolist()}")
    bad = ~((y == 0) | (y == 1))
    if bad.any():
        raise ValueError(f"{what}: expected labels 0 or 1, got {y[bad][:3].tolist()}")
    return p, y


def quality(preds: F64, labels: F64) -> tuple[float, float, float]:
    """``(auc, pcoc, logloss)`` of checked predictions (``nan`` where undefined)."""
    out: list[float] = []
    for metric in (AUC(), PCOC(), LogLoss()):
        metric.update(preds, labels)
        out.append(metric.get())
    return out[0], out[1], out[2]


def judge(
    cfg: ExportConfig,
    candidate: ArrayLike,
    live: ArrayLike | None,
    labels: ArrayLike,
) -> GateVerdict:
    """The gate's verdict on a candidate from its and the live version's predictions.

    The candidate's PCOC must lie in ``[gate_pcoc_min, gate_pcoc_max]``, or be no further from
    1 (in log) than the live version's (judged when the samples hold ``gate_min_positives``
    positives: PCOC over a handful of positives is noise), and its AUC be at least the live
    version's minus ``gate_max_auc_drop`` (judged when there is a live version and the samples
    hold ``gate_min_positives`` positives and as many negatives). A rule that cannot be judged
    does not refuse.

    >>> cfg = ExportConfig(gate_min_positives=2)
    >>> v = judge(cfg, [0.2, 0.6, 0.3, 0.7], [0.1, 0.6, 0.5, 0.2], [0, 1, 0, 1])
    >>> v.passed, v.auc, v.live_auc
    (True, 1.0, 0.75)
    >>> judge(cfg, [0.9, 0.9, 0.9, 0.9], None, [0, 1, 0, 1]).reason
    'refused: PCOC 1.8 outside [0.6, 1.67]; AUC not judged: no live version (n=4, positives=2)'
    """
    p, y = check_scores("export gate: candidate", candidate, labels)
    n = int(p.size)
    positives = int(np.count_nonzero(y))
    negatives = n - positives
    auc, pcoc, logloss = quality(p, y)
    live_auc = live_pcoc = live_logloss = math.nan
    if live is not None:
        lp, _ = check_scores("export gate: live", live, labels)
        live_auc, live_pcoc, live_logloss = quality(lp, y)
    faults: list[str] = []
    notes: list[str] = []
    band = f"[{cfg.gate_pcoc_min:g}, {cfg.gate_pcoc_max:g}]"
    if positives < cfg.gate_min_positives:
        notes.append(f"PCOC not judged: {positives} positives, needs {cfg.gate_min_positives}")
    elif cfg.gate_pcoc_min <= pcoc <= cfg.gate_pcoc_max:
        notes.append(f"PCOC {pcoc:.4g} in {band}")
    elif math.isfinite(live_pcoc) and abs(math.log(pcoc)) <= abs(math.log(live_pcoc)):
        notes.append(f"PCOC {pcoc:.4g} outside {band} but no further off than live {live_pcoc:.4g}")
    else:
        faults.append(f"PCOC {pcoc:.4g} outside {band}")
    if live is None:
        notes.append("AUC not judged: no live version")
    elif min(positives, negatives) < cfg.gate_min_positives:
        notes.append(
            f"AUC not judged: {positives} positives and {negatives} negatives, needs "
            f"{cfg.gate_min_positives} of each"
        )
    elif auc < live_auc - cfg.gate_max_auc_drop:
        faults.append(f"AUC {auc:.4f} < live AUC {live_auc:.4f} - {cfg.gate_max_auc_drop:g}")
    else:
        notes.append(f"AUC {auc:.4f} >= live AUC {live_auc:.4f} - {cfg.gate_max_auc_drop:g}")
    passed = not faults
    reason = f"{'passed' if passed else 'refused'}: {'; '.join(faults + notes)} " + (
        f"(n={n}, positives={positives})"
    )
    return GateVerdict(
        passed=passed,
        reason=reason,
        n=n,
        positives=positives,
        auc=auc,
        pcoc=pcoc,
        logloss=logloss,
        live_auc=live_auc,
        live_pcoc=live_pcoc,
        live_logloss=live_logloss,
    )


def score_batches(model: CtrModel, batches: Sequence[TensorBatch]) -> tuple[F64, F64]:
    """``model.predict`` and the labels over ``batches``, corrections left out: a correction
    repeats, as a positive, a sample the batches already hold as a negative."""
    preds: list[F64] = []
    labels: list[F64] = []
    for batch in batches:
        keep = ~batch.is_correction.numpy()
        preds.append(model.predict(batch).numpy().astype(np.float64)[keep])
        labels.append(batch.labels.numpy().astype(np.float64)[keep])
    if not preds:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(preds), np.concatenate(labels)


def _score(model: CtrModel, held_back: HeldBack, who: str) -> tuple[F64, F64]:
    if callable(held_back):
        out = held_back(model)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise ValueError(
                f"export gate: {who}: expected the scorer to return (predictions, labels), got "
                f"{type(out).__name__} {out!r:.80}"
            )
        return check_scores(f"export gate: {who}", out[0], out[1])
    return score_batches(model, held_back)


class Exporter:
    """Publishes a model's weights to the registry when the policy (and the gate) say so."""

    def __init__(
        self,
        registry: Registry,
        model_cfg: ModelConfig,
        schema: Schema,
        cfg: ExportConfig,
        state: ExportState | None = None,
        *,
        delta_chain_max: int = 0,
    ) -> None:
        self._registry = registry
        self._model_cfg = model_cfg
        self._schema = schema
        self._cfg = cfg
        self.state = state if state is not None else ExportState()
        self._delta_chain_max = delta_chain_max
        # The last version this exporter published and a copy of exactly its tensors: what the
        # next version is published as a sparse delta against (none after a restore: the first
        # export of an incarnation is a full version).
        self._published: tuple[str, dict[str, torch.Tensor]] | None = None

    # -- policy ---------------------------------------------------------------------------------

    def hold_reason(self, now_ms: int, samples_seen: int) -> tuple[bool, str | None]:
        """``(time_passed, reason)``: whether ``every_min`` minutes passed since the last export,
        and why the export is held back even so (``None`` when it is not). No side effect."""
        st, cfg = self.state, self._cfg
        if st.last_export_ms is not None and now_ms - st.last_export_ms < cfg.every_min * MINUTE_MS:
            return False, None
        faults: list[str] = []
        new = samples_seen - st.samples_at_last_export
        if new < cfg.min_samples:
            faults.append(f"{new} samples since the last export, needs {cfg.min_samples}")
        if st.warm_start_ms is not None:
            trained_ms = now_ms - st.warm_start_ms
            if trained_ms < cfg.min_trained_min * MINUTE_MS:
                faults.append(
                    f"{trained_ms / MINUTE_MS:g} minutes trained since the warm start at "
                    f"{st.warm_start_ms}, needs {cfg.min_trained_min}"
                )
        return True, "; ".join(faults) if faults else None

    def due(self, now_ms: int, samples_seen: int) -> bool:
        """Whether an export is due at ``now_ms``.

        When ``every_min`` minutes have passed but the samples or the minutes trained since the
        warm start fall short, the skip is recorded in the state (``last_skip``) and counted
        (``skipped``) once per ``every_min`` minutes of waiting.
        """
        time_passed, reason = self.hold_reason(now_ms, samples_seen)
        if not time_passed:
            return False
        if reason is None:
            return True
        st = self.state
        if st.last_skip_ms is None or now_ms - st.last_skip_ms >= self._cfg.every_min * MINUTE_MS:
            st.skipped += 1
            st.last_skip_ms = now_ms
            logger.info("%s: export at %d skipped: %s", self._model_cfg.name, now_ms, reason)
        st.last_skip = reason
        return False

    def warm_started(self, now_ms: int, version: str, samples_seen: int | None = None) -> None:
        """Online training restarted at ``now_ms`` from the weights of ``version``.

        ``version`` becomes the base and the parent of the next online export, and
        ``min_trained_min`` counts from ``now_ms``; with ``samples_seen`` (the trainer's count
        after the restart), ``min_samples`` counts from it.
        """
        st = self.state
        st.warm_start_ms = now_ms
        st.base_version = version
        st.last_version = version
        if samples_seen is not None:
            st.samples_at_last_export = samples_seen

    # -- publishing -----------------------------------------------------------------------------

    def export(
        self,
        model: CtrModel,
        now_ms: int,
        samples_seen: int,
        metrics: dict[str, float],
        *,
        as_base: bool = False,
        mode: str | None = None,
        resume: Mapping[str, bytes] | None = None,
        resume_positions: Mapping[int, int] | None = None,
    ) -> Manifest:
        """Publish now; ``as_base`` marks a day model that later online versions descend from
        (a warm-start version in the manifest). ``mode``, ``resume`` and ``resume_positions``
        go to :meth:`Registry.publish <minutely.registry.Registry.publish>` as they are. With
        ``delta_chain_max`` > 0 the version is a sparse delta on top of the last version this
        exporter published (the rows and tensors that changed since), while that version's
        chain of deltas is shorter than ``delta_chain_max``; else a full version.

        Exactly once across a restore: if the registry already holds the version this export
        would publish (same time, parent, base and sample count), an incarnation that crashed
        before its checkpoint published it, and it is adopted instead of published again.
        """
        base = None if as_base else self.state.base_version
        done = self._already_published(now_ms, samples_seen, base)
        if done is not None:
            self._record(done, now_ms, samples_seen, as_base)
            return done
        tensors = {k: v.detach() for k, v in model.state_dict().items()}
        manifest = self._registry.publish(
            self._model_cfg.name,
            tensors,
            created_ms=now_ms,
            arch=self._model_cfg.arch,
            model_config=model_config_doc(self._model_cfg),
            schema=self._schema,
            # An undefined metric (AUC of a slice without positives) is left out, not NaN.
            metrics={k: v for k, v in metrics.items() if math.isfinite(v)},
            samples_seen=samples_seen,
            parent=self.state.last_version,
            base=base,
            mode=mode,
            warm_start=as_base,
            resume=resume,
            resume_positions=resume_positions,
            delta_from=self._published if self._delta_chain_max > 0 else None,
            max_chain=self._delta_chain_max,
        )
        if self._delta_chain_max > 0:
            self._published = (manifest.version, {k: v.clone() for k, v in tensors.items()})
        # Retention: the newest keep_versions, plus every kept version's base and a pinned one.
        self._registry.prune(self._model_cfg.name, keep=self._cfg.keep_versions)
        self._record(manifest, now_ms, samples_seen, as_base)
        return manifest

    def _already_published(
        self, now_ms: int, samples_seen: int, base: str | None
    ) -> Manifest | None:
        name = self._model_cfg.name
        last = self.state.last_version
        for version in reversed(self._registry.versions(name)):
            if last is not None and version <= last:
                break  # versions sort by number; anything older predates the checkpoint
            try:
                m = self._registry.manifest(name, version)
            except ArtifactError:
                continue  # an unreadable version is never adopted
            if (m.created_ms, m.parent, m.base, m.samples_seen) == (
                now_ms,
                last,
                base,
                samples_seen,
            ):
                return m
        return None

    def _record(self, manifest: Manifest, now_ms: int, samples_seen: int, as_base: bool) -> None:
        st = self.state
        st.last_export_ms = now_ms
        st.samples_at_last_export = samples_seen
        st.last_version = manifest.version
        st.exported += 1
        if as_base:
            st.base_version = manifest.version

    def maybe_export(
        self, model: CtrModel, now_ms: int, samples_seen: int, metrics: dict[str, float]
    ) -> Manifest | None:
        """Publish ``model`` if an export is :meth:`due`, without the gate."""
        if not self.due(now_ms, samples_seen):
            return None
        return self.export(model, now_ms, samples_seen, metrics)

    def maybe_export_gated(
        self,
        candidate: CtrModel,
        now_ms: int,
        samples_seen: int,
        metrics: dict[str, float],
        held_back: HeldBack,
        live_model: CtrModel | None,
        *,
        live_preds: ArrayLike | None = None,
        live_version: str | None = None,
    ) -> ExportOutcome:
        """Publish ``candidate`` if an export is :meth:`due` and it passes the gate.

        ``held_back`` is the newest samples, kept out of the candidate's training: batches both
        models score with their ``predict`` (corrections left out), or a callable returning a
        model's ``(predictions, labels)``. ``live_model`` is the version serving now (``None``:
        only PCOC is judged); ``live_preds``, when given, are its predictions on the held-back
        samples already (it is not scored again); ``live_version`` names it in a refusal.
        Without ``export.gate`` the candidate is published as :meth:`maybe_export` would. The
        verdict's numbers go into the manifest's metrics; a refusal is counted, kept in
        ``last_refusal`` and logged.
        """
        if not self.due(now_ms, samples_seen):
            _, reason = self.hold_reason(now_ms, samples_seen)
            return ExportOutcome(None, None, reason)
        if not self._cfg.gate:
            return ExportOutcome(self.export(candidate, now_ms, samples_seen, metrics))
        preds, labels = _score(candidate, held_back, "candidate")
        live: ArrayLike | None = None
        if live_preds is not None:
            if live_model is None:
                raise ValueError(
                    "export gate: expected live_preds only with a live_model, got live_preds "
                    "and no live_model"
                )
            live = live_preds
            if np.shape(live) != labels.shape:
                raise ValueError(
                    f"export gate: live_preds: expected {labels.size} predictions (the "
                    f"candidate's samples), got shape {np.shape(live)}"
                )
        elif live_model is not None:
            live, live_labels = _score(live_model, held_back, "live")
            if not np.array_equal(live_labels, labels):
                raise ValueError(
                    "export gate: expected the live version scored on the candidate's samples, "
                    f"got {live_labels.size} labels against {labels.size} (or other labels)"
                )
        verdict = judge(self._cfg, preds, live, labels)
        if not verdict.passed:
            st = self.state
            st.refused += 1
            st.last_refusal = f"at {now_ms} against live {live_version}: {verdict.reason}"
            logger.warning(
                "%s: candidate at %d not exported, live version %s stays: %s",
                self._model_cfg.name,
                now_ms,
                live_version,
                verdict.reason,
            )
            return ExportOutcome(None, verdict)
        manifest = self.export(candidate, now_ms, samples_seen, {**metrics, **verdict.metrics()})
        return ExportOutcome(manifest, verdict)


def window_metrics(report: WindowReport | None) -> dict[str, float]:
    """A window's test-then-train metrics, as an export's manifest records them."""
    if report is None:
        return {}
    return {
        "window_auc": report.auc,
        "window_logloss": report.logloss,
        "window_pcoc": report.pcoc,
        "window_samples": float(report.n),
    }
