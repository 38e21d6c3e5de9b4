"""The join stage: raw events from the log -> validated -> joined -> samples topics.

One :class:`~minutely.join.Joiner` per raw-topic partition (the raw topic is keyed by impression
id, so an impression and its click and conversion meet in one partition); samples from raw
partition ``p`` go to partition ``p`` of each model's samples topic, one Arrow record batch of at
most ``batch_size`` samples per message. Malformed or impossible events go to the dead-letter
topic with the reason and where they came from, are counted, and the stream goes on.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from minutely.clock import Clock
from minutely.config import IngestConfig, JoinConfig, ModelConfig, StreamConfig
from minutely.data import encode_batch, samples_to_record_batch
from minutely.data.samples import Sample
from minutely.errors import CheckpointError, EventError
from minutely.events import decode_event, validate_event
from minutely.join import Joiner
from minutely.pipeline.appender import IdempotentAppender
from minutely.schema import Schema
from minutely.stream import DeadLetterSink, Log, TopicReader


@dataclass
class JoinStageStats:
    events: int = 0
    dead_letters: int = 0
    dead_letters_by_reason: dict[str, int] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)
    late: dict[str, int] = field(default_factory=dict)


class JoinStage:
    """Consumes the raw topic up to its end and appends labeled samples per model."""

    def __init__(
        self,
        log: Log,
        stream: StreamConfig,
        ingest: IngestConfig,
        join: JoinConfig,
        models: Sequence[ModelConfig],
        schema: Schema,
        clock: Clock,
        batch_size: int,
        state: dict[str, Any] | None = None,
    ) -> None:
        self._log = log
        self._stream = stream
        self._ingest = ingest
        self._join_cfg = join
        self._models = tuple(models)
        self._schema = schema
        self._clock = clock
        self._batch_size = batch_size
        self._raw = stream.raw_topic
        log.create_topic(self._raw, stream.partitions)
        self._n = log.partitions(self._raw)
        for m in self._models:
            log.create_topic(m.samples_topic, self._n)
        self.stats = JoinStageStats(samples={m.name: 0 for m in self._models})
        if state is None:
            self._reader = TopicReader(log, self._raw)
            self._joiners = [Joiner(self._models, join, schema) for _ in range(self._n)]
            self._out = {m.name: IdempotentAppender(log, m.samples_topic) for m in self._models}
            self._dead_out = self._dead_appender(None)
            self._dead = DeadLetterSink(
                log, stream.dead_letter_topic, write=self._dead_out.append_keyed
            )
        else:
            self._restore(state)

    def _dead_appender(self, ends: dict[int, int] | None) -> IdempotentAppender:
        self._log.create_topic(self._stream.dead_letter_topic, 1)
        return IdempotentAppender(self._log, self._stream.dead_letter_topic, ends)

    # -- running ------------------------------------------------------------------------------

    def run(self, max_records: int = 200_000) -> int:
        """Join every raw record logged before the clock's now; returns how many were read.

        Reading up to the clock, not to the end of the log, keeps a replay deterministic: a
        restored stage sees the same records per tick as the run it replaces, even when that run
        had already logged later records before it stopped. ``max_records`` bounds one read (a
        long backlog is taken in slices); a larger slice re-reads fewer rows across partitions.
        """
        now = self._clock.now_ms()
        max_future = self._ingest.max_future_s * 1000
        max_past = self._ingest.max_past_s * 1000
        total = 0
        while True:
            records = self._reader.read_until(now, max_records)
            if not records:
                break
            total += len(records)
            for rec in records:
                try:
                    event = decode_event(rec.value)
                    validate_event(event, self._schema, now, max_future, max_past)
                except EventError as exc:
                    source = f"{rec.topic}/{rec.partition}@{rec.offset}"
                    self._dead.send(rec.value, str(exc), source, now)
                    continue
                self._joiners[rec.partition].process(event)
        self.stats.events += total
        self.stats.dead_letters = self._dead.count
        self.stats.dead_letters_by_reason = dict(self._dead.counts_by_reason)
        return total

    def advance_to(self, now_ms: int) -> None:
        """Move every joiner's watermark to ``now_ms`` and publish what became final."""
        for p, joiner in enumerate(self._joiners):
            joiner.advance_to(now_ms)
            self._publish(p, joiner.drain())
            self._count_late(joiner)

    def _count_late(self, joiner: Joiner) -> None:
        # Events that cannot be joined (a click whose impression was evicted, a conversion for a
        # model set without pCVR) are well-formed data, not dead letters: counted by reason.
        for late in joiner.drain_late():
            self.stats.late[late.reason] = self.stats.late.get(late.reason, 0) + 1

    def flush_all(self) -> None:
        """End of stream: emit everything pending (tests, bounded replays)."""
        for p, joiner in enumerate(self._joiners):
            joiner.flush_all()
            self._publish(p, joiner.drain())
            self._count_late(joiner)

    def _publish(self, partition: int, out: dict[str, list[Sample]]) -> None:
        for name, samples in out.items():
            if not samples:
                continue
            msgs: list[tuple[bytes | None, bytes, int]] = []
            for i in range(0, len(samples), self._batch_size):
                chunk = samples[i : i + self._batch_size]
                rb = samples_to_record_batch(chunk, self._schema)
                msgs.append((None, encode_batch(rb), chunk[-1].emit_ts_ms))
            self._out[name].append_to(partition, msgs)
            self.stats.samples[name] += len(samples)

    def state_size(self) -> int:
        return sum(j.state_size() for j in self._joiners)

    def watermark_ms(self) -> int:
        return min(j.watermark_ms for j in self._joiners)

    # -- checkpointing ------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """JSON-able state that resumes after the last raw record read."""
        return {
            "raw_topic": self._raw,
            "positions": {str(p): o for p, o in self._reader.positions().items()},
            "joiners": [base64.b64encode(j.snapshot()).decode() for j in self._joiners],
            "outputs": {
                name: {str(p): e for p, e in app.ends().items()} for name, app in self._out.items()
            },
            "dead_letters": {
                "ends": {str(p): e for p, e in self._dead_out.ends().items()},
                "counts": self._dead.counts_by_reason,
            },
            "stats": {
                "events": self.stats.events,
                "samples": dict(self.stats.samples),
                "late": dict(self.stats.late),
            },
        }

    def _restore(self, state: dict[str, Any]) -> None:
        try:
            if state["raw_topic"] != self._raw:
                raise CheckpointError(
                    f"join stage checkpoint: expected raw topic {self._raw!r}, "
                    f"got {state['raw_topic']!r}"
                )
            blobs = state["joiners"]
            if len(blobs) != self._n:
                raise CheckpointError(
                    f"join stage checkpoint: expected {self._n} partitions, got {len(blobs)}"
                )
            names = sorted(m.name for m in self._models)
            if sorted(state["outputs"]) != names:
                raise CheckpointError(
                    f"join stage checkpoint: expected models {names}, "
                    f"got {sorted(state['outputs'])}"
                )
            positions = {int(p): int(o) for p, o in state["positions"].items()}
            self._reader = TopicReader(self._log, self._raw, positions)
            self._joiners = [
                Joiner.restore(self._models, self._join_cfg, self._schema, base64.b64decode(b))
                for b in blobs
            ]
            self._out = {
                m.name: IdempotentAppender(
                    self._log,
                    m.samples_topic,
                    {int(p): int(e) for p, e in state["outputs"][m.name].items()},
                )
                for m in self._models
            }
            dead = state["dead_letters"]
            self._dead_out = self._dead_appender({int(p): int(e) for p, e in dead["ends"].items()})
            self._dead = DeadLetterSink(
                self._log,
                self._stream.dead_letter_topic,
                write=self._dead_out.append_keyed,
                counts_by_reason={str(k): int(v) for k, v in dead["counts"].items()},
            )
            self.stats.dead_letters = self._dead.count
            self.stats.dead_letters_by_reason = self._dead.counts_by_reason
            self.stats.events = int(state["stats"]["events"])
            self.stats.samples = {k: int(v) for k, v in state["stats"]["samples"].items()}
            self.stats.late = {k: int(v) for k, v in state["stats"]["late"].items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"join stage checkpoint: malformed state ({exc!r})") from exc
