"""The join's snapshot state, its statistics and its late-event records.

Every mutable piece of a :class:`~minutely.join.Joiner` lives in the structs below, so a snapshot
is one msgpack encoding of :class:`JoinState` and a restore is one typed decode. Heaps are stored
as the lists they are (already in heap order), which keeps the restored joiner's output order
identical to the original's. A joiner with a :class:`~minutely.join.store.JoinStore` checkpoints
the same struct with ``stored = True`` and without what the store holds (impressions, their time
index, pCVR entries and their expiry index).
"""

from __future__ import annotations

from typing import Literal

import msgspec

from minutely.data.samples import Sample
from minutely.events import Event, Impression

STATE_VERSION = 2

# Per-model status of a pCVR sample.
OPEN = 0  # window open: the sample has not been emitted yet
WAITING = 1  # emitted as a negative; a conversion within the horizon would correct it
DONE = 2  # emitted as a positive, or corrected: later conversions change nothing

LateReason = Literal["late_impression", "no_impression", "no_click", "clock_skew"]


class LateEvent(msgspec.Struct, frozen=True):
    """An event the join could not use, and why; the caller sends it to the dead-letter topic.

    ``late_impression``: an impression older than the watermark when it arrived (its windows may
    already be closed). ``no_impression``: a click or conversion whose impression was never seen,
    arrived late, or was already evicted. ``no_click``: the earliest conversion of an impression
    evicted without a click that opens a pCVR window (no model can use it). ``clock_skew``: a
    click or conversion that waited for its impression, which then came stamped more than the
    allowed clock skew after it (``detail`` says by how much). ``watermark_ms`` is the watermark
    when it was rejected.
    """

    event: Event
    reason: LateReason
    watermark_ms: int
    detail: str = ""


class JoinStats(msgspec.Struct, frozen=True):
    """Counters since the joiner started (they survive snapshot and restore).

    Per model: ``emitted`` counts every sample (corrections included), ``positives`` those with
    label 1 (corrections included), ``corrections`` the corrections alone. ``orphans`` counts
    clicks and conversions that joined no impression; ``duplicates`` repeated impressions, clicks
    and conversions for one impression; ``late_impressions`` impressions behind the watermark;
    ``late_dropped`` late events discarded because the bounded late buffer was full;
    ``unclicked`` conversions of impressions evicted without a qualifying click; ``skewed``
    clicks and conversions refused for clock skew after waiting for their impression.
    """

    processed: int
    emitted: dict[str, int]
    positives: dict[str, int]
    corrections: dict[str, int]
    orphans: int
    duplicates: int
    late_impressions: int
    late_dropped: int
    unclicked: int = 0
    skewed: int = 0


class ClickModelState(msgspec.Struct):
    """A pCTR model: its read position in the time-ordered impressions and its outputs.

    ``corrections`` is a heap of ``(emit_ts_ms, seq, sample)`` held back until the watermark
    passes ``emit_ts_ms``, so outputs leave in emit-time order.
    """

    name: str
    cursor: int
    corrections: list[tuple[int, int, Sample]]
    out: list[Sample]
    emitted: int = 0
    positives: int = 0
    corrected: int = 0


class ConversionEntry(msgspec.Struct, array_like=True):
    """One clicked impression for one pCVR model.

    ``anchor`` is the click time that opened the window; ``conversion`` the earliest conversion
    time known (a huge sentinel when none).
    """

    imp: Impression
    anchor: int
    conversion: int
    status: int


class ConversionModelState(msgspec.Struct):
    """A pCVR model: open windows, emitted windows awaiting corrections, outputs.

    ``opening`` is a heap of ``(emit_ts_ms, imp_id, anchor)`` (entries whose anchor no longer
    matches are stale and skipped); ``expiry`` a heap of ``(anchor + W + H, imp_id)`` of the
    emitted entries in ``entries``. With a store, ``entries`` holds the open windows and the
    entries changed since the last checkpoint (the rest are in the store), and entries whose
    expiry is before ``expired_below`` are gone.
    """

    name: str
    entries: dict[int, ConversionEntry]
    opening: list[tuple[int, int, int]]
    expiry: list[tuple[int, int]]
    corrections: list[tuple[int, int, Sample]]
    out: list[Sample]
    emitted: int = 0
    positives: int = 0
    corrected: int = 0
    expired_below: int = -(1 << 62)


class JoinState(msgspec.Struct):
    """Everything a joiner needs to resume after the last processed event."""

    version: int
    identity: list[str]
    schema_fingerprint: str
    max_ts_ms: int  # newest event time, each capped at the clock it was processed under
    watermark_ms: int
    seq: int
    impressions: list[Impression]
    incoming: list[tuple[int, int]]
    line: list[tuple[int, int]]
    clicks: dict[int, int]
    conversions: dict[int, int]
    pending: dict[int, list[Event]]
    pending_heap: list[tuple[int, int]]
    click_models: list[ClickModelState]
    conversion_models: list[ConversionModelState]
    late: list[LateEvent]
    processed: int
    orphans: int
    duplicates: int
    late_impressions: int
    late_dropped: int
    unclicked: int = 0
    skewed: int = 0
    stored: bool = False  # a store's checkpoint: impressions and entries are in the store


ENCODER = msgspec.msgpack.Encoder()
DECODER = msgspec.msgpack.Decoder(JoinState)
