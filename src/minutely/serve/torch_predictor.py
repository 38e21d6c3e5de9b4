"""The default predictor: the artifact's PyTorch model, fed exactly as training feeds it.

Request instances become a :class:`~minutely.data.tensors.TensorBatch` through
:func:`~minutely.data.instances_to_tensors` (same hashing into buckets as training) and are scored
by the model :func:`~minutely.model.artifact.model_from_artifact` rebuilds from the manifest's
model config and feature schema, with the artifact's tensors loaded into it.

>>> import dataclasses, torch
>>> from minutely.config import ModelConfig
>>> from minutely.model import build_model
>>> from minutely.registry import FileEntry, Manifest
>>> from minutely.schema import default_schema
>>> schema, cfg = default_schema(), ModelConfig(arch="lr", buckets=64)
>>> manifest = Manifest(
...     manifest_version=1, model="ctr", version="v00000001", parent=None, base=None,
...     created_ms=0, arch="lr", model_config=dataclasses.asdict(cfg),
...     feature_schema=schema.to_dict(), schema_fingerprint=schema.fingerprint(), metrics={},
...     samples_seen=0, files={"weights.safetensors": FileEntry(sha256="", bytes=0)},
... )
>>> predictor = TorchPredictor.from_artifact(manifest, build_model(cfg, schema).state_dict())
>>> inst = {f.name: ([1, 2] if f.kind == "multi_sparse" else 1) for f in schema.features}
>>> predictor.predict([inst])
[0.5]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from minutely.data import instances_to_tensors
from minutely.model import CtrModel
from minutely.model.artifact import model_from_artifact
from minutely.registry import Manifest
from minutely.schema import Schema


class TorchPredictor:
    """A :class:`~minutely.serve.holder.Predictor` over a :class:`~minutely.model.CtrModel`.

    Safe to call from several threads at once: inference reads the weights and changes nothing.
    """

    def __init__(self, model: CtrModel, schema: Schema, buckets: int) -> None:
        self._model = model.eval()
        self._schema = schema
        self._buckets = buckets

    @classmethod
    def from_artifact(
        cls, manifest: Manifest, tensors: Mapping[str, torch.Tensor]
    ) -> TorchPredictor:
        """Build the manifest's model and load ``tensors`` into it (key set and shapes checked)."""
        model = model_from_artifact(manifest, tensors)
        return cls(model, model.schema, model.cfg.buckets)

    def predict(self, instances: Sequence[Mapping[str, object]]) -> list[float]:
        """One probability per instance; :class:`SchemaError` naming a bad instance's feature."""
        batch = instances_to_tensors(instances, self._schema, self._buckets)
        with torch.inference_mode():
            probs = self._model.predict(batch)
        out: list[float] = probs.tolist()
        return out
