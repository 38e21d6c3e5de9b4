"""The default predictor: the artifact's PyTorch model, fed exactly as training feeds it.

Validated request rows (:class:`~minutely.data.tensors.FeatureColumns`) are hashed into the
model's buckets by :func:`~minutely.data.tensors.columns_to_tensors` (the hashing training uses)
and scored by the model :func:`~minutely.model.artifact.model_from_artifact` rebuilds from the
manifest's model config and feature schema, with the artifact's tensors as its weights.

>>> import torch
>>> from minutely.config import ModelConfig
>>> from minutely.model import build_model
>>> from minutely.model.artifact import model_config_doc
>>> from minutely.registry import FileEntry, Manifest
>>> from minutely.schema import default_schema
>>> schema, cfg = default_schema(), ModelConfig(arch="lr", buckets=64)
>>> manifest = Manifest(
...     manifest_version=1, model="ctr", version="v00000001", parent=None, base=None,
...     created_ms=0, arch="lr", model_config=model_config_doc(cfg),
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

import numpy as np
import numpy.typing as npt
import torch

from minutely.data.tensors import (
    FeatureColumns,
    columns_from_instances,
    columns_from_lists,
    columns_to_tensors,
)
from minutely.model import CtrModel
from minutely.model.artifact import model_from_artifact
from minutely.registry import Manifest
from minutely.schema import Schema

WARM_UP_ROWS = 8


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
        """Build the manifest's model with ``tensors`` as its weights (key set and shapes
        checked; the predictor owns them from then on)."""
        model = model_from_artifact(manifest, tensors)
        return cls(model, model.schema, model.cfg.buckets)

    def predict_columns(self, columns: FeatureColumns) -> npt.NDArray[np.float32]:
        """One probability per row of ``columns`` (validated against this model's schema)."""
        batch = columns_to_tensors(columns, self._buckets)
        with torch.inference_mode():
            probs = self._model.predict(batch)
        out: npt.NDArray[np.float32] = probs.numpy()
        return out

    def predict(self, instances: Sequence[Mapping[str, object]]) -> list[float]:
        """One probability per instance; :class:`SchemaError` naming a bad instance's feature."""
        out: list[float] = self.predict_columns(
            columns_from_instances(instances, self._schema)
        ).tolist()
        return out

    def warm_up(self) -> None:
        """Score a few synthetic rows (each kind of feature, lists of several lengths) once."""
        n = WARM_UP_ROWS
        columns: dict[str, object] = {}
        for spec in self._schema.features:
            if spec.kind == "sparse":
                columns[spec.name] = list(range(n))
            elif spec.kind == "multi_sparse":
                columns[spec.name] = [list(range(i % 4)) for i in range(n)]
            else:
                columns[spec.name] = [float(i) for i in range(n)]
        self.predict_columns(columns_from_lists(columns, self._schema))
