"""Logistic regression: the first-order terms alone."""

from __future__ import annotations

from torch import Tensor

from minutely.config import ModelConfig
from minutely.data.tensors import TensorBatch
from minutely.model.base import CtrModel
from minutely.schema import Schema


class LogisticRegression(CtrModel):
    """``logit = bias + sum_f w_f[id_f] + dense_linear(dense) + hour_dense_linear(hour_dense)``.

    The id weights are 1-wide embedding bags (``embeddings.<f>.weight``, ``[buckets, 1]``);
    every weight starts at zero.
    """

    arch = "lr"

    def __init__(self, cfg: ModelConfig, schema: Schema) -> None:
        super().__init__(cfg, schema, embedding_dim=0)

    def logits(self, batch: TensorBatch) -> Tensor:
        regular, hourly = self.dense_parts(batch)
        rows, plan = self.lookup_rows(batch)
        n, n_features = plan.index.shape
        first_order = rows.index_select(0, plan.index.view(-1)).view(n, n_features, 1)
        return self.first_order_logit(first_order, regular, hourly)
