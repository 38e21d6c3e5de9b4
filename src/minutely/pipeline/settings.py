"""The settings that shape a stage's outputs, recorded in every checkpoint and checked on resume.

A stage restored under other settings would produce other messages than the ones its previous
incarnation wrote (another market, other batch sizes, another partition count) and mix two
streams in one topic. Each checkpoint therefore records the flattened settings its stage's
outputs depend on; a resume compares them with the running configuration and refuses the first
difference, naming the setting.

>>> from minutely.config import load_config
>>> saved = output_settings(load_config(None), "simulate")
>>> check_settings(saved, output_settings(load_config(None), "simulate"), "simulate checkpoint")
>>> changed = load_config(None, {"sim": {"seed": 8}})
>>> check_settings(saved, output_settings(changed, "simulate"), "checkpoint")
Traceback (most recent call last):
...
minutely.errors.CheckpointError: checkpoint was written with sim.seed=7, this run has sim.seed=8
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any, Literal

from minutely.config import Config
from minutely.errors import CheckpointError

Stage = Literal["simulate", "join", "train"]

# What each stage's outputs depend on: sections of the config whose every field counts, and
# single fields. The simulator's outputs are the market; the join's are shaped by the ingest
# rules, the join, every model's labels and the batch size (its inputs are checked by the
# exactly-once writers, not here); the trainer's by its training settings and its own model.
_SECTIONS: dict[Stage, tuple[str, ...]] = {
    "simulate": ("sim",),
    "join": ("ingest", "join", "models"),
    "train": ("train", "schedule"),
}
_FIELDS: dict[Stage, tuple[str, ...]] = {
    "simulate": (
        "stream.partitions",
        "stream.raw_topic",
        "demo.corrupt_every",
        "features.snapshots",  # impressions by reference or with their features
    ),
    "join": (
        "stream.partitions",
        "stream.raw_topic",
        "stream.dead_letter_topic",
        "train.batch_size",
        "demo.corrupt_every",
    ),
    "train": ("stream.partitions",),
}
# Fields of those sections that bound memory and never change an output.
_MEMORY_ONLY = ("join.hot_impressions",)


def output_settings(cfg: Config, stage: Stage, model: str | None = None) -> dict[str, Any]:
    """The flattened settings (``section.field`` -> JSON value) that shape ``stage``'s outputs;
    with ``model``, also that model's settings (as ``model.<field>``)."""
    flat: dict[str, Any] = {}
    doc = dataclasses.asdict(cfg)
    for section in _SECTIONS[stage]:
        _flatten(doc[section], section, flat)
    if model is not None:
        _flatten(dataclasses.asdict(cfg.model(model)), "model", flat)
    for dotted in _FIELDS[stage]:
        section, name = dotted.split(".", 1)
        flat[dotted] = doc[section][name]
    for dotted in _MEMORY_ONLY:
        flat.pop(dotted, None)
    # JSON round trip: tuples become lists, as they come back from a checkpoint.
    out: dict[str, Any] = json.loads(json.dumps(flat, sort_keys=True))
    return out


def check_settings(saved: object, current: Mapping[str, Any], where: str) -> None:
    """Raise :class:`CheckpointError` naming the first setting that differs."""
    if not isinstance(saved, Mapping):
        raise CheckpointError(f"{where} records no settings (got {type(saved).__name__})")
    for key in sorted(set(saved) | set(current)):
        if key not in current:
            raise CheckpointError(f"{where} was written with {key}={saved[key]!r}, unknown here")
        if saved.get(key, _MISSING) != current[key]:
            was = "no such setting" if key not in saved else f"{key}={saved[key]!r}"
            raise CheckpointError(
                f"{where} was written with {was}, this run has {key}={current[key]!r}"
            )


_MISSING = object()


def _flatten(node: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(node, Mapping):  # a dict, or a table of strings (FrozenMap)
        for k, v in node.items():
            _flatten(v, f"{prefix}.{k}", out)
    elif isinstance(node, (list, tuple)) and node and all(isinstance(x, dict) for x in node):
        for i, item in enumerate(node):
            _flatten(item, f"{prefix}[{i}]", out)
    else:
        out[prefix] = node
