"""The online learner: samples topic -> 5-minute windows -> test-then-train.

Each window's samples (all partitions, ordered by emission time) are cut into micro-batches;
every micro-batch is scored by the current model *before* the model trains on it, so the window
metrics measure the model on data it has not seen (the prequential protocol).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import pyarrow as pa
from torch import Tensor

from minutely.config import ModelConfig, TrainConfig
from minutely.data import record_batch_to_tensors
from minutely.data.tensors import TensorBatch
from minutely.data.wire import SampleWire
from minutely.errors import CodecError
from minutely.evaluate import MetricSet, WindowReport
from minutely.events import UNDECODABLE_SAMPLES
from minutely.schema import Schema
from minutely.stream import DeadLetterSink, Log, Record
from minutely.train import Trainer


class SampleWindows:
    """Reads a model's samples topic window by window.

    A samples message is stamped with the join's time when it released the message (the newest
    time its partition had reached), and each partition's stamps never decrease. Window
    ``[start, end)`` is every message stamped before ``end`` not read yet: exactly what the join
    had released before its time reached ``end``, whatever it wrote later (a restored run whose
    crashed predecessor had logged later windows reads the same as the run it replaces). A window
    is *complete* once every partition shows a message stamped at or after ``end`` (the join
    writes an empty watermark message into a partition that has no samples for a window, so
    idle partitions do not hold the windows back).

    Messages read ahead of the window wait in a per-partition buffer; :meth:`positions` (the
    checkpoint) counts only messages handed out, so a resume reads the buffered ones again.
    """

    def __init__(
        self,
        log: Log,
        model: ModelConfig,
        schema: Schema,
        batch_size: int,
        positions: Mapping[int, int] | None = None,
        *,
        poll_records: int = 256,
        dead_letters: DeadLetterSink | None = None,
    ) -> None:
        """``dead_letters`` receives messages (or records of a TFRecord message) that do not
        decode as samples of ``schema`` in the model's sample format, each with its reason and
        offset (without it, such a message raises :class:`~minutely.errors.CodecError`)."""
        self._schema = schema
        self._buckets = model.buckets
        self._batch_size = batch_size
        self._poll_records = poll_records
        self._dead = dead_letters
        self._wire = SampleWire(schema, model.samples, where=f"models.{model.name}.samples")
        self._topic = model.samples_topic
        self._log = log
        self._n = log.partitions(self._topic)
        self._consumer = log.consumer(self._topic)
        self._buf: dict[int, deque[Record]] = {}
        self._front: dict[int, int | None] = {}
        self.seek(positions or {})

    def seek(self, positions: Mapping[int, int]) -> None:
        """Read on from ``positions`` (partition -> offset; 0 where absent), forgetting what
        was read ahead: what a model restarting from another's state at its positions does."""
        start = dict(positions)
        self._consumer.close()
        self._consumer = self._log.consumer(self._topic)
        self._consumer.assign({p: int(start.get(p, 0)) for p in range(self._n)})
        self._buf = {p: deque() for p in range(self._n)}
        self._front = dict.fromkeys(range(self._n))

    def positions(self) -> dict[int, int]:
        """Per partition, the offset of the first message not handed out yet."""
        at = self._consumer.positions()
        return {p: (q[0].offset if q else at[p]) for p, q in self._buf.items()}

    def complete_until(self) -> int | None:
        """The newest time every partition has reached (``None`` before each has a message):
        windows ending at or before it are complete."""
        fronts = list(self._front.values())
        if any(f is None for f in fronts):
            return None
        return min(f for f in fronts if f is not None)

    def earliest_ts(self) -> int | None:
        """The earliest stamp among the messages read ahead (``None`` when none are)."""
        firsts = [q[0].ts_ms for q in self._buf.values() if q]
        return min(firsts) if firsts else None

    def fill(self, end_ms: int | None = None, timeout_s: float = 0.0) -> bool:
        """Read ahead until every partition has reached ``end_ms``, or until everything the log
        held when the call began is read; returns whether the window up to ``end_ms`` is
        complete. ``timeout_s`` is how long one poll waits for new messages."""
        ends: dict[int, int] | None = None
        while True:
            done = self.complete_until()
            if end_ms is not None and done is not None and done >= end_ms:
                return True
            if ends is not None and self._read_to(ends):
                # Read to where the log ended when the call began: another poll would only
                # wait its timeout to come back empty.
                return False
            got = self._consumer.poll(self._poll_records, timeout_s)
            for r in got:
                self._buf[r.partition].append(r)
                front = self._front[r.partition]
                if front is None or r.ts_ms > front:
                    self._front[r.partition] = r.ts_ms
            if got:
                continue
            # Nothing came: stop once every partition is read to where the log ended when the
            # call began (a remote log may answer an early poll empty while fetching).
            if ends is None:
                ends = self._consumer.end_offsets()
            if self._read_to(ends):
                return False
            timeout_s = max(timeout_s, 0.05)

    def _read_to(self, ends: Mapping[int, int]) -> bool:
        """Whether every partition is read to its offset in ``ends``."""
        at = self._consumer.positions()
        return all(at[p] >= end for p, end in ends.items())

    def read_table(self, end_ms: int) -> pa.Table | None:
        """The samples of every message stamped before ``end_ms`` not read yet, sorted by
        (emit time, sample id). Reads what the log holds now; see :meth:`fill`."""
        self.fill(end_ms)
        taken: list[Record] = []
        for q in self._buf.values():
            while q and q[0].ts_ms < end_ms:
                r = q.popleft()
                if r.value:  # an empty message only carries the join's watermark
                    taken.append(r)
        if not taken:
            return None
        table, refused = self._wire.decode([r.value for r in taken])
        for bad in refused:
            r = taken[bad.message]
            if self._dead is None:
                raise CodecError(f"{r.topic}/{r.partition}@{r.offset}: {bad.reason}")
            source = f"{r.topic}/{r.partition}@{r.offset}"
            if bad.record is not None:
                source += f"#{bad.record}"
            self._dead.send(bad.payload, f"{UNDECODABLE_SAMPLES}: {bad.reason}", source, r.ts_ms)
        if table is None:
            return None
        return table.sort_by([("emit_ts_ms", "ascending"), ("sample_id", "ascending")])

    def micro_batches(self, table: pa.Table) -> Iterator[TensorBatch]:
        for rb in table.combine_chunks().to_batches(max_chunksize=self._batch_size):
            if rb.num_rows:
                yield record_batch_to_tensors(rb, self._schema, self._buckets)

    def close(self) -> None:
        self._consumer.close()


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

    def run_window(
        self,
        start_ms: int,
        end_ms: int,
        train: bool = True,
        on_table: Callable[[pa.Table], None] | None = None,
    ) -> WindowReport:
        """Score then train on the window's samples (see :meth:`SampleWindows.read_table`);
        close the window. ``on_table`` sees the window's samples before training."""
        table = self.windows.read_table(end_ms)
        if table is not None:
            if on_table is not None:
                on_table(table)
            self.train_batches(list(self.windows.micro_batches(table)), train)
        return self.metrics.close_window(start_ms)

    def train_batches(
        self,
        batches: list[TensorBatch],
        train: bool = True,
        teacher_logits: list[Tensor] | None = None,
    ) -> None:
        """Score then train on ``batches`` in order (score only without ``train``), into the
        open window's metrics; ``teacher_logits[i]`` are the distillation teacher's logits on
        ``batches[i]`` when the caller has computed them (see
        :meth:`~minutely.train.Trainer.evaluate_then_train`)."""
        for i, batch in enumerate(batches):
            if train:
                given = None if teacher_logits is None else teacher_logits[i]
                preds = self.trainer.evaluate_then_train(batch, given)
            else:
                preds = self.trainer.predict(batch)
            # A correction repeats, as a positive, a sample already scored as a negative:
            # it is trained on but not scored twice.
            keep = ~batch.is_correction.numpy()
            self.metrics.update(preds[keep], batch.labels.numpy()[keep].astype(np.float64))
