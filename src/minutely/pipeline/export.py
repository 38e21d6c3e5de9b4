"""Export policy: a new version every N event-time minutes once enough samples have arrived."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from minutely.config import ExportConfig, ModelConfig
from minutely.errors import ArtifactError
from minutely.evaluate import WindowReport
from minutely.model import CtrModel
from minutely.registry import Manifest, Registry
from minutely.schema import Schema


@dataclass
class ExportState:
    last_export_ms: int | None = None
    samples_at_last_export: int = 0
    last_version: str | None = None
    base_version: str | None = None
    exported: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExportState:
        return cls(**d)


class Exporter:
    """Publishes a model's weights to the registry when the policy says it is time."""

    def __init__(
        self,
        registry: Registry,
        model_cfg: ModelConfig,
        schema: Schema,
        cfg: ExportConfig,
        state: ExportState | None = None,
    ) -> None:
        self._registry = registry
        self._model_cfg = model_cfg
        self._schema = schema
        self._cfg = cfg
        self.state = state if state is not None else ExportState()

    def due(self, now_ms: int, samples_seen: int) -> bool:
        st = self.state
        if (
            st.last_export_ms is not None
            and now_ms - st.last_export_ms < self._cfg.every_min * 60_000
        ):
            return False
        return samples_seen - st.samples_at_last_export >= self._cfg.min_samples

    def export(
        self,
        model: CtrModel,
        now_ms: int,
        samples_seen: int,
        metrics: dict[str, float],
        *,
        as_base: bool = False,
    ) -> Manifest:
        """Publish now; ``as_base`` marks a day model that later online versions descend from.

        Exactly once across a restore: if the registry already holds the version this export
        would publish (same time, parent, base and sample count), an incarnation that crashed
        before its checkpoint published it, and it is adopted instead of published again.
        """
        base = None if as_base else self.state.base_version
        done = self._already_published(now_ms, samples_seen, base)
        if done is not None:
            self._record(done, now_ms, samples_seen, as_base)
            return done
        manifest = self._registry.publish(
            self._model_cfg.name,
            {k: v.detach() for k, v in model.state_dict().items()},
            created_ms=now_ms,
            arch=self._model_cfg.arch,
            model_config=dataclasses.asdict(self._model_cfg),
            schema=self._schema,
            # An undefined metric (AUC of a slice without positives) is left out, not NaN.
            metrics={k: v for k, v in metrics.items() if math.isfinite(v)},
            samples_seen=samples_seen,
            parent=self.state.last_version,
            base=base,
        )
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
        if not self.due(now_ms, samples_seen):
            return None
        return self.export(model, now_ms, samples_seen, metrics)


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
