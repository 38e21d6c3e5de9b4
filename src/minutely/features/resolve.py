"""Fetching the features of by-reference impressions from the snapshot tables.

A producer that writes feature snapshots publishes its impressions *by reference*: a
``request_id`` and empty ``features`` (:attr:`minutely.events.Impression.by_reference`). A
consumer of them, such as the join, passes each batch of decoded, ingest-checked events to
:meth:`FeatureResolver.resolve`, which puts the features back:

* every by-reference impression is looked up by its request id, in the hourly bucket of its
  impression time, with one :meth:`~minutely.features.SnapshotReader.get` for the whole batch;
* ids the reader reports *pending* (not visible yet) are asked for again every ``poll_s`` until
  the reader finds them or reports them missing (after its ``missing_wait_s`` on its clock). A
  reader whose clock does not move while the resolver waits (a replay clock) would never report
  them missing, so ids still pending after ``max_wait_s`` of wall time are missing as well;
* the features found are checked by :meth:`minutely.events.EventValidator.check_features`, the
  rules inline features meet at ingest;
* an impression whose snapshot does not fit the schema (a malformed row, or features the
  validator refuses) fails with ``"invalid snapshot: ..."``, one whose snapshot never appeared
  with ``"missing snapshot: request_id N after W s ..."`` (groups of
  :data:`minutely.events.REASONS`), for the caller to dead-letter.

Every other event (clicks, conversions, impressions with inline features) passes through
unchanged and in place. A storage failure of both replicas is a
:class:`~minutely.errors.StorageError` from the reader, raised as it is: it is not a fault of
the events, for the caller to retry the batch rather than dead-letter it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minutely.clock import Clock
from minutely.config import Config
from minutely.errors import EventError
from minutely.events import (
    INVALID_IMPRESSION,
    INVALID_SNAPSHOT,
    MISSING_SNAPSHOT,
    Event,
    EventValidator,
    FeatureValue,
    Impression,
)
from minutely.features.reader import SnapshotReader
from minutely.schema import Schema

_PREFIX = f"{INVALID_IMPRESSION}: "


@dataclass
class ResolveStats:
    """Impressions resolved, missing (no snapshot) and malformed (a snapshot that does not fit),
    and the reader calls made (``gets``; more than one per batch only while ids are pending)."""

    resolved: int = 0
    missing: int = 0
    malformed: int = 0
    gets: int = 0


class FeatureResolver:
    """Replaces by-reference impressions with impressions carrying their snapshot's features
    (see the module documentation). Not thread-safe, like the reader it uses.

    ``sleep`` is called between two asks for pending ids (``time.sleep`` by default; tests pass
    their own).
    """

    def __init__(
        self,
        reader: SnapshotReader,
        validator: EventValidator,
        *,
        poll_s: float = 0.2,
        max_wait_s: float | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not poll_s > 0:
            raise ValueError(f"poll_s: expected a number of seconds > 0, got {poll_s!r}")
        if max_wait_s is None:
            # past the reader's own verdict, which may read both replicas once more
            max_wait_s = reader.missing_wait_s + 2 * reader.read_timeout_s + poll_s
        if not max_wait_s >= 0:
            raise ValueError(f"max_wait_s: expected a number of seconds >= 0, got {max_wait_s!r}")
        self.reader = reader
        self.validator = validator
        self.poll_s = float(poll_s)
        self.max_wait_s = float(max_wait_s)
        self._sleep = sleep
        self.stats = ResolveStats()

    def close(self) -> None:
        """Close the reader (its replica worker processes)."""
        self.reader.close()

    def resolve(self, events: Sequence[Event]) -> tuple[list[Event | None], dict[int, str]]:
        """``(out, failures)``: ``out[i]`` is ``events[i]``, or for a by-reference impression the
        impression with its snapshot's features (same ids, time and request id), or ``None``
        when it failed; ``failures`` maps those positions to the reason."""
        out: list[Event | None] = list(events)
        refs = [
            (i, ev, ev.request_id)
            for i, ev in enumerate(events)
            if type(ev) is Impression and ev.request_id is not None and not ev.features
        ]
        if not refs:
            return out, {}
        when: dict[int, int] = {}  # request id -> impression time (the first, for the bucket)
        for _, imp, rid in refs:
            when.setdefault(rid, imp.ts_ms)
        found, malformed, missing = self._fetch(when)
        failures: dict[int, str] = {}
        for i, imp, rid in refs:
            feats = found.get(rid)
            if feats is None:
                where = f"(imp_id {imp.imp_id})"
                if rid in malformed:
                    reason = f"{INVALID_SNAPSHOT}: request_id {rid}: {malformed[rid]} {where}"
                else:
                    waited = f"after {missing[rid]:g} s"
                    reason = f"{MISSING_SNAPSHOT}: request_id {rid} {waited} {where}"
            else:
                try:
                    self.validator.check_features(feats, imp.imp_id)
                except EventError as exc:
                    text = str(exc).removeprefix(_PREFIX)
                    reason = f"{INVALID_SNAPSHOT}: request_id {rid}: {text}"
                else:
                    out[i] = Impression(imp.imp_id, imp.ts_ms, feats, rid)
                    self.stats.resolved += 1
                    continue
            out[i] = None
            failures[i] = reason
            if reason.startswith(MISSING_SNAPSHOT):
                self.stats.missing += 1
            else:
                self.stats.malformed += 1
        return out, failures

    def _fetch(
        self, when: dict[int, int]
    ) -> tuple[dict[int, dict[str, FeatureValue]], dict[int, str], dict[int, float]]:
        """The features found per request id, the malformed ids with their reason, and the
        missing ids with the seconds they were waited for, asking again for pending ids until
        none is left."""
        ids = np.fromiter(when, np.int64, len(when))
        ts = np.fromiter(when.values(), np.int64, len(when))
        deadline = time.monotonic() + self.max_wait_s
        found: dict[int, dict[str, FeatureValue]] = {}
        malformed: dict[int, str] = {}
        missing: dict[int, float] = {}
        while True:
            got = self.reader.get(ids, ts)
            self.stats.gets += 1
            found.update(got.found)
            malformed.update(got.malformed)
            missing.update(dict.fromkeys(got.missing, self.reader.missing_wait_s))
            if not got.pending:
                return found, malformed, missing
            if time.monotonic() >= deadline:
                missing.update(dict.fromkeys(got.pending, self.max_wait_s))
                return found, malformed, missing
            self._sleep(self.poll_s)
            ids = np.array(got.pending, dtype=np.int64)
            ts = np.array([when[r] for r in got.pending], dtype=np.int64)


def open_resolver(
    cfg: Config, schema: Schema, run_dir: Path, clock: Clock | None = None
) -> FeatureResolver | None:
    """The resolver a consumer of ``cfg``'s raw topic needs: one over a
    :class:`~minutely.features.SnapshotReader` of ``cfg.features`` (replicas resolved inside
    ``run_dir``, missing ids timed on ``clock``, the wall clock by default) when
    ``features.snapshots`` is on, else ``None``. Close it with :meth:`FeatureResolver.close`."""
    if not cfg.features.snapshots:
        return None
    reader = SnapshotReader.from_config(schema, cfg.features, run_dir, clock)
    return FeatureResolver(reader, EventValidator.from_config(schema, cfg.ingest))
