"""A model's samples on its samples topic, in the format its configuration names.

``[models.samples] format`` picks one of three forms, all decoded into the same Arrow record
batch (:func:`~minutely.data.arrow.arrow_schema`), so everything after the read is the same:

- ``arrow``: one Arrow IPC record batch per message (the trainer's fastest form);
- ``example``: one serialized tf.train.Example per message (what ad stacks built around
  TensorFlow produce), keys mapped onto the schema by ``keys``;
- ``tfrecord``: many Examples per message in TFRecord framing.

Decoding takes many messages at once: Examples from every message given are parsed in one bulk
call. A message or record that cannot be read, or that breaks the spec, is returned as a
:class:`Refused` (the caller sends it to the dead-letter topic); the others go on.

>>> from minutely.config import SamplesConfig
>>> from minutely.data.arrow import samples_to_record_batch
>>> from minutely.data.samples import Sample
>>> from minutely.schema import default_schema
>>> schema = default_schema()
>>> feats = {f.name: ([1, 2] if f.kind == "multi_sparse" else 1) for f in schema.features}
>>> rb = samples_to_record_batch([Sample(7, 1_000, 61_000, 1, False, 5_000, feats)], schema)
>>> wire = SampleWire(schema, SamplesConfig(format="example"), where="models.ctr.samples")
>>> table, refused = wire.decode([*wire.encode(rb), b"junk"])
>>> table.equals(pa.Table.from_batches([rb])), [(r.message, r.reason[:22]) for r in refused]
(True, [(1, 'not a valid Example: a')])
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from minutely.config import SamplesConfig
from minutely.data.arrow import decode_batch, encode_batch
from minutely.data.example import (
    ExampleSpec,
    encode_tfrecords,
    examples_to_record_batch,
    record_batch_to_examples,
    split_tfrecords,
)
from minutely.errors import CodecError
from minutely.schema import Schema

__all__ = ["Refused", "SampleWire"]


@dataclass(frozen=True)
class Refused:
    """A message, or one record of a TFRecord message, that did not decode as samples."""

    message: int  # index in the messages given to decode
    record: int | None  # the record within a TFRecord message (None: the message as a whole)
    payload: bytes  # what goes to the dead-letter topic
    reason: str


class SampleWire:
    """Encodes sample batches into samples-topic messages and decodes them back.

    Built once per stage from the model's ``[models.samples]``; a key that names no sample field
    or feature of ``schema``, or two names sharing a key, fails here with a
    :class:`~minutely.errors.ConfigError` naming ``<where>.keys.<name>``.
    """

    def __init__(self, schema: Schema, cfg: SamplesConfig, *, where: str) -> None:
        self.schema = schema
        self.format = cfg.format
        self.spec = ExampleSpec.build(schema, cfg.keys, cfg.max_ids, where=where)
        self._multi = [f.name for f in schema.features if f.kind == "multi_sparse"]

    def encode(self, rb: pa.RecordBatch) -> list[bytes]:
        """The messages that carry ``rb``'s samples (one for ``arrow`` and ``tfrecord``, one
        per sample for ``example``; none for an empty batch)."""
        if rb.num_rows == 0:
            return []
        if self.format == "arrow":
            return [encode_batch(rb)]
        records = record_batch_to_examples(rb, self.spec)
        if self.format == "example":
            return records
        return [encode_tfrecords(records)]

    def decode(self, messages: Sequence[bytes]) -> tuple[pa.Table | None, list[Refused]]:
        """The samples of ``messages`` as a table in message order (``None`` when no message
        held a good one), and what was refused."""
        if self.format == "arrow":
            return self._decode_arrow(messages)
        refused: list[Refused] = []
        if self.format == "example":
            records: list[bytes] = list(messages)
        else:
            records = []
            starts: list[int] = []  # per message, where its records begin in ``records``
            skipped: dict[int, list[int]] = {}  # per message, the frames refused by the framing
            for i, data in enumerate(messages):
                got, bad = split_tfrecords(data)
                starts.append(len(records))
                records += got
                if bad:
                    skipped[i] = [j for j, _ in bad]
                # A framing error has no record bytes of its own: the message goes whole.
                refused += [Refused(i, j, data, f"tfrecord framing: {why}") for j, why in bad]
        if not records:
            return None, refused
        out = examples_to_record_batch(records, self.spec)
        for k, reason in out.bad:
            if self.format == "example":
                i, j = k, None
            else:
                i = bisect.bisect_right(starts, k) - 1
                j = _frame(k - starts[i], skipped.get(i, []))
            refused.append(Refused(i, j, records[k], reason))
        refused.sort(key=lambda r: (r.message, -1 if r.record is None else r.record))
        if not out.batch.num_rows:
            return None, refused
        return pa.Table.from_batches([out.batch]), refused

    def _decode_arrow(self, messages: Sequence[bytes]) -> tuple[pa.Table | None, list[Refused]]:
        batches: list[pa.RecordBatch] = []
        refused: list[Refused] = []
        for i, data in enumerate(messages):
            try:
                rb = decode_batch(data, self.schema)
            except CodecError as exc:
                refused.append(Refused(i, None, data, str(exc)))
                continue
            rb, over = self._within_max_ids(rb)
            if over is not None:
                refused.append(Refused(i, None, encode_batch(over[0]), over[1]))
            if rb.num_rows:
                batches.append(rb)
        if not batches:
            return None, refused
        return pa.Table.from_batches(batches), refused

    def _within_max_ids(
        self, rb: pa.RecordBatch
    ) -> tuple[pa.RecordBatch, tuple[pa.RecordBatch, str] | None]:
        """``rb`` without the samples that carry more than ``max_ids`` ids in a feature, and
        those samples with the reason (``None`` when there are none)."""
        over = np.zeros(rb.num_rows, dtype=bool)
        first = ""
        for name in self._multi:
            lengths = pc.list_value_length(rb.column(name)).to_numpy(zero_copy_only=False)
            bad = lengths > self.spec.max_ids
            if bad.any() and not first:
                at = int(np.argmax(bad))
                sid = rb.column("sample_id")[at].as_py()
                first = (
                    f"sample_id {sid}: feature {name!r}: too many ids: {int(lengths[at])} > "
                    f"max_ids {self.spec.max_ids}"
                )
            over |= bad
        if not over.any():
            return rb, None
        n = int(over.sum())
        reason = f"{n} sample(s) over max_ids; first {first}"
        return rb.filter(pa.array(~over)), (rb.filter(pa.array(over)), reason)


def _frame(position: int, skipped: list[int]) -> int:
    """The frame number of the ``position``-th record read from a TFRecord message whose frames
    ``skipped`` (ascending) were refused: frames are numbered whether read or refused."""
    frame = position
    for j in skipped:
        if j <= frame:
            frame += 1
    return frame
