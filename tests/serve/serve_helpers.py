"""Stand-ins shared by the serving tests: a one-feature schema, a scaling predictor, a factory."""

from __future__ import annotations

import threading

import torch

from minutely.data.tensors import FeatureColumns
from minutely.registry import Manifest, Registry
from minutely.schema import FeatureSpec, Schema

SCHEMA = Schema((FeatureSpec("x", "dense"),))
OTHER_SCHEMA = Schema((FeatureSpec("x", "dense"), FeatureSpec("y", "dense")))


class ScalePredictor:
    """``w * x`` per instance, ``w`` being the artifact's tensor ``"w"``."""

    def __init__(self, w: float, gate: threading.Event | None = None) -> None:
        self.w = w
        self.gate = gate
        self.entered = threading.Event()
        self.calls = 0
        self.rows: list[int] = []

    def predict_columns(self, columns: FeatureColumns) -> list[float]:
        self.calls += 1
        self.rows.append(len(columns))
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        return [self.w * float(x) for x in columns.dense[:, 0]]

    def warm_up(self) -> None:
        pass


class Factory:
    def __init__(self) -> None:
        self.built: list[tuple[str, ScalePredictor]] = []
        self.gate: threading.Event | None = None

    def __call__(self, manifest: Manifest, tensors: dict[str, torch.Tensor]) -> ScalePredictor:
        p = ScalePredictor(float(tensors["w"]), self.gate)
        self.built.append((manifest.version, p))
        return p


def publish(reg: Registry, w: float, schema: Schema = SCHEMA, name: str = "ctr") -> Manifest:
    return reg.publish(
        name,
        {"w": torch.tensor(w)},
        created_ms=0,
        arch="stand-in",
        model_config={},
        schema=schema,
        metrics={},
        samples_seen=0,
    )
