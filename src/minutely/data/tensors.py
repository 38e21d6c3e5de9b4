"""Samples as tensors in one jagged sparse layout (values + offsets per feature)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Jagged:
    """A batch of variable-length id lists for one feature.

    ``values`` holds the ids of all rows back to back (int64); row ``i`` is
    ``values[offsets[i]:offsets[i + 1]]`` (``offsets`` has ``batch_size + 1`` entries, the
    Arrow list layout, and the ``include_last_offset=True`` layout of ``nn.EmbeddingBag``).
    """

    values: torch.Tensor
    offsets: torch.Tensor


@dataclass(frozen=True)
class TensorBatch:
    """A decoded micro-batch: what models and the trainer consume."""

    sparse: dict[str, Jagged]  # in schema order; ids already hashed into [0, buckets)
    dense: torch.Tensor  # float32 [batch, n_dense], schema order
    labels: torch.Tensor  # float32 [batch]
    is_correction: torch.Tensor  # bool [batch]
    sample_ids: torch.Tensor  # int64 [batch]
    event_ts_ms: torch.Tensor  # int64 [batch]
    emit_ts_ms: torch.Tensor  # int64 [batch]

    def __len__(self) -> int:
        return int(self.labels.shape[0])
