"""Model construction from a :class:`~minutely.config.ModelConfig`."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from minutely.config import ModelConfig
from minutely.errors import ConfigError
from minutely.model.base import CtrModel
from minutely.model.deepfm import DeepFM
from minutely.model.lr import LogisticRegression
from minutely.schema import Schema

ARCHITECTURES: dict[str, Callable[[ModelConfig, Schema], CtrModel]] = {
    "lr": LogisticRegression,
    "deepfm": DeepFM,
}


def build_model(cfg: ModelConfig, schema: Schema, *, initial_rate: float | None = None) -> CtrModel:
    """A fresh model of architecture ``cfg.arch`` for ``schema``.

    Initialisation draws from torch's global generator, so ``torch.manual_seed`` before the call
    makes it reproducible. ``initial_rate`` (a positive rate in (0, 1), e.g. the expected CTR)
    sets the bias to its logit, so a fresh model starts calibrated instead of at 0.5.

    >>> import torch
    >>> from minutely.config import ModelConfig
    >>> from minutely.schema import default_schema
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> m = build_model(ModelConfig(arch="lr", buckets=1024), default_schema(), initial_rate=0.1)
    >>> round(m.bias.detach().item(), 4)
    -2.1972
    """
    try:
        make = ARCHITECTURES[cfg.arch]
    except KeyError:
        raise ConfigError(
            f"models[{cfg.name}].arch", f"one of {sorted(ARCHITECTURES)}", cfg.arch
        ) from None
    model = make(cfg, schema)
    if initial_rate is not None:
        if not 0.0 < initial_rate < 1.0:
            raise ValueError(f"build_model: expected initial_rate in (0, 1), got {initial_rate}")
        with torch.no_grad():
            model.bias.fill_(math.log(initial_rate / (1.0 - initial_rate)))
    return model
