"""The simulated event source: the ad servers' logs, written to the raw topic.

With feature snapshots on (``features.snapshots``), the source is the producer of the
production layout: it writes the features of each window's impressions to the snapshot tables
(:class:`~minutely.features.SnapshotWriter`, one write per window) and only once that write
returned publishes the window's impressions by reference (request id, no features).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from minutely.clock import MS_PER_DAY
from minutely.config import Config
from minutely.errors import SchemaError
from minutely.features import SnapshotWriter
from minutely.pipeline.appender import ExactlyOnceWriter
from minutely.schema import Schema
from minutely.sim import EventBatch, Market
from minutely.stream import Log
from minutely.stream.base import Message


def corrupt(message: tuple[bytes, bytes, int], variant: int) -> tuple[bytes, bytes, int]:
    """A malformed copy of a raw event, of the kinds real logs contain."""
    key, value, ts = message
    if variant % 4 == 0:
        return key, value[: len(value) // 2], ts  # truncated write
    doc = msgspec.json.decode(value)
    if variant % 4 == 1:
        doc.pop("ts_ms")  # a field lost upstream
    elif variant % 4 == 2:
        doc["imp_id"] = str(doc["imp_id"])  # an id logged as text
    else:
        doc["ts_ms"] = doc["ts_ms"] + MS_PER_DAY  # a clock a day ahead
    return key, msgspec.json.encode(doc), ts


def open_snapshots(cfg: Config, schema: Schema, run_dir: Path) -> SnapshotWriter | None:
    """The snapshot writer of ``cfg.features`` (replicas resolved inside ``run_dir``) when
    ``features.snapshots`` is on, else ``None``."""
    if not cfg.features.snapshots:
        return None
    return SnapshotWriter.from_config(schema, cfg.features, run_dir)


class SimSource:
    """Appends the market's events, window by window, to the raw topic (exactly once).

    With ``corrupt_every`` > 0, a malformed copy of every n-th event is added to the stream
    (never replacing a valid one), so the dead-letter path runs in every replay. ``writer``
    restores the exactly-once writer's checkpointed state (see
    :class:`~minutely.pipeline.appender.ExactlyOnceWriter`).

    With ``snapshots`` (a writer the source then owns and closes in :meth:`close`), each
    :meth:`produce` first writes the impressions' features as snapshots keyed by request id
    (the impression id), then appends the impressions by reference. A window produced again
    after a restart writes its snapshots again: the rows are identical and readers keep the
    first row of an id, while the exactly-once writer skips the messages already in the topic.
    A snapshot write that fails (:class:`~minutely.errors.StorageError`) raises before anything
    of the window is appended.
    """

    WRITER_ID = "simulate"

    def __init__(
        self,
        market: Market,
        log: Log,
        topic: str,
        corrupt_every: int = 0,
        writer: Mapping[str, Any] | None = None,
        produced: int = 0,
        snapshots: SnapshotWriter | None = None,
    ) -> None:
        if snapshots is not None:
            got, want = snapshots.schema.fingerprint(), market.schema.fingerprint()
            if got != want:
                raise SchemaError(
                    f"SimSource: expected a snapshot writer of the market's schema {want}, "
                    f"got one of schema {got}"
                )
        self._market = market
        self._out = ExactlyOnceWriter(log, topic, self.WRITER_ID, writer)
        self._snapshots = snapshots
        self.snapshot_rows = 0
        self._corrupt_every = corrupt_every
        self.produced = produced
        self.corrupted = produced // corrupt_every if corrupt_every else 0

    def produce(self, start_ms: int, end_ms: int) -> EventBatch:
        batch = self._market.events_between(start_ms, end_ms)
        if self._snapshots is None:
            messages = batch.messages()
        else:
            request_ids, ts_ms, features = batch.snapshots()
            if len(request_ids):
                self.snapshot_rows += self._snapshots.write(request_ids, ts_ms, features).rows
            messages = batch.messages(by_reference=True)
        if self._corrupt_every:
            out: list[Message] = []
            every = self._corrupt_every
            for i, msg in enumerate(messages, start=self.produced):
                out.append(msg)
                if (i + 1) % every == 0:
                    out.append(corrupt(msg, i // every))
                    self.corrupted += 1
            self._out.append_keyed(out)
        else:
            self._out.append_keyed(list(messages))
        self.produced += len(messages)
        return batch

    def writer_state(self) -> dict[str, Any]:
        return self._out.state()

    @property
    def snapshots(self) -> SnapshotWriter | None:
        """The snapshot writer, when impressions are published by reference."""
        return self._snapshots

    def close(self) -> None:
        """Close the snapshot writer, if any (the log stays open: the caller owns it)."""
        if self._snapshots is not None:
            self._snapshots.close()
