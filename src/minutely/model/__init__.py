"""Click and conversion models: logistic regression and DeepFM over per-feature tables.

>>> import torch
>>> from minutely.config import ModelConfig
>>> from minutely.schema import default_schema
>>> schema = default_schema()
>>> model = build_model(ModelConfig(buckets=1024, embedding_dim=4, hidden=(8,)), schema)
>>> model(synthetic_batch(schema, 5, buckets=1024, seed=0)).shape
torch.Size([5])
"""

from minutely.model.base import HOUR_LEVEL, OTHER, CtrModel, model_groups
from minutely.model.build import ARCHITECTURES, build_model
from minutely.model.deepfm import DeepFM
from minutely.model.lr import LogisticRegression
from minutely.model.synthetic import synthetic_batch

__all__ = [
    "ARCHITECTURES",
    "HOUR_LEVEL",
    "OTHER",
    "CtrModel",
    "DeepFM",
    "LogisticRegression",
    "build_model",
    "model_groups",
    "synthetic_batch",
]
