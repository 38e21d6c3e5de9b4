"""Day (and hour) mode: the same model code, trained on a complete, shuffled slice of samples."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from minutely.evaluate import MetricSet
from minutely.pipeline.learner import SampleWindows
from minutely.train import Trainer


@dataclass(frozen=True)
class BatchModeReport:
    samples: int
    epochs: int
    steps: int
    train_auc: float
    train_logloss: float


def final_labels(table: pa.Table) -> pa.Table:
    """A complete slice knows every label: drop each negative that a correction superseded.

    Online, a sample first emitted as a negative and later corrected is trained on twice (the
    negative, then the positive); a batch mode that sees both keeps only the final label. The
    kept correction is then its sample's only row, an ordinary positive, so its
    ``is_correction`` flag is cleared: a loss that treats a correction as undoing an earlier
    negative (``pu``) must not undo one that is not there.
    """
    corrected = pc.filter(table["sample_id"], table["is_correction"])
    if len(corrected) == 0:
        return table
    superseded = pc.and_(
        pc.invert(table["is_correction"]), pc.is_in(table["sample_id"], value_set=corrected)
    )
    kept = table.filter(pc.invert(superseded))
    i = kept.schema.get_field_index("is_correction")
    cleared = pa.array(np.zeros(kept.num_rows, dtype=bool), type=kept.schema.field(i).type)
    return kept.set_column(i, kept.schema.field(i), cleared)


def train_batch_mode(
    trainer: Trainer,
    windows: SampleWindows,
    end_ms: int,
    epochs: int,
    seed: int,
    *,
    on_table: Callable[[pa.Table], None] | None = None,
) -> BatchModeReport:
    """Train on every sample emitted before ``end_ms`` not yet read, ``epochs`` shuffled passes.

    A model that has not trained yet (``trainer.steps == 0``) first has its bias set to the
    logit of the slice's positive rate (when it is strictly between 0 and 1): a fresh model
    predicts 0.5, and a day model of a rare action (a conversion after a click, a few percent)
    would otherwise spend its few steps walking down from there. The first pass is scored
    test-then-train, so ``train_auc`` is a progressive validation figure rather than a fit to
    data already seen. ``on_table`` sees the slice as read, before its labels are made final.
    """
    table = windows.read_table(end_ms)
    if table is None:
        return BatchModeReport(0, epochs, 0, float("nan"), float("nan"))
    if on_table is not None:
        on_table(table)
    table = final_labels(table)
    if trainer.steps == 0:
        rate = pc.mean(table["label"]).as_py()
        if rate is not None and 0.0 < rate < 1.0:
            with torch.no_grad():
                trainer.model.bias.fill_(math.log(rate / (1.0 - rate)))
    rng = np.random.default_rng(seed)
    metrics = MetricSet()
    steps = 0
    for epoch in range(epochs):
        order = pa.array(rng.permutation(table.num_rows))
        shuffled = table.take(order)
        for batch in windows.micro_batches(shuffled):
            if epoch == 0:
                preds = trainer.evaluate_then_train(batch)
                metrics.update(preds, batch.labels.numpy().astype(np.float64))
            else:
                trainer.train_step(batch)
            steps += 1
    life = metrics.lifetime()
    return BatchModeReport(table.num_rows, epochs, steps, life["auc"], life["logloss"])
