"""The online learner: samples topic -> 5-minute event-time windows -> test-then-train.

Each window's samples (all partitions, ordered by emission time) are cut into micro-batches;
every micro-batch is scored by the current model *before* the model trains on it, so the window
metrics measure the model on data it has not seen (the prequential protocol).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import pyarrow as pa

from minutely.config import ModelConfig, TrainConfig
from minutely.data import decode_batch, record_batch_to_tensors
from minutely.data.tensors import TensorBatch
from minutely.evaluate import MetricSet, WindowReport
from minutely.schema import Schema
from minutely.stream import Log, TopicReader
from minutely.train import Trainer


class SampleWindows:
    """Reads a model's samples topic window by window (event time = emission time)."""

    def __init__(
        self,
        log: Log,
        model: ModelConfig,
        schema: Schema,
        batch_size: int,
        positions: Mapping[int, int] | None = None,
    ) -> None:
        self._schema = schema
        self._buckets = model.buckets
        self._batch_size = batch_size
        self._reader = TopicReader(log, model.samples_topic, dict(positions or {}))

    def positions(self) -> dict[int, int]:
        return self._reader.positions()

    def read_table(self, end_ms: int) -> pa.Table | None:
        """All samples emitted before ``end_ms`` not read yet, sorted by (emit time, id)."""
        records = self._reader.read_until(end_ms)
        if not records:
            return None
        batches = [decode_batch(r.value, self._schema) for r in records]
        table = pa.Table.from_batches(batches)
        return table.sort_by([("emit_ts_ms", "ascending"), ("sample_id", "ascending")])

    def micro_batches(self, table: pa.Table) -> Iterator[TensorBatch]:
        for rb in table.combine_chunks().to_batches(max_chunksize=self._batch_size):
            if rb.num_rows:
                yield record_batch_to_tensors(rb, self._schema, self._buckets)


class OnlineLearner:
    """Test-then-train over a model's samples, one event-time window at a time."""

    def __init__(
        self,
        trainer: Trainer,
        windows: SampleWindows,
        train_cfg: TrainConfig,
        metrics: MetricSet | None = None,
    ) -> None:
        self.trainer = trainer
        self.windows = windows
        self._cfg = train_cfg
        self.metrics = metrics if metrics is not None else MetricSet()

    def run_window(self, start_ms: int, end_ms: int, train: bool = True) -> WindowReport:
        """Score then train on the samples emitted in ``[.., end_ms)``; close the window."""
        table = self.windows.read_table(end_ms)
        if table is not None:
            for batch in self.windows.micro_batches(table):
                if train:
                    preds = self.trainer.evaluate_then_train(batch)
                else:
                    preds = self.trainer.predict(batch)
                # A correction repeats, as a positive, a sample already scored as a negative:
                # it is trained on but not scored twice.
                keep = ~batch.is_correction.numpy()
                self.metrics.update(preds[keep], batch.labels.numpy()[keep].astype(np.float64))
        return self.metrics.close_window(start_ms)
