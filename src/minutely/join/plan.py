"""The immutable part of the join: model windows and retention horizons, in milliseconds.

A :class:`JoinPlan` is derived once from the configuration and never changes while the joiner
runs; a snapshot records it so a restore into a differently configured joiner fails loudly.

>>> from minutely.config import JoinConfig, ModelConfig, check_model
>>> plan = JoinPlan.build([ModelConfig(name="ctr", attribution_window_s=600)], JoinConfig())
>>> plan.lateness_ms, plan.impression_retention_ms
(30000, 4200000)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from minutely.config import JoinConfig, ModelConfig, check_model
from minutely.errors import ConfigError


@dataclass(frozen=True, slots=True)
class ModelWindow:
    """One model's attribution window and correction horizon."""

    name: str
    label: str
    window_ms: int
    horizon_ms: int


@dataclass(frozen=True, slots=True)
class JoinPlan:
    """Everything the join derives from its configuration.

    * ``impression_retention_ms``: an impression is held until the watermark passes
      ``imp.ts + impression_retention_ms``: the longest window plus horizon of the click models,
      and ``max_click_delay_ms`` when a conversion model needs the impression's click.
    * ``first_due_ms``: the earliest an impression can matter after its own time (the shortest
      click window, else the retention); used to skip work while nothing is due.

    ``hot_impressions`` only bounds memory, so it is not part of :meth:`identity`.
    """

    lateness_ms: int
    max_click_delay_ms: int
    max_clock_skew_ms: int
    hot_impressions: int
    model_names: tuple[str, ...]
    click_models: tuple[ModelWindow, ...]
    conversion_models: tuple[ModelWindow, ...]
    impression_retention_ms: int
    first_due_ms: int

    @classmethod
    def build(cls, models: Sequence[ModelConfig], cfg: JoinConfig) -> JoinPlan:
        """Validate ``models`` and derive the plan; raises :class:`ConfigError`."""
        if not models:
            raise ConfigError("models", "at least one model to join for", list(models))
        names = [m.name for m in models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError("models", "unique model names", names)
        clicks: list[ModelWindow] = []
        convs: list[ModelWindow] = []
        for m in models:
            check_model(m)
            w = ModelWindow(
                m.name, m.label, m.attribution_window_s * 1000, m.correction_horizon_s * 1000
            )
            if m.label == "click":
                clicks.append(w)
            elif m.label == "conversion":
                convs.append(w)
            else:
                raise ConfigError(
                    f"models.{m.name}.label", "one of ['click', 'conversion']", m.label
                )
        if cfg.allowed_lateness_s < 0:
            raise ConfigError("join.allowed_lateness_s", "int >= 0", cfg.allowed_lateness_s)
        if cfg.max_click_delay_s < 0:
            raise ConfigError("join.max_click_delay_s", "int >= 0", cfg.max_click_delay_s)
        if cfg.max_clock_skew_s < 0:
            raise ConfigError("join.max_clock_skew_s", "int >= 0", cfg.max_clock_skew_s)
        if cfg.hot_impressions < 0:
            raise ConfigError("join.hot_impressions", "int >= 0", cfg.hot_impressions)
        delay_ms = cfg.max_click_delay_s * 1000
        horizons = [w.window_ms + w.horizon_ms for w in clicks]
        if convs:
            horizons.append(delay_ms)
        retention = max(horizons)
        first_due = min(w.window_ms for w in clicks) if clicks else retention
        return cls(
            lateness_ms=cfg.allowed_lateness_s * 1000,
            max_click_delay_ms=delay_ms,
            max_clock_skew_ms=cfg.max_clock_skew_s * 1000,
            hot_impressions=cfg.hot_impressions,
            model_names=tuple(names),
            click_models=tuple(clicks),
            conversion_models=tuple(convs),
            impression_retention_ms=retention,
            first_due_ms=first_due,
        )

    def identity(self) -> list[str]:
        """What a snapshot must agree on, one readable line per item (click models first)."""
        lines = [
            f"model {w.name}: label={w.label} window_ms={w.window_ms} horizon_ms={w.horizon_ms}"
            for w in self.click_models + self.conversion_models
        ]
        lines.append(f"allowed_lateness_ms={self.lateness_ms}")
        lines.append(f"max_click_delay_ms={self.max_click_delay_ms}")
        lines.append(f"max_clock_skew_ms={self.max_clock_skew_ms}")
        return lines
