"""Synthetic batches with a learnable signal, for smoke tests, benchmarks and warm-up.

Labels follow a fixed hidden logistic model (each id of each feature has a fixed effect in
``[-1, 1]``, each dense column a fixed coefficient), so a model trained on these batches must
beat a constant predictor on a held-out batch.

>>> from minutely.schema import default_schema
>>> b = synthetic_batch(default_schema(), 8, buckets=1024, seed=1)
>>> len(b), b.dense.shape[1], b.sparse["user_interests"].offsets.numel()
(8, 3, 9)
"""

from __future__ import annotations

import torch
from torch import Tensor

from minutely.data.tensors import Jagged, TensorBatch
from minutely.schema import Schema

# Odd multipliers of a multiplicative hash; any fixed values do.
_ID_MULT = 2_654_435_761
_FEATURE_MULT = 40_503
_EFFECT_MOD = 1_009


def hidden_effect(ids: Tensor, feature_index: int) -> Tensor:
    """The fixed effect in ``[-1, 1]`` of each id of the ``feature_index``-th sparse feature."""
    h = (ids * _ID_MULT + (feature_index + 1) * _FEATURE_MULT) % _EFFECT_MOD
    return h.to(torch.float32) / ((_EFFECT_MOD - 1) / 2) - 1.0


def synthetic_batch(
    schema: Schema,
    batch_size: int,
    *,
    buckets: int,
    seed: int,
    vocab: int = 1_000,
    max_list: int = 4,
    base_logit: float = -1.5,
    start_ms: int = 0,
) -> TensorBatch:
    """A batch of ``batch_size`` rows for ``schema``; the same ``seed`` gives the same batch.

    Ids are drawn uniformly from ``[0, min(vocab, buckets))``; a multi-valued feature has 0 to
    ``max_list`` ids per row; dense columns are standard normal.
    """
    if batch_size < 0 or buckets < 1 or vocab < 1 or max_list < 0:
        raise ValueError(
            "synthetic_batch: expected batch_size >= 0, buckets >= 1, vocab >= 1, max_list >= 0;"
            f" got {batch_size}, {buckets}, {vocab}, {max_list}"
        )
    g = torch.Generator().manual_seed(seed)
    rows = torch.arange(batch_size)
    logit = torch.full((batch_size,), base_logit)
    sparse: dict[str, Jagged] = {}
    for i, spec in enumerate(schema.sparse):
        if spec.kind == "sparse":
            lengths = torch.ones(batch_size, dtype=torch.long)
        else:
            lengths = torch.randint(0, max_list + 1, (batch_size,), generator=g)
        offsets = torch.zeros(batch_size + 1, dtype=torch.long)
        torch.cumsum(lengths, 0, out=offsets[1:])
        ids = torch.randint(0, min(vocab, buckets), (int(offsets[-1]),), generator=g)
        sparse[spec.name] = Jagged(values=ids, offsets=offsets)
        effect = torch.zeros(batch_size).index_add_(
            0, rows.repeat_interleave(lengths), hidden_effect(ids, i)
        )
        logit += effect / lengths.clamp(min=1)
    n_dense = len(schema.dense)
    dense = torch.randn(batch_size, n_dense, generator=g)
    coef = torch.tensor([0.5 if j % 2 == 0 else -0.5 for j in range(n_dense)])
    logit += dense @ coef
    labels = torch.bernoulli(torch.sigmoid(logit), generator=g)
    ts = start_ms + rows.to(torch.int64)
    return TensorBatch(
        sparse=sparse,
        dense=dense,
        labels=labels,
        is_correction=torch.zeros(batch_size, dtype=torch.bool),
        sample_ids=seed * batch_size + rows,
        event_ts_ms=ts,
        emit_ts_ms=ts.clone(),
        label_ts_ms=torch.where(labels == 1, ts, -1),
    )
