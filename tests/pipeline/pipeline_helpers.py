from __future__ import annotations

from pathlib import Path
from typing import Any

from minutely.config import Config, load_config
from minutely.pipeline.runner import OnlinePipeline
from minutely.registry import Registry
from minutely.schema import default_schema
from minutely.sim import Market
from minutely.stream import SqliteLog

SMALL = {
    "sim": {
        "impressions_per_day": 24_000,
        "users": 3_000,
        "campaigns_per_hour": 4,
        "delay_preset": "fast",
    },
    "stream": {"partitions": 2},
    "models": [
        {"name": "ctr", "buckets": 4096, "embedding_dim": 4, "hidden": [16]},
        {
            "name": "cvr",
            "label": "conversion",
            "attribution_window_s": 600,
            "correction_horizon_s": 3600,
            "buckets": 4096,
            "embedding_dim": 4,
            "hidden": [16],
        },
    ],
    "train": {"batch_size": 256, "checkpoint_every_windows": 3},
    "export": {"every_min": 10, "min_samples": 50},
}


def small_config() -> Config:
    return load_config(None, SMALL)


def make_pipeline(
    cfg: Config,
    run_dir: Path,
    *,
    corrupt_every: int = 0,
    resume: bool = False,
    models: list[str] | None = None,
    **options: Any,
) -> tuple[OnlinePipeline, SqliteLog]:
    """The pipeline of every model in ``cfg`` (or of ``models``) over a SQLite log in
    ``run_dir``, models built from seed 0; ``options`` go to :class:`OnlinePipeline`."""
    import torch

    torch.manual_seed(0)
    schema = default_schema()
    run_dir.mkdir(parents=True, exist_ok=True)
    log = SqliteLog(run_dir / "log.sqlite")
    pipe = OnlinePipeline(
        cfg,
        schema,
        log,
        Market(cfg.sim, schema),
        Registry(run_dir / "registry"),
        run_dir / "checkpoints",
        cfg.sim.start_ms,
        models=models,
        corrupt_every=corrupt_every,
        resume=resume,
        **options,
    )
    return pipe, log
