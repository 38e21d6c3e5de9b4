"""The attribution-window joiner: raw events in, labeled samples out, on event time only.

Watermark
    ``max event ts seen - allowed_lateness``; it never decreases, and :meth:`Joiner.advance_to`
    pushes it when the stream is idle. An event with ``ts >= watermark`` is on time. Once the
    watermark passes a time ``T`` (``watermark > T``), everything about ``T`` is final. Given
    the caller's clock (``now_ms`` of :meth:`Joiner.process`), an event stamped ahead of it
    counts as stamped ``now_ms``: the watermark is ``min(max event ts, now) - allowed_lateness``,
    so one event from a fast clock cannot make the valid events that follow it late.

pCTR (label ``click``)
    One sample per impression, emitted when the watermark passes ``imp.ts + W`` with
    ``emit_ts_ms = imp.ts + W``; label 1 when a click with ``ts <= imp.ts + W`` was seen by then
    (``label_ts_ms``: the earliest such click). A negative is corrected (same ``sample_id``,
    features and ``event_ts_ms``; label 1, ``is_correction``) by the first click with
    ``ts <= imp.ts + W + H`` seen after it, emitted at the click's time.

pCVR (label ``conversion``)
    One sample per clicked impression (a click no later than ``max_click_delay`` after the
    impression), ``event_ts_ms = click.ts``, window ``[click.ts, click.ts + W]``; labels and
    corrections as above with conversions in place of clicks. While the window is open, an
    earlier duplicate click moves it (the first click by time anchors the window).

Late data and order
    Outputs leave per model in non-decreasing ``emit_ts_ms``, across :meth:`Joiner.drain` calls:
    corrections are held back until the watermark passes their time. Something learned after
    the watermark passed its natural time (a click delivered later than the allowed lateness)
    is emitted at the watermark instead, the earliest time the join knew it; ``label_ts_ms``
    keeps the true event time. An impression behind the watermark is not joined (its windows may
    be closed already): it is counted and returned by :meth:`Joiner.drain_late` with reason
    ``late_impression``. A click or conversion whose impression is not held waits while its own
    time is ahead of the watermark (its impression may still come, out of order within the
    lateness); then, or at once when it is already behind, it is an orphan: counted, and
    returned by :meth:`Joiner.drain_late` with reason ``no_impression``. (Waiting longer would
    not help: its impression, no later than the click in event time, would be behind the
    watermark, hence rejected. A click stamped before its impression, clock skew, joins only if
    the impression arrives first or while the click waits.) The late buffer is bounded: past
    ``late_capacity`` undrained events the oldest are dropped and counted.

Duplicates
    A repeated impression id is ignored; repeated clicks or conversions count once, the earliest
    known when the label is decided. All repeats are counted in :attr:`Joiner.stats`.

State is bounded
    An impression is held until the watermark passes ``imp.ts + impression_retention`` (see
    :class:`~minutely.join.plan.JoinPlan`), a pCVR window until ``click.ts + W + H``. Repeats
    of an impression id after that are indistinguishable from new impressions.

Samples share their impression's ``features`` dict (no copy per sample or model): treat it as
read-only. One joiner serves one partition of the raw topic (partitioned by ``imp_id``); more
partitions scale out with more joiners. :meth:`Joiner.snapshot` and :meth:`Joiner.restore`
resume exactly after the last processed event (undrained outputs and stats included).
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Iterable, Sequence

import msgspec

from minutely.config import JoinConfig, ModelConfig
from minutely.data.samples import Sample
from minutely.errors import CheckpointError, ConfigError, EventError
from minutely.events import Click, Conversion, Event, Impression
from minutely.join.plan import JoinPlan, ModelWindow
from minutely.join.state import (
    DECODER,
    DONE,
    ENCODER,
    OPEN,
    STATE_VERSION,
    WAITING,
    ClickModelState,
    ConversionEntry,
    ConversionModelState,
    JoinState,
    JoinStats,
    LateEvent,
)
from minutely.schema import Schema

_NEVER = 1 << 62  # a time after every real event: "no click / conversion", "end of stream"
_BEFORE = -(1 << 62)  # the watermark before the first event
# Impressions are ordered by one int key, ``ts << 64 | imp_id``: comparing ints is much cheaper
# than comparing (ts, imp_id) tuples, and ints are never tracked by the garbage collector.
_ID_BITS = 64
_ID_MASK = (1 << _ID_BITS) - 1
_COMPACT_AT = 4096
# Emitting and evicting run in batches of about this much event time. Catching up late gives
# exactly the outputs of catching up at every event (outputs merge by emit time), and whatever
# can observe the difference (a click or conversion, a duplicate impression, a drain, the stats,
# a snapshot) catches up first, so batching only saves the per-call overhead.
_BATCH_MS = 5_000

_heappush = heapq.heappush
_heappop = heapq.heappop


class Joiner:
    """Join one partition's raw events into labeled samples, per model.

    >>> from minutely.config import JoinConfig, ModelConfig
    >>> from minutely.schema import default_schema
    >>> ctr = ModelConfig(name="ctr", attribution_window_s=60, correction_horizon_s=600)
    >>> j = Joiner([ctr], JoinConfig(allowed_lateness_s=0), default_schema())
    >>> j.process_many([Impression(1, 0, {}), Impression(2, 0, {}), Click(1, 5_000)])
    >>> j.advance_to(61_000)
    >>> [(s.sample_id, s.label, s.emit_ts_ms) for s in j.drain()["ctr"]]
    [(1, 1, 60000), (2, 0, 60000)]
    >>> j.process(Click(2, 100_000))  # after the window, within the horizon: a correction
    >>> j.flush_all()
    >>> [(s.sample_id, s.label, s.is_correction, s.emit_ts_ms) for s in j.drain()["ctr"]]
    [(2, 1, True, 100000)]
    """

    def __init__(
        self,
        models: Sequence[ModelConfig],
        cfg: JoinConfig,
        schema: Schema,
        *,
        late_capacity: int = 100_000,
    ) -> None:
        if late_capacity < 0:
            raise ConfigError("late_capacity", "int >= 0", late_capacity)
        self._plan = JoinPlan.build(models, cfg)
        self._schema_fp = schema.fingerprint()
        plan = self._plan
        self._lateness = plan.lateness_ms
        self._delay = plan.max_click_delay_ms
        self._retention = plan.impression_retention_ms
        self._first_due = plan.first_due_ms
        self._max_ts = _BEFORE
        self._wm = _BEFORE
        self._due = _NEVER  # the watermark must pass this before anything can be released
        self._pending_due = _NEVER  # the same for the waiting clicks/conversions
        self._seq = 0
        # Impressions held, by id; ``_incoming`` is a heap of the keys of those still ahead of
        # the watermark, ``_line`` those behind it in order: accepted impressions are never
        # behind the watermark, so appending the heap's minimum keeps ``_line`` sorted.
        self._imps: dict[int, Impression] = {}
        self._incoming: list[int] = []
        self._line: list[int] = []
        self._head = 0  # ``_line[:_head]`` is evicted
        self._clk: dict[int, int] = {}  # earliest click ts per held impression
        self._cnv: dict[int, int] = {}  # earliest conversion ts per held impression
        self._pending: dict[int, list[Event]] = {}  # clicks/conversions awaiting their impression
        self._pending_heap: list[tuple[int, int]] = []
        self._clicks: list[tuple[ModelWindow, ClickModelState]] = [
            (w, ClickModelState(w.name, 0, [], [])) for w in plan.click_models
        ]
        self._convs: list[tuple[ModelWindow, ConversionModelState]] = [
            (w, ConversionModelState(w.name, {}, [], [], [], [])) for w in plan.conversion_models
        ]
        self._late: deque[LateEvent] = deque(maxlen=late_capacity)
        self._late_capacity = late_capacity
        self._processed = 0
        self._orphans = 0
        self._duplicates = 0
        self._late_impressions = 0
        self._late_dropped = 0

    # --- input ------------------------------------------------------------------------------

    def process(self, event: Event, *, now_ms: int | None = None) -> None:
        """Join one event, then release whatever the advanced watermark made final.

        With ``now_ms`` (the caller's clock), the event moves the watermark at most to
        ``now_ms - allowed_lateness``; without it, to its own time minus the lateness.
        """
        self.process_clocked(((event, _NEVER if now_ms is None else now_ms),))

    def process_many(self, events: Iterable[Event], *, now_ms: int | None = None) -> None:
        """:meth:`process` each event in order, all with the same ``now_ms``."""
        self.process_clocked(zip(events, itertools.repeat(_NEVER if now_ms is None else now_ms)))

    def process_clocked(
        self,
        events: Iterable[tuple[Event, int]],
        on_error: Callable[[int, Exception], None] | None = None,
    ) -> None:
        """:meth:`process` each ``(event, now_ms)`` pair in order: each event with its own clock.

        An event that fails raises, the events before it joined; with ``on_error``, it costs
        that event only: ``on_error(index, exception)`` is called and the next event follows.
        The impression path is inlined: it runs about a million times per simulated day.
        """
        imps = self._imps
        incoming = self._incoming
        pending = self._pending
        first_due = self._first_due
        lateness = self._lateness
        on_click = self._on_click
        on_conversion = self._on_conversion
        # Only this loop moves the watermark while it runs: read it from locals, write through
        # (so they still hold after a failed event).
        wm = self._wm
        max_ts = self._max_ts
        taken = 0
        failed = 0
        try:
            for event, cap in events:
                taken += 1
                try:
                    if isinstance(event, Impression):
                        ts = event.ts_ms
                        iid = event.imp_id
                        if ts < wm:
                            self._late_impressions += 1
                            self._reject(LateEvent(event, "late_impression", wm))
                        elif iid in imps and self._catch_up() and iid in imps:
                            self._duplicates += 1  # held once evictions are caught up: a repeat
                        elif not 0 <= iid <= _ID_MASK:
                            raise EventError(
                                "Joiner.process: impression imp_id expected in [0, 2**64), "
                                f"got {iid}"
                            )
                        else:
                            imps[iid] = event
                            _heappush(incoming, (ts << _ID_BITS) | iid)
                            if ts + first_due < self._due:
                                self._due = ts + first_due
                            if pending and iid in pending:
                                self._replay(iid)
                    elif isinstance(event, Click):
                        ts = event.ts_ms
                        on_click(event)
                    elif isinstance(event, Conversion):
                        ts = event.ts_ms
                        on_conversion(event)
                    else:
                        raise EventError(
                            f"Joiner.process: expected an Impression, Click or Conversion, "
                            f"got {type(event).__name__}"
                        )
                    if ts > max_ts:
                        if ts > cap:  # stamped ahead of the clock: counts as stamped now
                            ts = cap if cap > max_ts else max_ts
                        self._max_ts = max_ts = ts
                        if ts - lateness > wm:
                            self._wm = wm = ts - lateness
                            if wm > self._pending_due:
                                self._expire_pending()
                            if wm - _BATCH_MS > self._due:
                                self._release()
                except Exception as exc:
                    failed += 1
                    if on_error is None:
                        raise
                    on_error(taken - 1, exc)
        finally:
            self._processed += taken - failed

    def advance_to(self, now_ms: int) -> None:
        """Push the watermark to ``now_ms - allowed_lateness`` (a replay clock tick while idle)."""
        wm = now_ms - self._lateness
        if wm > self._wm:
            self._wm = wm
            if wm > self._pending_due:
                self._expire_pending()
            if wm - _BATCH_MS > self._due:
                self._release()

    def flush_all(self) -> None:
        """End of stream: move the watermark past every time and emit everything pending.

        Afterwards the joiner holds no state; events processed later are all late.
        """
        self._wm = _NEVER
        self._expire_pending()
        self._release()

    # --- output -----------------------------------------------------------------------------

    def drain(self) -> dict[str, list[Sample]]:
        """Samples that became final since the last drain, per model name (configuration order)."""
        self._catch_up()
        out: dict[str, list[Sample]] = {}
        for _, cs in self._clicks:
            out[cs.name], cs.out = cs.out, []
        for _, vs in self._convs:
            out[vs.name], vs.out = vs.out, []
        return {name: out[name] for name in self._plan.model_names}

    def drain_late(self) -> list[LateEvent]:
        """Late impressions and orphaned clicks/conversions since the last call, oldest first."""
        late = list(self._late)
        self._late.clear()
        return late

    @property
    def watermark_ms(self) -> int:
        """The current watermark (a huge negative number before the first event)."""
        return self._wm

    @property
    def plan(self) -> JoinPlan:
        """The windows and horizons derived from the configuration."""
        return self._plan

    @property
    def stats(self) -> JoinStats:
        """A copy of the counters (see :class:`~minutely.join.state.JoinStats`)."""
        self._catch_up()
        models = [cs for _, cs in self._clicks] + [vs for _, vs in self._convs]
        return JoinStats(
            processed=self._processed,
            emitted={m.name: m.emitted for m in models},
            positives={m.name: m.positives for m in models},
            corrections={m.name: m.corrected for m in models},
            orphans=self._orphans,
            duplicates=self._duplicates,
            late_impressions=self._late_impressions,
            late_dropped=self._late_dropped,
        )

    def state_size(self) -> int:
        """Entries held: impressions, waiting clicks/conversions, pCVR windows, corrections."""
        self._catch_up()
        return (
            len(self._imps)
            + sum(len(v) for v in self._pending.values())
            + sum(len(cs.corrections) for _, cs in self._clicks)
            + sum(len(vs.entries) + len(vs.corrections) for _, vs in self._convs)
        )

    # --- joining ----------------------------------------------------------------------------

    def _replay(self, iid: int) -> None:
        """Join the clicks and conversions that arrived before their impression."""
        for ev in self._pending.pop(iid):
            if isinstance(ev, Click):
                self._on_click(ev)
            elif isinstance(ev, Conversion):
                self._on_conversion(ev)

    def _on_click(self, click: Click) -> None:
        if self._wm > self._due:
            self._release()  # what follows reads which samples are out and what is evicted
        iid = click.imp_id
        ts = click.ts_ms
        imp = self._imps.get(iid)
        if imp is None:
            if any(iid in vs.entries for _, vs in self._convs):
                self._duplicates += 1  # its impression is gone, its pCVR window is not
            else:
                self._wait_or_orphan(click)
            return
        old = self._clk.get(iid)
        if old is None:
            self._clk[iid] = ts
        else:
            self._duplicates += 1
            if ts < old:
                self._clk[iid] = ts
        wm = self._wm
        imp_ts = imp.ts_ms
        for w, cs in self._clicks:
            close = imp_ts + w.window_ms
            if close < wm:  # the sample is out: only a correction can change it
                limit = close + w.horizon_ms
                if ts <= limit and (old is None or old > limit):
                    emit = ts if ts > wm else wm
                    self._push_correction(cs.corrections, iid, imp, imp_ts, emit, ts)
        if self._convs and ts - imp_ts <= self._delay:
            first = old is None or old - imp_ts > self._delay
            for w, vs in self._convs:
                if first:
                    cnv = self._cnv.get(iid, _NEVER)
                    vs.entries[iid] = ConversionEntry(imp, ts, cnv, OPEN)
                    self._push_opening(vs, ts + w.window_ms, iid, ts)
                else:
                    entry = vs.entries.get(iid)
                    if entry is not None and entry.status == OPEN and ts < entry.anchor:
                        entry.anchor = ts
                        self._push_opening(vs, ts + w.window_ms, iid, ts)

    def _on_conversion(self, conv: Conversion) -> None:
        if not self._convs:
            return
        if self._wm > self._due:
            self._release()  # what follows reads which samples are out and what is evicted
        iid = conv.imp_id
        ts = conv.ts_ms
        held = iid in self._imps
        if held:
            old = self._cnv.get(iid)
            if old is None:
                self._cnv[iid] = ts
            else:
                self._duplicates += 1
                if ts < old:
                    self._cnv[iid] = ts
        found = held
        seen = False
        wm = self._wm
        for w, vs in self._convs:
            entry = vs.entries.get(iid)
            if entry is None:
                continue
            found = True
            if entry.conversion < _NEVER:
                seen = True
            if entry.status == WAITING and ts <= entry.anchor + w.window_ms + w.horizon_ms:
                entry.status = DONE
                emit = ts if ts > wm else wm
                self._push_correction(vs.corrections, iid, entry.imp, entry.anchor, emit, ts)
            if ts < entry.conversion:
                entry.conversion = ts
        if not found:
            self._wait_or_orphan(conv)
        elif seen and not held:
            self._duplicates += 1

    def _push_correction(
        self,
        heap: list[tuple[int, int, Sample]],
        iid: int,
        imp: Impression,
        event_ts: int,
        emit: int,
        label_ts: int,
    ) -> None:
        self._seq += 1
        sample = Sample(iid, event_ts, emit, 1, True, label_ts, imp.features)
        _heappush(heap, (emit, self._seq, sample))
        if emit < self._due:
            self._due = emit

    def _push_opening(self, vs: ConversionModelState, close: int, iid: int, anchor: int) -> None:
        key = close if close > self._wm else self._wm
        _heappush(vs.opening, (key, iid, anchor))
        if key < self._due:
            self._due = key

    def _wait_or_orphan(self, event: Click | Conversion) -> None:
        ts = event.ts_ms
        if ts >= self._wm:
            waiting = self._pending.get(event.imp_id)
            if waiting is None:
                self._pending[event.imp_id] = [event]
            else:
                waiting.append(event)
            _heappush(self._pending_heap, (ts, event.imp_id))
            if ts < self._pending_due:
                self._pending_due = ts
        else:
            self._orphans += 1
            self._reject(LateEvent(event, "no_impression", self._wm))

    def _reject(self, late: LateEvent) -> None:
        if len(self._late) == self._late_capacity:
            self._late_dropped += 1
        if self._late_capacity:
            self._late.append(late)

    # --- releasing --------------------------------------------------------------------------

    def _release(self) -> None:
        """Emit, expire and evict everything the watermark has passed; recompute ``_due``."""
        wm = self._wm
        line = self._line
        incoming = self._incoming
        passed = wm << _ID_BITS  # keys below it: impressions with ts < wm
        while incoming and incoming[0] < passed:
            line.append(_heappop(incoming))
        for w, cs in self._clicks:
            self._release_clicks(w, cs, wm)
        for w, vs in self._convs:
            self._release_conversions(w, vs, wm)
        self._evict(wm)
        self._due = self._next_due()

    def _catch_up(self) -> bool:
        """Release what the watermark has passed, if anything; always true (for chaining)."""
        if self._wm > self._due:
            self._release()
        return True

    def _expire_pending(self) -> None:
        """Orphan the waiting clicks/conversions the watermark has passed.

        Their impression cannot come any more: an impression is never later than its clicks,
        and one behind the watermark is rejected. This runs at once (not batched) so the late
        events keep their order.
        """
        wm = self._wm
        heap = self._pending_heap
        while heap and heap[0][0] < wm:
            iid = _heappop(heap)[1]
            waiting = self._pending.get(iid)
            # A stale entry (its events joined, or a newer wait of the same impression) is
            # skipped; the newer wait has its own entry.
            if waiting is None or min(ev.ts_ms for ev in waiting) >= wm:
                continue
            del self._pending[iid]
            for ev in waiting:
                self._orphans += 1
                self._reject(LateEvent(ev, "no_impression", wm))
        self._pending_due = heap[0][0] if heap else _NEVER

    def _release_clicks(self, w: ModelWindow, cs: ClickModelState, wm: int) -> None:
        line = self._line
        clk = self._clk
        imps = self._imps
        out = cs.out
        corrections = cs.corrections
        window = w.window_ms
        horizon = w.horizon_ms
        limit = (wm - window) << _ID_BITS
        cur = cs.cursor
        n = len(line)
        emitted = len(out)
        positives = 0
        corrected = 0
        while cur < n:
            key = line[cur]
            if key >= limit:
                break
            cur += 1
            ts = key >> _ID_BITS
            iid = key & _ID_MASK
            close = ts + window
            while corrections and corrections[0][0] <= close:
                out.append(_heappop(corrections)[2])
                corrected += 1
            feats = imps[iid].features
            c = clk.get(iid)
            if c is not None and c <= close:
                out.append(Sample(iid, ts, close, 1, False, c, feats))
                positives += 1
            else:
                out.append(Sample(iid, ts, close, 0, False, -1, feats))
                if c is not None and c <= close + horizon:
                    self._seq += 1
                    sample = Sample(iid, ts, c, 1, True, c, feats)
                    _heappush(corrections, (c, self._seq, sample))
        cs.cursor = cur
        while corrections and corrections[0][0] < wm:
            out.append(_heappop(corrections)[2])
            corrected += 1
        cs.emitted += len(out) - emitted
        cs.positives += positives + corrected
        cs.corrected += corrected

    def _release_conversions(self, w: ModelWindow, vs: ConversionModelState, wm: int) -> None:
        opening = vs.opening
        entries = vs.entries
        corrections = vs.corrections
        out = vs.out
        window = w.window_ms
        horizon = w.horizon_ms
        emitted = len(out)
        positives = 0
        corrected = 0
        while opening and opening[0][0] < wm:
            key, iid, anchor = _heappop(opening)
            entry = entries.get(iid)
            if entry is None or entry.status != OPEN or entry.anchor != anchor:
                continue  # superseded by an earlier click
            while corrections and corrections[0][0] <= key:
                out.append(_heappop(corrections)[2])
                corrected += 1
            close = anchor + window
            cnv = entry.conversion
            feats = entry.imp.features
            if cnv <= close:
                out.append(Sample(iid, anchor, key, 1, False, cnv, feats))
                positives += 1
                entry.status = DONE
            else:
                out.append(Sample(iid, anchor, key, 0, False, -1, feats))
                if cnv <= close + horizon:
                    entry.status = DONE
                    emit = cnv if cnv > key else key
                    self._seq += 1
                    sample = Sample(iid, anchor, emit, 1, True, cnv, feats)
                    _heappush(corrections, (emit, self._seq, sample))
                else:
                    entry.status = WAITING
            _heappush(vs.expiry, (close + horizon, iid))
        while corrections and corrections[0][0] < wm:
            out.append(_heappop(corrections)[2])
            corrected += 1
        expiry = vs.expiry
        while expiry and expiry[0][0] < wm:
            entries.pop(_heappop(expiry)[1], None)
        vs.emitted += len(out) - emitted
        vs.positives += positives + corrected
        vs.corrected += corrected

    def _evict(self, wm: int) -> None:
        line = self._line
        imps = self._imps
        clk = self._clk
        cnv = self._cnv
        limit = (wm - self._retention) << _ID_BITS
        head = self._head
        n = len(line)
        while head < n:
            key = line[head]
            if key >= limit:
                break
            iid = key & _ID_MASK
            del imps[iid]
            if iid in clk:
                del clk[iid]
            if iid in cnv:
                del cnv[iid]
            head += 1
        self._head = head
        if head == n or (head >= _COMPACT_AT and 2 * head >= n):
            self._compact()

    def _compact(self) -> None:
        head = self._head
        if head:
            del self._line[:head]
            for _, cs in self._clicks:
                cs.cursor -= head
            self._head = 0

    def _next_due(self) -> int:
        due = _NEVER
        line = self._line
        n = len(line)
        if self._incoming:
            due = (self._incoming[0] >> _ID_BITS) + self._first_due
        if self._head < n:
            due = min(due, (line[self._head] >> _ID_BITS) + self._retention)
        for w, cs in self._clicks:
            if cs.cursor < n:
                due = min(due, (line[cs.cursor] >> _ID_BITS) + w.window_ms)
            if cs.corrections:
                due = min(due, cs.corrections[0][0])
        for _, vs in self._convs:
            for heap in (vs.opening, vs.expiry, vs.corrections):
                if heap:
                    due = min(due, heap[0][0])
        return due

    # --- snapshot ---------------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """The complete state (undrained outputs and stats included) as compact msgpack."""
        self._catch_up()
        self._compact()  # the snapshot carries no evicted entries and cursors stay aligned
        state = JoinState(
            version=STATE_VERSION,
            identity=self._plan.identity(),
            schema_fingerprint=self._schema_fp,
            max_ts_ms=self._max_ts,
            watermark_ms=self._wm,
            seq=self._seq,
            impressions=list(self._imps.values()),
            incoming=[(k >> _ID_BITS, k & _ID_MASK) for k in self._incoming],
            line=[(k >> _ID_BITS, k & _ID_MASK) for k in self._line],
            clicks=self._clk,
            conversions=self._cnv,
            pending=self._pending,
            pending_heap=self._pending_heap,
            click_models=[cs for _, cs in self._clicks],
            conversion_models=[vs for _, vs in self._convs],
            late=list(self._late),
            processed=self._processed,
            orphans=self._orphans,
            duplicates=self._duplicates,
            late_impressions=self._late_impressions,
            late_dropped=self._late_dropped,
        )
        return ENCODER.encode(state)

    @classmethod
    def restore(
        cls,
        models: Sequence[ModelConfig],
        cfg: JoinConfig,
        schema: Schema,
        state: bytes,
        *,
        late_capacity: int = 100_000,
    ) -> Joiner:
        """A joiner that resumes right after the last event processed before :meth:`snapshot`.

        Raises :class:`CheckpointError` when ``state`` does not decode, or was taken with other
        models, join settings or feature schema (the message names the difference).
        """
        joiner = cls(models, cfg, schema, late_capacity=late_capacity)
        try:
            st = DECODER.decode(state)
        except msgspec.DecodeError as exc:  # ValidationError derives from DecodeError
            raise CheckpointError(f"join snapshot: cannot decode the state ({exc})") from exc
        if st.version != STATE_VERSION:
            raise CheckpointError(
                f"join snapshot: expected state version {STATE_VERSION}, got {st.version}"
            )
        mine = joiner._plan.identity()
        if st.identity != mine:
            missing = [x for x in mine if x not in st.identity]
            extra = [x for x in st.identity if x not in mine]
            raise CheckpointError(
                "join snapshot: the joiner's models or join settings differ from the snapshot's: "
                f"configured but not in the snapshot {missing}, in the snapshot but not "
                f"configured {extra}"
            )
        if st.schema_fingerprint != joiner._schema_fp:
            raise CheckpointError(
                f"join snapshot: expected feature schema {joiner._schema_fp}, "
                f"got {st.schema_fingerprint}"
            )
        joiner._load(st)
        return joiner

    def _load(self, st: JoinState) -> None:
        self._max_ts = st.max_ts_ms
        self._wm = st.watermark_ms
        self._seq = st.seq
        # (ts, imp_id) pairs keep heap order as keys: the key order is the pair order.
        self._incoming = [(ts << _ID_BITS) | iid for ts, iid in st.incoming]
        self._line = [(ts << _ID_BITS) | iid for ts, iid in st.line]
        self._head = 0
        self._imps = {imp.imp_id: imp for imp in st.impressions}
        held = {iid for _, iid in st.incoming}
        held.update(iid for _, iid in st.line)
        bad = [iid for iid in held if not 0 <= iid <= _ID_MASK]
        if bad:
            raise CheckpointError(
                f"join snapshot: impression ids expected in [0, 2**64), got {bad[:3]}"
            )
        if held != self._imps.keys():
            raise CheckpointError(
                f"join snapshot: expected the held impressions to match the time index, got "
                f"{len(self._imps)} impressions for {len(held)} index entries"
            )
        self._clk = st.clicks
        self._cnv = st.conversions
        self._pending = st.pending
        self._pending_heap = st.pending_heap
        self._clicks = [(w, cs) for (w, _), cs in zip(self._clicks, st.click_models, strict=True)]
        self._convs = [
            (w, vs) for (w, _), vs in zip(self._convs, st.conversion_models, strict=True)
        ]
        for _, cs in self._clicks:
            if not 0 <= cs.cursor <= len(self._line):
                raise CheckpointError(
                    f"join snapshot: model {cs.name!r} cursor expected in "
                    f"[0, {len(self._line)}], got {cs.cursor}"
                )
        self._late.extend(st.late)
        self._processed = st.processed
        self._orphans = st.orphans
        self._duplicates = st.duplicates
        self._late_impressions = st.late_impressions
        self._late_dropped = st.late_dropped + max(0, len(st.late) - self._late_capacity)
        self._due = self._next_due()
        self._pending_due = self._pending_heap[0][0] if self._pending_heap else _NEVER
