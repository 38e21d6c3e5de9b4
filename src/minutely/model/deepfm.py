"""DeepFM: first-order terms + factorization-machine pairs + an MLP over shared embeddings."""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn

from minutely.config import ModelConfig
from minutely.data.tensors import TensorBatch
from minutely.errors import ConfigError, SchemaError
from minutely.model.base import CtrModel, optional_linear
from minutely.model.lookup import interactions
from minutely.schema import Schema


class DeepTower(nn.Module):
    """The MLP; its first layer is split by input (see :mod:`minutely.model.base`)."""

    def __init__(self, n_emb: int, n_dense: int, n_hour: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        self.from_embeddings = nn.Linear(n_emb, hidden[0])
        self.from_dense = optional_linear(n_dense, hidden[0], bias=False)
        self.from_hour_dense = optional_linear(n_hour, hidden[0], bias=False)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(hidden))
        self.out = nn.Linear(hidden[-1], 1, bias=False)

    def forward(self, emb: Tensor, regular: Tensor, hourly: Tensor) -> Tensor:
        h = self.from_embeddings(emb)
        if self.from_dense is not None:
            h = h + self.from_dense(regular)
        if self.from_hour_dense is not None:
            h = h + self.from_hour_dense(hourly)
        h = torch.relu(h)
        for layer in self.hidden:
            h = torch.relu(layer(h))
        out: Tensor = self.out(h).squeeze(1)
        return out


class DeepFM(CtrModel):
    """``logit = first order + FM(embeddings) + MLP([embeddings, dense])``.

    Each sparse feature's table (``embeddings.<f>.weight``) holds, next to the first-order
    weight, an ``embedding_dim`` embedding (initialised ``N(0, 0.01)``) shared by the FM, which
    sums the pairwise dot products of the features' embeddings, and the MLP (``hidden`` ReLU
    layers). Dense features enter the first-order and MLP terms, not the FM.
    """

    arch = "deepfm"

    def __init__(self, cfg: ModelConfig, schema: Schema) -> None:
        if not cfg.hidden or min(cfg.hidden) < 1:
            raise ConfigError(
                f"models[{cfg.name}].hidden", "one or more layer widths >= 1 for deepfm", cfg.hidden
            )
        if not schema.sparse:
            raise SchemaError("deepfm model: expected at least one sparse feature, got none")
        super().__init__(cfg, schema, embedding_dim=cfg.embedding_dim)
        self.mlp = DeepTower(
            len(self.sparse_names) * cfg.embedding_dim,
            int(self.regular_cols.numel()),
            int(self.hour_cols.numel()),
            cfg.hidden,
        )

    def logits(self, batch: TensorBatch) -> Tensor:
        regular, hourly = self.dense_parts(batch)
        rows, plan = self.lookup_rows(batch)
        first_order, fm, emb = interactions(rows, plan)
        # first_order_logit sums column 0 over features; the sum is taken already.
        first = self.first_order_logit(first_order.view(-1, 1, 1), regular, hourly)
        deep: Tensor = self.mlp(emb, regular, hourly)
        out: Tensor = first + fm + deep
        return out
