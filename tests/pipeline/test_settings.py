"""The settings fingerprint in every checkpoint."""

from __future__ import annotations

import pytest

from minutely.config import load_config
from minutely.errors import CheckpointError
from minutely.pipeline.settings import check_settings, output_settings


def test_the_simulators_settings_cover_every_market_field() -> None:
    s = output_settings(load_config(None), "simulate")
    assert {"sim.seed", "sim.impressions_per_day", "sim.drift", "stream.partitions"} <= set(s)


@pytest.mark.parametrize(
    ("stage", "override", "name"),
    [
        ("simulate", {"sim": {"impressions_per_day": 5}}, "sim.impressions_per_day"),
        ("simulate", {"stream": {"partitions": 2}}, "stream.partitions"),
        ("join", {"join": {"allowed_lateness_s": 1}}, "join.allowed_lateness_s"),
        ("join", {"train": {"batch_size": 7}}, "train.batch_size"),
        ("join", {"ingest": {"max_future_s": 1}}, "ingest.max_future_s"),
        ("train", {"train": {"lr": 0.5}}, "train.lr"),
    ],
)
def test_a_changed_setting_is_refused_by_name(stage: str, override: dict, name: str) -> None:  # type: ignore[type-arg]
    saved = output_settings(load_config(None), stage)  # type: ignore[arg-type]
    now = output_settings(load_config(None, override), stage)  # type: ignore[arg-type]
    with pytest.raises(
        CheckpointError, match=rf"ckpt was written with {name}=.*this run has {name}="
    ):
        check_settings(saved, now, "ckpt")


def test_a_models_settings_are_its_own() -> None:
    base = load_config(None)
    other = load_config(
        None,
        {
            "models": [
                {"name": "ctr", "loss": "pu"},
                {"name": "cvr", "label": "conversion", "attribution_window_s": 60},
            ]
        },
    )
    # Changing the cvr model does not stop the ctr trainer from resuming...
    check_settings(
        output_settings(base, "train", "ctr"), output_settings(other, "train", "ctr"), "ckpt"
    )
    # ...but does stop the cvr trainer.
    with pytest.raises(CheckpointError, match=r"model\.attribution_window_s=3600"):
        check_settings(
            output_settings(base, "train", "cvr"), output_settings(other, "train", "cvr"), "ckpt"
        )


def test_settings_missing_from_a_checkpoint_are_named() -> None:
    now = output_settings(load_config(None), "simulate")
    saved = {k: v for k, v in now.items() if k != "sim.seed"}
    with pytest.raises(
        CheckpointError, match=r"was written with no such setting, this run has sim\.seed=7"
    ):
        check_settings(saved, now, "ckpt")
    with pytest.raises(CheckpointError, match=r"ckpt records no settings \(got list\)"):
        check_settings([], now, "ckpt")  # type: ignore[arg-type]
    with pytest.raises(CheckpointError, match=r"was written with gone=1, unknown here"):
        check_settings({**now, "gone": 1}, now, "ckpt")
