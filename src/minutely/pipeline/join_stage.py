"""The join stage: raw events from the log -> validated -> joined -> samples topics.

Everything about one raw-topic partition is one :class:`PartitionJoin`: its position, its
:class:`~minutely.join.Joiner` (the raw topic is keyed by impression id, so an impression and its
click and conversion meet in one partition), its exactly-once writers and its counts. Samples
from raw partition ``p`` go to partition ``p`` of each model's samples topic, one Arrow record
batch of at most ``batch_size`` samples per message. :class:`JoinStage` runs every partition in
one process for the in-process replay; the ``minutely join`` service
(:mod:`minutely.pipeline.join_service`) runs the partitions its consumer group gives it.

A partition's time is its own: its clock is the newest time its records vouch for (an event's
time, but never beyond the log time of the record that carried it, so a skewed event cannot
drag the clock ahead), or a time the caller advances it to. Events are checked against the log
time of their record; the clock caps how far an event moves the joiner's watermark; samples
messages are stamped with the clock when released. All of it depends only on the partition's
records (and the caller's advances), which is what lets a restored partition reproduce exactly
the messages its predecessor wrote.

No record stops the stage. An event the ingest check (:class:`~minutely.events.EventValidator`)
refuses, or one the joiner fails on (a click stamped too far before its impression, a repeated
impression id with another time or features), goes to the dead-letter topic with the reason and
where it came from (``topic/partition@offset``); a click or conversion the joiner refuses for
clock skew after it waited for its impression goes there as JSON (source
``join/<raw topic>/<partition>``), as does a joined sample the sample codec refuses (source
``join/<model>/<partition>``) while the rest of its batch is published. Letters are counted by
reason group (:data:`~minutely.events.REASONS`), and the stream goes on. Well-formed events the
join cannot use (late impressions, clicks without impression, conversions without a click) are
counted by reason in ``stats.late``, repeats in ``stats.duplicates``.

State. Without a store a partition's checkpoint (:meth:`PartitionJoin.snapshot`) is one JSON
document holding a full copy of the joiner. With a :class:`~minutely.join.store.JoinStore` (one
SQLite file per raw partition, under the checkpoint folder of whoever owns the join), the large
state lives there and :meth:`PartitionJoin.checkpoint` commits, in one transaction, what changed
since the last checkpoint together with the partition's position, clock, writer states, counts
and the caller's own state; any process can resume the partition from that file.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minutely.clock import Clock
from minutely.config import (
    Config,
    IngestConfig,
    JoinConfig,
    ModelConfig,
    StreamConfig,
    TrainConfig,
)
from minutely.data import samples_to_json, samples_to_record_batch
from minutely.data.samples import Sample
from minutely.data.wire import SampleWire
from minutely.errors import CheckpointError, EventError
from minutely.events import (
    UNENCODABLE_SAMPLE,
    UNJOINABLE_EVENT,
    Event,
    EventValidator,
    Impression,
    encode_event,
)
from minutely.features import FeatureResolver
from minutely.join import Joiner
from minutely.join.store import CommitStats, JoinStore
from minutely.pipeline.appender import ExactlyOnceWriter
from minutely.schema import Schema
from minutely.stream import DeadLetterSink, Log, Record, TopicReader
from minutely.stream.base import Message

_NO_TIME = -(1 << 62)


@dataclass
class JoinStageStats:
    """Raw records read, dead letters (by reason group), samples published per model, events
    the join could not use by reason (``late``) and repeated events (``duplicates``)."""

    events: int = 0
    dead_letters: int = 0
    dead_letters_by_reason: dict[str, int] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)
    late: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0

    def add(self, other: JoinStageStats) -> None:
        self.events += other.events
        self.dead_letters += other.dead_letters
        self.duplicates += other.duplicates
        for mine, theirs in (
            (self.dead_letters_by_reason, other.dead_letters_by_reason),
            (self.samples, other.samples),
            (self.late, other.late),
        ):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v


@dataclass(frozen=True)
class JoinSettings:
    """What a partition's join needs from the configuration."""

    stream: StreamConfig
    ingest: IngestConfig
    join: JoinConfig
    models: tuple[ModelConfig, ...]
    batch_size: int
    window_ms: int = TrainConfig().window_s * 1000
    markers: bool = False

    @classmethod
    def from_config(cls, cfg: Config, *, markers: bool = True) -> JoinSettings:
        """The service's settings: released every training window, with time markers."""
        return cls(
            cfg.stream,
            cfg.ingest,
            cfg.join,
            tuple(cfg.models),
            cfg.train.batch_size,
            cfg.train.window_s * 1000,
            markers,
        )


class PartitionJoin:
    """One raw partition: validate -> join -> samples and dead letters, exactly once.

    What the joiner made final is published when the partition's clock enters a new window
    (``window_ms``, the training window) and when the caller advances the clock: so the messages
    depend on the records alone, never on how they were sliced into calls. With ``markers``,
    entering a window also writes an empty message stamped with the new time into each samples
    partition: a trainer waiting for every partition to pass a window's end then knows that this
    one has, even when it had no samples.
    """

    def __init__(
        self,
        log: Log,
        settings: JoinSettings,
        schema: Schema,
        partition: int,
        state: Mapping[str, Any] | None = None,
        *,
        store: JoinStore | None = None,
        resolver: FeatureResolver | None = None,
    ) -> None:
        """A fresh partition (``state`` is ``None``; ``store``, if any, is empty) or one resumed
        from ``state``: a :meth:`snapshot`, or, with ``store``, the state its last
        :meth:`checkpoint` committed there (:meth:`stored_state`). ``resolver`` fetches the
        features of impressions published by reference (see :mod:`minutely.features`)."""
        self._log = log
        self._store = store
        self._resolver = resolver
        self._s = settings
        self._schema = schema
        self.partition = partition
        self._raw = settings.stream.raw_topic
        self._validator = EventValidator.from_config(schema, settings.ingest)
        self._wires = {
            m.name: SampleWire(schema, m.samples, where=f"models.{m.name}.samples")
            for m in settings.models
        }
        self._writer_id = f"join/{self._raw}/{partition}"
        self.stats = JoinStageStats(samples={m.name: 0 for m in settings.models})
        if state is None:
            self.position = 0
            self.clock_ms = _NO_TIME
            self._joiner = Joiner(settings.models, settings.join, schema, store=store)
            writers: dict[str, Any] = {}
            counts: dict[str, int] = {}
        else:
            writers, counts = self._restore(state)
        self.stats.duplicates = self._joiner.stats.duplicates
        self._out = {
            m.name: ExactlyOnceWriter(log, m.samples_topic, self._writer_id, writers.get(m.name))
            for m in settings.models
        }
        dl_topic = settings.stream.dead_letter_topic
        log.create_topic(dl_topic, 1)
        self._dead_out = ExactlyOnceWriter(
            log, dl_topic, self._writer_id, writers.get("dead_letters")
        )
        self._dead = DeadLetterSink(
            log, dl_topic, write=self._dead_out.append_keyed, counts_by_reason=counts
        )
        self.stats.dead_letters = self._dead.count
        self.stats.dead_letters_by_reason = self._dead.counts_by_reason

    # -- running ----------------------------------------------------------------------------------

    def process(self, records: Sequence[Record], now_ms: int | None = None) -> None:
        """Join ``records`` (this partition's, in offset order) and publish what became final.

        ``now_ms`` (the in-process replay's clock) is a further cap: the partition's clock stays
        before it.
        """
        parse = self._validator.parse
        window = self._s.window_ms
        clock = self.clock_ms
        # The joiner takes the events in runs, each event with the clock after it (the clock
        # caps how far an event moves the watermark: an event stamped ahead of it cannot make
        # valid ones late). A run ends before a release and before a dead letter, so that
        # everything still happens in record order.
        run: list[tuple[Event, int]] = []
        run_records: list[Record] = []
        parsed: list[Event | str] = []
        for rec in records:
            try:
                parsed.append(parse(rec.value, rec.ts_ms))
            except EventError as exc:
                parsed.append(str(exc))
        if self._resolver is not None:
            self._resolve(parsed)
        for rec, event in zip(records, parsed, strict=True):
            if isinstance(event, str):  # why the record is a dead letter
                self._join(run, run_records)
                self._dead_letter(rec.value, event, _source(rec))
                continue
            vouched = event.ts_ms if event.ts_ms < rec.ts_ms else rec.ts_ms
            if vouched > clock:
                new = vouched if now_ms is None or vouched < now_ms else now_ms - 1
                if new // window != clock // window and clock != _NO_TIME:
                    self._join(run, run_records)
                    self.clock_ms = clock
                    self._release()
                    self._mark(new)
                clock = new
            run.append((event, clock))
            run_records.append(rec)
        self._join(run, run_records)
        if records:
            self.position = records[-1].offset + 1
            self.stats.events += len(records)
        self.clock_ms = clock

    def _resolve(self, parsed: list[Event | str]) -> None:
        """Put the snapshot features into the impressions published by reference, in place
        (one lookup for the whole batch); one whose snapshot is missing or does not fit becomes
        the reason of its dead letter. A storage failure of both replicas raises
        :class:`~minutely.errors.StorageError`: nothing of the batch is joined, and the service
        resumes from its checkpoint."""
        assert self._resolver is not None
        at: list[int] = []
        refs: list[Event] = []
        for i, e in enumerate(parsed):
            if type(e) is Impression and e.by_reference:
                at.append(i)
                refs.append(e)
        if not refs:
            return
        out, failures = self._resolver.resolve(refs)
        for k, i in enumerate(at):
            event = out[k]
            parsed[i] = failures[k] if event is None else event

    def _join(self, run: list[tuple[Event, int]], records: list[Record]) -> None:
        """Join a run of events (clocked) and empty it; ``records`` are the events' records."""
        if not run:
            return

        def failed(i: int, exc: Exception) -> None:  # a joiner failure costs that event only
            reason = f"{UNJOINABLE_EVENT}: {type(exc).__name__}: {exc}"
            self._dead_letter(records[i].value, reason, _source(records[i]))

        self._joiner.process_clocked(run, failed)
        run.clear()
        records.clear()

    def advance_to(self, now_ms: int) -> None:
        """The caller vouches that every event up to ``now_ms`` has arrived (an idle tick):
        move there and publish everything final, stamped ``now_ms``."""
        if now_ms > self.clock_ms:
            window = self._s.window_ms
            if now_ms // window != self.clock_ms // window and self.clock_ms != _NO_TIME:
                self._release()
                self._mark(now_ms)
            self.clock_ms = now_ms
        self._joiner.advance_to(now_ms)
        self._release()

    def flush_all(self) -> None:
        """End of stream: emit everything pending (tests, bounded replays)."""
        self._joiner.flush_all()
        self._release()

    def _release(self) -> None:
        out = self._joiner.drain()
        for m in self._s.models:
            self._publish(m.name, out.get(m.name, []))
        for late in self._joiner.drain_late():
            if late.reason == "clock_skew":  # stamped too far before its impression
                source = f"join/{self._raw}/{self.partition}"
                reason = f"{UNJOINABLE_EVENT}: {late.detail}"
                self._dead_letter(encode_event(late.event), reason, source)
                continue
            # Events that cannot be joined (a click whose impression was evicted) are
            # well-formed data, not dead letters: counted by reason.
            self.stats.late[late.reason] = self.stats.late.get(late.reason, 0) + 1
        self.stats.duplicates = self._joiner.stats.duplicates

    def _publish(self, name: str, samples: list[Sample]) -> None:
        stamp = self.clock_ms
        msgs: list[Message] = []
        size = self._s.batch_size
        for i in range(0, len(samples), size):
            data, chunk = self._encode(name, samples[i : i + size])
            if chunk:
                msgs += [(None, d, stamp) for d in data]
                self.stats.samples[name] += len(chunk)
        if msgs:
            self._out[name].append_to(self.partition, msgs)

    def _mark(self, now_ms: int) -> None:
        """Tell each samples partition that this partition's time reached ``now_ms``."""
        if self._s.markers:
            for writer in self._out.values():
                writer.append_to(self.partition, [(None, b"", now_ms)])

    def _encode(self, name: str, chunk: list[Sample]) -> tuple[list[bytes], list[Sample]]:
        """The samples-topic messages of ``chunk`` (in the model's sample format), and the
        samples they hold.

        When the codec refuses the chunk, each sample is encoded alone: one refused alone is a
        dead letter (the sample as JSON) and the others are encoded together.
        """
        wire = self._wires[name]
        try:
            return wire.encode(samples_to_record_batch(chunk, self._schema)), chunk
        except Exception:  # which sample and why: found one by one below
            pass
        good: list[Sample] = []
        for s in chunk:
            try:
                wire.encode(samples_to_record_batch([s], self._schema))
            except Exception as exc:  # refused alone: this sample is the bad one
                reason = f"{UNENCODABLE_SAMPLE}: sample_id {s.sample_id}: {exc}"
                self._dead_letter(samples_to_json([s]), reason, f"join/{name}/{self.partition}")
            else:
                good.append(s)
        if not good:
            return [], good
        return wire.encode(samples_to_record_batch(good, self._schema)), good

    def _dead_letter(self, payload: bytes, reason: str, source: str) -> None:
        self._dead.send(payload, reason, source, max(self.clock_ms, 0))
        self.stats.dead_letters = self._dead.count
        self.stats.dead_letters_by_reason = self._dead.counts_by_reason

    def state_size(self) -> int:
        return self._joiner.state_size()

    @property
    def watermark_ms(self) -> int:
        return self._joiner.watermark_ms

    # -- checkpointing ----------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """JSON-able state that resumes after the last record processed (a full copy of the
        joiner; with a store, read back from it)."""
        doc = self._partition_state()
        doc["joiner"] = base64.b64encode(self._joiner.snapshot()).decode()
        return doc

    def checkpoint(self, extra: Mapping[str, Any] | None = None) -> CommitStats:
        """Commit to the store, in one transaction, the joiner's changes since the last
        checkpoint and this partition's state, with ``extra`` (JSON-able) beside it."""
        if self._store is None:
            raise CheckpointError(
                f"join partition {self.partition}: checkpoint expected a store, got none "
                "(use snapshot)"
            )
        doc = {**(extra or {}), "join": self._partition_state()}
        return self._joiner.checkpoint(json.dumps(doc, sort_keys=True).encode())

    @staticmethod
    def stored_state(store: JoinStore) -> dict[str, Any] | None:
        """What the store's last :meth:`checkpoint` committed (``extra`` and ``"join"``, the
        partition's state), or ``None`` before the first."""
        blob = store.caller_state()
        if blob is None:
            return None
        try:
            doc = json.loads(blob)
        except ValueError as exc:
            raise CheckpointError(
                f"join store {store.path}: the partition state does not decode ({exc})"
            ) from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("join"), dict):
            raise CheckpointError(
                f"join store {store.path}: expected a partition state with a 'join' table, got "
                f"{type(doc).__name__}"
            )
        return doc

    def close(self) -> None:
        """Close the store, if any (nothing is lost: it changes only at a checkpoint)."""
        if self._store is not None:
            self._store.close()

    def _partition_state(self) -> dict[str, Any]:
        writers = {name: w.state() for name, w in self._out.items()}
        writers["dead_letters"] = self._dead_out.state()
        return {
            "raw_topic": self._raw,
            "partition": self.partition,
            "position": self.position,
            "clock_ms": self.clock_ms,
            "writers": writers,
            "dead_letter_counts": self._dead.counts_by_reason,
            "stats": {
                "events": self.stats.events,
                "samples": dict(self.stats.samples),
                "late": dict(self.stats.late),
            },
        }

    def _restore(self, state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, int]]:
        where = f"join checkpoint of partition {self.partition}"
        try:
            if (state["raw_topic"], state["partition"]) != (self._raw, self.partition):
                raise CheckpointError(
                    f"{where}: expected raw topic {self._raw!r} partition {self.partition}, got "
                    f"{state['raw_topic']!r} partition {state['partition']!r}"
                )
            names = sorted(m.name for m in self._s.models)
            writers: dict[str, Any] = dict(state["writers"])
            if sorted(k for k in writers if k != "dead_letters") != names:
                raise CheckpointError(f"{where}: expected models {names}, got {sorted(writers)}")
            self.position = int(state["position"])
            self.clock_ms = int(state["clock_ms"])
            if self._store is None:
                self._joiner = Joiner.restore(
                    self._s.models, self._s.join, self._schema, base64.b64decode(state["joiner"])
                )
            else:
                self._joiner = Joiner.resume(
                    self._s.models, self._s.join, self._schema, self._store
                )
            counts = {str(k): int(v) for k, v in state["dead_letter_counts"].items()}
            st = state["stats"]
            self.stats.events = int(st["events"])
            self.stats.samples = {k: int(v) for k, v in st["samples"].items()}
            self.stats.late = {k: int(v) for k, v in st["late"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"{where}: malformed state ({exc!r})") from exc
        return writers, counts


class JoinStage:
    """Every raw partition in one process, driven by the in-process replay's clock.

    :meth:`run` joins every raw record logged before the clock's now: a restored stage then
    sees, tick by tick, exactly what the run it replaces saw, even when that run had already
    logged later records before it stopped.

    With ``store_dir``, each partition keeps its state in ``<store_dir>/p<N>.sqlite``: a fresh
    stage (``state`` is ``None``) starts empty stores there, :meth:`snapshot` checkpoints each
    one and returns their generations, and a stage given that snapshot resumes every partition
    from its store at that generation. A store one generation ahead (the caller stopped after
    the stores committed and before its own checkpoint was written, or restores the checkpoint
    before its newest) is rolled back to it: the stores keep the undo of their last commit.
    Any other generation is refused.
    """

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
        *,
        window_ms: int = TrainConfig().window_s * 1000,
        store_dir: Path | None = None,
        resolver: FeatureResolver | None = None,
    ) -> None:
        self._clock = clock
        self._store_dir = store_dir
        self.last_commits: list[CommitStats] = []
        self._raw = stream.raw_topic
        self._max_future_ms = ingest.max_future_s * 1000
        settings = JoinSettings(stream, ingest, join, tuple(models), batch_size, window_ms)
        log.create_topic(self._raw, stream.partitions)
        n = log.partitions(self._raw)
        for m in models:
            log.create_topic(m.samples_topic, n)
        if store_dir is None:
            parts: list[Mapping[str, Any] | None] = [None] * n
            if state is not None:
                parts = _partition_states(state, self._raw, n)
            self.parts = [
                PartitionJoin(log, settings, schema, p, parts[p], resolver=resolver)
                for p in range(n)
            ]
        else:
            self.parts = _open_stores(log, settings, schema, n, state, store_dir, resolver)
        self._reader = TopicReader(log, self._raw, {p.partition: p.position for p in self.parts})

    @classmethod
    def from_config(
        cls,
        log: Log,
        cfg: Config,
        schema: Schema,
        clock: Clock,
        state: dict[str, Any] | None = None,
        *,
        models: Sequence[ModelConfig] | None = None,
        store_dir: Path | None = None,
        resolver: FeatureResolver | None = None,
    ) -> JoinStage:
        """The stage ``cfg`` describes, for all its models unless ``models`` names fewer."""
        return cls(
            log,
            cfg.stream,
            cfg.ingest,
            cfg.join,
            cfg.models if models is None else models,
            schema,
            clock,
            cfg.train.batch_size,
            state,
            window_ms=cfg.train.window_s * 1000,
            store_dir=store_dir,
            resolver=resolver,
        )

    @property
    def stats(self) -> JoinStageStats:
        total = JoinStageStats()
        for p in self.parts:
            total.add(p.stats)
        return total

    def run(self, max_records: int = 200_000) -> int:
        """Join every raw record logged before the clock's now; returns how many were read.

        ``max_records`` bounds one read (a long backlog is taken in slices). A record stamped
        further ahead than ``ingest.max_future_s`` does not hold its partition back: it is read
        at once (and refused by the ingest check if its event is that far ahead too).
        """
        now = self._clock.now_ms()
        total = 0
        while True:
            records = self._reader.read_until(now, max_records, horizon_ms=self._max_future_ms)
            if not records:
                break
            total += len(records)
            by_part: list[list[Record]] = [[] for _ in self.parts]
            for r in records:
                by_part[r.partition].append(r)
            for part, recs in zip(self.parts, by_part, strict=True):
                if recs:
                    part.process(recs, now_ms=now)
        return total

    def advance_to(self, now_ms: int) -> None:
        """Every event before ``now_ms`` has arrived: move every partition there and publish
        what became final (stamped before ``now_ms``)."""
        for part in self.parts:
            part.advance_to(now_ms - 1)

    def flush_all(self) -> None:
        for part in self.parts:
            part.flush_all()

    def state_size(self) -> int:
        return sum(p.state_size() for p in self.parts)

    def watermark_ms(self) -> int:
        return min(p.watermark_ms for p in self.parts)

    def snapshot(self) -> dict[str, Any]:
        """JSON-able state that resumes after the last raw record read.

        With a store folder, each partition's store commits its changes since the last snapshot
        (:attr:`last_commits` says what each wrote) and the state names their generations;
        without, it holds every partition's full state.
        """
        if self._store_dir is None:
            return {"raw_topic": self._raw, "partitions": [p.snapshot() for p in self.parts]}
        self.last_commits = [p.checkpoint() for p in self.parts]
        return {
            "raw_topic": self._raw,
            "partitions": [
                {"partition": p.partition, "generation": c.generation}
                for p, c in zip(self.parts, self.last_commits, strict=True)
            ],
        }

    def close(self) -> None:
        """Close the raw topic's reader (a Kafka consumer holds a connection) and the stores."""
        self._reader.close()
        for p in self.parts:
            p.close()


def _partition_states(state: Mapping[str, Any], raw: str, n: int) -> list[Mapping[str, Any] | None]:
    try:
        if state["raw_topic"] != raw:
            raise CheckpointError(
                f"join stage checkpoint: expected raw topic {raw!r}, got {state['raw_topic']!r}"
            )
        parts = list(state["partitions"])
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"join stage checkpoint: malformed state ({exc!r})") from exc
    if len(parts) != n:
        raise CheckpointError(f"join stage checkpoint: expected {n} partitions, got {len(parts)}")
    return parts


def _open_stores(
    log: Log,
    settings: JoinSettings,
    schema: Schema,
    n: int,
    state: Mapping[str, Any] | None,
    store_dir: Path,
    resolver: FeatureResolver | None,
) -> list[PartitionJoin]:
    """Every partition on its store in ``store_dir``: new ones, or resumed (``state``)."""
    expected = [0] * n
    if state is not None:
        docs = _partition_states(state, settings.stream.raw_topic, n)
        try:
            expected = [int(doc["generation"]) for doc in docs]  # type: ignore[index]
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"join stage checkpoint: expected each partition's store generation ({exc!r})"
            ) from exc
    parts: list[PartitionJoin] = []
    try:
        for p in range(n):
            path = store_dir / f"p{p}.sqlite"
            if state is None:
                store = JoinStore.create(path, undo=True)
                doc = None
            else:
                store = JoinStore.open(path, undo=True)
            try:
                if state is not None:
                    doc = _stored_partition(store, expected[p])
                parts.append(
                    PartitionJoin(log, settings, schema, p, doc, store=store, resolver=resolver)
                )
            except BaseException:
                store.close()
                raise
    except BaseException:
        for part in parts:
            part.close()
        raise
    return parts


def _stored_partition(store: JoinStore, expected: int) -> Mapping[str, Any]:
    generation = store.generation()
    if generation == expected + 1 and store.can_roll_back():
        generation = store.roll_back()
    if generation != expected:
        raise CheckpointError(
            f"join store {store.path}: expected generation {expected} (the checkpoint's) or "
            f"the one after it, got {generation}"
        )
    doc = PartitionJoin.stored_state(store)
    if doc is None:
        raise CheckpointError(f"join store {store.path}: expected a checkpoint, found none")
    join: Mapping[str, Any] = doc["join"]
    return join


def _source(rec: Record) -> str:
    return f"{rec.topic}/{rec.partition}@{rec.offset}"
