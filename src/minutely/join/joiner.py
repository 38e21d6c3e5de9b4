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

Emit at once (``W = 0``)
    The sample is emitted as a negative as soon as the watermark passes its event time; no
    action counts in that first emission, not even one stamped at the same millisecond. The
    first action with ``ts <= event time + H`` is the positive duplicate (a correction), emitted
    at the action's time, or at the negative's when the action is stamped no later than it.

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
    ``late_capacity`` undrained events the oldest are dropped and counted. The earliest
    conversion of an impression evicted without a click that opens a pCVR window is returned
    with reason ``no_click`` when the impression is evicted.

Clock skew
    A click or conversion stamped more than ``max_clock_skew`` before its impression is refused:
    :class:`~minutely.errors.EventError` when its impression is held (the event alone fails, see
    :meth:`Joiner.process_clocked`), or, when it waited for the impression, returned by
    :meth:`Joiner.drain_late` with reason ``clock_skew`` once the impression comes.

Duplicates
    A repeated impression id is ignored when it repeats the held impression (same time and
    features) and refused with :class:`~minutely.errors.EventError` when it differs: two
    impressions under one id cannot both be joined. Repeated clicks or conversions count once,
    the earliest known when the label is decided. All repeats are counted in
    :attr:`Joiner.stats`.

State is bounded
    An impression is held until the watermark passes ``imp.ts + impression_retention`` (see
    :class:`~minutely.join.plan.JoinPlan`), a pCVR window until ``click.ts + W + H``. Repeats
    of an impression id after that are indistinguishable from new impressions.

State on disk
    Given a :class:`~minutely.join.store.JoinStore`, the joiner keeps in memory only what is
    bounded by the windows and the lateness: the time index of the held impressions, the
    features of at most ``hot_impressions`` of them once a checkpoint wrote them (the newest),
    the open pCVR windows, and whatever changed since the last checkpoint. Older features and
    every emitted pCVR entry (waiting up to its correction horizon) are in the store and read
    back by id when a click or conversion needs them; expiry is a range delete by time.
    :meth:`Joiner.checkpoint` writes only the changes since the previous one, with the small
    state, in one transaction; :meth:`Joiner.resume` continues from the last one.

Samples share their impression's ``features`` dict (no copy per sample or model): treat it as
read-only. One joiner serves one partition of the raw topic (partitioned by ``imp_id``); more
partitions scale out with more joiners. :meth:`Joiner.snapshot` and :meth:`Joiner.restore`
(a full copy), like :meth:`Joiner.checkpoint` and :meth:`Joiner.resume`, resume exactly after
the last processed event (undrained outputs and stats included).
"""

from __future__ import annotations

import bisect
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
from minutely.join.store import Changelog, CommitStats, JoinStore
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

    With ``store``, an empty :class:`~minutely.join.store.JoinStore` (one that never had a
    checkpoint), the joiner keeps its large state there; see *State on disk* above.
    """

    def __init__(
        self,
        models: Sequence[ModelConfig],
        cfg: JoinConfig,
        schema: Schema,
        *,
        late_capacity: int = 100_000,
        store: JoinStore | None = None,
    ) -> None:
        if late_capacity < 0:
            raise ConfigError("late_capacity", "int >= 0", late_capacity)
        self._plan = JoinPlan.build(models, cfg)
        self._schema_fp = schema.fingerprint()
        plan = self._plan
        self._lateness = plan.lateness_ms
        self._delay = plan.max_click_delay_ms
        self._skew = plan.max_clock_skew_ms
        self._retention = plan.impression_retention_ms
        self._first_due = plan.first_due_ms
        self._max_ts = _BEFORE
        self._wm = _BEFORE
        self._due = _NEVER  # the watermark must pass this before anything can be released
        self._pending_due = _NEVER  # the same for the waiting clicks/conversions
        self._seq = 0
        # Impressions held, by id (``None``: its features are only in the store); ``_incoming``
        # is a heap of the keys of those still ahead of the watermark, ``_line`` those behind it
        # in order: accepted impressions are never behind the watermark, so appending the
        # heap's minimum keeps ``_line`` sorted.
        self._imps: dict[int, Impression | None] = {}
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
        self._unclicked = 0
        self._skewed = 0
        # The store and what changed since the last checkpoint.
        if store is not None and store.generation() != 0:
            raise CheckpointError(
                f"join store {store.path}: a new joiner expected an empty store, got one at "
                f"generation {store.generation()} (resume from it instead)"
            )
        self._store = store
        self._hot_cap = plan.hot_impressions
        self._cold = 0  # held impressions whose features are only in the store
        self._cold_at = 0  # ``_line`` index where the next impression to make cold is sought
        self._evict_ts = _BEFORE  # impressions with an earlier time are evicted
        self._unsaved: list[int] = []  # impressions accepted since the last checkpoint
        self._dirty: list[set[int]] = [set() for _ in plan.conversion_models]
        self._cold_next: list[int] = [_NEVER for _ in plan.conversion_models]  # stored expiries

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
        unsaved = self._unsaved if self._store is not None else None
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
                            self._repeat(event)  # held once evictions are caught up
                        elif not 0 <= iid <= _ID_MASK:
                            raise EventError(
                                "Joiner.process: impression imp_id expected in [0, 2**64), "
                                f"got {iid}"
                            )
                        else:
                            imps[iid] = event
                            _heappush(incoming, (ts << _ID_BITS) | iid)
                            if unsaved is not None:
                                unsaved.append(iid)
                            if ts + first_due < self._due:
                                self._due = ts + first_due
                            if pending and iid in pending:
                                self._replay(event)
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
                    if isinstance(exc, CheckpointError):
                        raise  # the store failed, not the event
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
    def store(self) -> JoinStore | None:
        """Where the large state lives, if anywhere."""
        return self._store

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
            unclicked=self._unclicked,
            skewed=self._skewed,
        )

    def state_size(self) -> int:
        """Entries held: impressions, waiting clicks/conversions, pCVR windows, corrections.

        With a store, the pCVR entries there are counted too (one read of their ids).
        """
        self._catch_up()
        entries = 0
        for k, (_, vs) in enumerate(self._convs):
            if self._store is not None and self._cold_next[k] < _NEVER:
                ids = self._store.entry_ids(k, vs.expired_below)
                entries += len(ids | vs.entries.keys())
            else:
                entries += len(vs.entries)
            entries += len(vs.corrections)
        return (
            len(self._imps)
            + sum(len(v) for v in self._pending.values())
            + sum(len(cs.corrections) for _, cs in self._clicks)
            + entries
        )

    def memory_entries(self) -> int:
        """Impressions with their features and pCVR entries held in memory (the hot part)."""
        return len(self._imps) - self._cold + sum(len(vs.entries) for _, vs in self._convs)

    # --- joining ----------------------------------------------------------------------------

    def _repeat(self, imp: Impression) -> None:
        """An impression id that is held already: a repeat is counted, another one refused."""
        held = self._imps[imp.imp_id]
        if held is None:
            held = self._cold_imp(imp.imp_id)
        if held.ts_ms != imp.ts_ms or held.features != imp.features:
            what = f"ts_ms {imp.ts_ms}" if held.ts_ms != imp.ts_ms else "other features"
            raise EventError(
                f"Joiner.process: impression {imp.imp_id} expected to repeat the held one "
                f"(ts_ms {held.ts_ms}) or to be new, got {what}"
            )
        self._duplicates += 1

    def _skewed_by(self, event: Click | Conversion, imp_ts: int) -> int:
        """How far ``event`` is stamped before its impression beyond the allowed skew (0: ok)."""
        early = imp_ts - event.ts_ms
        return early if early > self._skew else 0

    def _skew_error(self, event: Click | Conversion, early: int) -> EventError:
        return EventError(
            f"Joiner.process: {type(event).__name__.lower()} for impression {event.imp_id} "
            f"expected at most {self._skew} ms before its impression (join.max_clock_skew_s), "
            f"got {early} ms before"
        )

    def _replay(self, imp: Impression) -> None:
        """Join the clicks and conversions that arrived before their impression."""
        for ev in self._pending.pop(imp.imp_id):
            if isinstance(ev, Impression):
                continue  # never waits
            early = self._skewed_by(ev, imp.ts_ms)
            if early:
                self._skewed += 1
                detail = str(self._skew_error(ev, early))
                self._reject(LateEvent(ev, "clock_skew", self._wm, detail))
            elif isinstance(ev, Click):
                self._on_click(ev)
            else:
                self._on_conversion(ev)

    def _cold_imp(self, iid: int) -> Impression:
        """A held impression whose features are only in the store."""
        store = self._store
        imp = None if store is None else store.impression(iid)
        if imp is None:
            where = "no store" if store is None else f"join store {store.path}"
            raise CheckpointError(f"{where}: impression {iid} is held but not stored")
        return imp

    def _entry(self, k: int, vs: ConversionModelState, iid: int) -> ConversionEntry | None:
        """Model ``k``'s entry for ``iid``, read back from the store (and kept) if needed."""
        entry = vs.entries.get(iid)
        if entry is None and self._cold_next[k] < _NEVER and self._store is not None:
            stored = self._store.entry(k, iid, vs.expired_below)
            if stored is not None and stored.expiry is not None:
                entry = ConversionEntry(stored.imp, stored.anchor, stored.conversion, stored.status)
                vs.entries[iid] = entry
                _heappush(vs.expiry, (stored.expiry, iid))
        return entry

    def _on_click(self, click: Click) -> None:
        if self._wm > self._due:
            self._release()  # what follows reads which samples are out and what is evicted
        iid = click.imp_id
        ts = click.ts_ms
        imps = self._imps
        if iid not in imps:
            if any(self._entry(k, vs, iid) is not None for k, (_, vs) in enumerate(self._convs)):
                self._duplicates += 1  # its impression is gone, its pCVR window is not
            else:
                self._wait_or_orphan(click)
            return
        imp = imps[iid]
        if imp is None:
            imp = self._cold_imp(iid)
        imp_ts = imp.ts_ms
        early = self._skewed_by(click, imp_ts)
        if early:
            raise self._skew_error(click, early)
        old = self._clk.get(iid)
        if old is None:
            self._clk[iid] = ts
        else:
            self._duplicates += 1
            if ts < old:
                self._clk[iid] = ts
        wm = self._wm
        for w, cs in self._clicks:
            close = imp_ts + w.window_ms
            if close < wm:  # the sample is out: only a correction can change it
                limit = close + w.horizon_ms
                if ts <= limit and (old is None or old > limit):
                    emit = ts if ts > wm else wm
                    self._push_correction(cs.corrections, iid, imp, imp_ts, emit, ts)
        if self._convs and ts - imp_ts <= self._delay:
            first = old is None or old - imp_ts > self._delay
            mark = self._store is not None
            for k, (w, vs) in enumerate(self._convs):
                if first:
                    cnv = self._cnv.get(iid, _NEVER)
                    vs.entries[iid] = ConversionEntry(imp, ts, cnv, OPEN)
                    self._push_opening(vs, ts + w.window_ms, iid, ts)
                    if mark:
                        self._dirty[k].add(iid)
                else:
                    entry = vs.entries.get(iid)  # an open window is always in memory
                    if entry is not None and entry.status == OPEN and ts < entry.anchor:
                        entry.anchor = ts
                        self._push_opening(vs, ts + w.window_ms, iid, ts)
                        if mark:
                            self._dirty[k].add(iid)

    def _on_conversion(self, conv: Conversion) -> None:
        if not self._convs:
            return
        if self._wm > self._due:
            self._release()  # what follows reads which samples are out and what is evicted
        iid = conv.imp_id
        ts = conv.ts_ms
        imps = self._imps
        held = iid in imps
        found = [self._entry(k, vs, iid) for k, (_, vs) in enumerate(self._convs)]
        if held:
            imp = imps[iid]
            imp_ts = (imp if imp is not None else self._cold_imp(iid)).ts_ms
        else:
            imp_ts = next((e.imp.ts_ms for e in found if e is not None), ts)
        early = self._skewed_by(conv, imp_ts)
        if early:
            raise self._skew_error(conv, early)
        if held:
            old = self._cnv.get(iid)
            if old is None:
                self._cnv[iid] = ts
            else:
                self._duplicates += 1
                if ts < old:
                    self._cnv[iid] = ts
        seen = False
        wm = self._wm
        mark = self._store is not None
        for k, ((w, vs), entry) in enumerate(zip(self._convs, found, strict=True)):
            if entry is None:
                continue
            if entry.conversion < _NEVER:
                seen = True
            if entry.status == WAITING and ts <= entry.anchor + w.window_ms + w.horizon_ms:
                entry.status = DONE
                emit = ts if ts > wm else wm
                self._push_correction(vs.corrections, iid, entry.imp, entry.anchor, emit, ts)
            if ts < entry.conversion:
                entry.conversion = ts
            if mark:
                self._dirty[k].add(iid)
        if not held and all(e is None for e in found):
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
        for k, (w, vs) in enumerate(self._convs):
            self._release_conversions(k, w, vs, wm)
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
            try:
                feats = imps[iid].features  # type: ignore[union-attr]
            except AttributeError:  # None: only in the store
                feats = self._cold_imp(iid).features
            c = clk.get(iid)
            if c is not None and c <= close and window:
                out.append(Sample(iid, ts, close, 1, False, c, feats))
                positives += 1
            else:
                out.append(Sample(iid, ts, close, 0, False, -1, feats))
                if c is not None and c <= close + horizon:
                    emit = c if c > close else close  # window 0: a click at or before the close
                    self._seq += 1
                    sample = Sample(iid, ts, emit, 1, True, c, feats)
                    _heappush(corrections, (emit, self._seq, sample))
        cs.cursor = cur
        while corrections and corrections[0][0] < wm:
            out.append(_heappop(corrections)[2])
            corrected += 1
        cs.emitted += len(out) - emitted
        cs.positives += positives + corrected
        cs.corrected += corrected

    def _release_conversions(
        self, k: int, w: ModelWindow, vs: ConversionModelState, wm: int
    ) -> None:
        opening = vs.opening
        entries = vs.entries
        corrections = vs.corrections
        out = vs.out
        window = w.window_ms
        horizon = w.horizon_ms
        dirty = self._dirty[k] if self._store is not None else None
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
            if cnv <= close and window:
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
            if dirty is not None:
                dirty.add(iid)
        while corrections and corrections[0][0] < wm:
            out.append(_heappop(corrections)[2])
            corrected += 1
        expiry = vs.expiry
        while expiry and expiry[0][0] < wm:
            entries.pop(_heappop(expiry)[1], None)
        if wm > vs.expired_below:
            vs.expired_below = wm  # entries in the store expiring before it are gone
            if self._cold_next[k] < wm and self._store is not None:
                nxt = self._store.min_expiry(k, wm)
                self._cold_next[k] = _NEVER if nxt is None else nxt
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
        cold = self._cold
        while head < n:
            key = line[head]
            if key >= limit:
                break
            iid = key & _ID_MASK
            if not cold:
                del imps[iid]
            elif imps.pop(iid) is None:
                cold -= 1
            if iid in cnv:
                self._unclicked_conversion(iid, key >> _ID_BITS, cnv.pop(iid))
            if iid in clk:
                del clk[iid]
            head += 1
        self._head = head
        self._cold = cold
        self._evict_ts = wm - self._retention
        if head == n or (head >= _COMPACT_AT and 2 * head >= n):
            self._compact()

    def _unclicked_conversion(self, iid: int, imp_ts: int, cnv_ts: int) -> None:
        """An evicted impression had a conversion: report it if no click opened a window."""
        c = self._clk.get(iid)
        if c is None or c - imp_ts > self._delay:
            self._unclicked += 1
            self._reject(LateEvent(Conversion(iid, cnv_ts), "no_click", self._wm))

    def _compact(self) -> None:
        head = self._head
        if head:
            del self._line[:head]
            for _, cs in self._clicks:
                cs.cursor -= head
            self._cold_at = max(0, self._cold_at - head)
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
        for k, (_, vs) in enumerate(self._convs):
            due = min(due, self._cold_next[k])
            for heap in (vs.opening, vs.expiry, vs.corrections):
                if heap:
                    due = min(due, heap[0][0])
        return due

    def _settle(self) -> None:
        """Catch up and move every impression the watermark has passed into ``_line``.

        Afterwards ``_line`` holds exactly the held keys below ``watermark << 64`` and
        ``_incoming`` the others (what a restore from a store rebuilds from the keys alone);
        the outputs do not change, since a release moves them first anyway.
        """
        self._catch_up()
        passed = self._wm << _ID_BITS
        incoming = self._incoming
        line = self._line
        while incoming and incoming[0] < passed:
            line.append(_heappop(incoming))
        self._compact()
        self._due = self._next_due()

    # --- checkpoints into the store -----------------------------------------------------------

    def checkpoint(self, caller: bytes = b"") -> CommitStats:
        """Write what changed since the last checkpoint into the store, with the small state and
        the caller's ``caller`` bytes, in one transaction; returns what it wrote.

        Afterwards emitted pCVR entries leave memory, and impressions beyond ``hot_impressions``
        (the oldest) keep only their place in the time index.
        """
        store = self._store
        if store is None:
            raise CheckpointError(
                "Joiner.checkpoint: expected a joiner with a store, got one without "
                "(use snapshot() for a full copy)"
            )
        self._settle()
        get = self._imps.get
        held = [imp for imp in map(get, dict.fromkeys(self._unsaved)) if imp is not None]
        entry_rows: list[tuple[int, int, int, int, int | None, Impression]] = []
        gone: list[tuple[int, int]] = []
        expired: list[tuple[int, int]] = []
        for k, (w, vs) in enumerate(self._convs):
            span = w.window_ms + w.horizon_ms
            for iid in sorted(self._dirty[k]):
                e = vs.entries.get(iid)
                if e is None:  # expired since it changed: its row (if any) goes
                    gone.append((k, iid))
                    continue
                expiry = None if e.status == OPEN else e.anchor + span
                entry_rows.append((k, e.anchor, e.conversion, e.status, expiry, e.imp))
            expired.append((k, vs.expired_below))
        changes = Changelog(self._evict_ts, held, expired, entry_rows, gone)
        result = store.commit(changes, ENCODER.encode(self._state(stored=True)), caller)
        self._unsaved = []
        for k, (_, vs) in enumerate(self._convs):
            self._dirty[k].clear()
            vs.entries = {iid: e for iid, e in vs.entries.items() if e.status == OPEN}
            vs.expiry = []
            nxt = store.min_expiry(k, vs.expired_below)
            self._cold_next[k] = _NEVER if nxt is None else nxt
        self._make_cold()
        self._due = self._next_due()
        return result

    def _make_cold(self) -> None:
        """Keep the features of at most ``hot_impressions`` impressions (the newest) in memory."""
        imps = self._imps
        excess = len(imps) - self._cold - self._hot_cap
        line = self._line
        i = max(self._cold_at, self._head)
        n = len(line)
        while excess > 0 and i < n:
            iid = line[i] & _ID_MASK
            if imps[iid] is not None:
                imps[iid] = None
                self._cold += 1
                excess -= 1
            i += 1
        self._cold_at = i

    @classmethod
    def resume(
        cls,
        models: Sequence[ModelConfig],
        cfg: JoinConfig,
        schema: Schema,
        store: JoinStore,
        *,
        late_capacity: int = 100_000,
    ) -> Joiner:
        """A joiner that resumes right after the last event processed before the store's last
        :meth:`checkpoint`. Raises :class:`CheckpointError` as :meth:`restore` does, and when
        the store holds no checkpoint."""
        blob = store.joiner_state()
        if blob is None:
            raise CheckpointError(f"join store {store.path}: expected a checkpoint, found none")
        joiner = cls(models, cfg, schema, late_capacity=late_capacity)
        st = joiner._decode(blob, f"join store {store.path}")
        if not st.stored:
            raise CheckpointError(
                f"join store {store.path}: expected a store's checkpoint state, got a full snapshot"
            )
        joiner._store = store
        joiner._load_stored(st, store)
        return joiner

    def _load_stored(self, st: JoinState, store: JoinStore) -> None:
        keys = [(ts << _ID_BITS) | iid for ts, iid in store.impression_keys()]
        split = bisect.bisect_left(keys, st.watermark_ms << _ID_BITS)
        self._line = keys[:split]
        self._incoming = keys[split:]  # sorted, hence a heap
        self._imps = dict.fromkeys((k & _ID_MASK for k in keys), None)
        self._cold = len(self._imps)
        for imp in store.newest_impressions(self._hot_cap):
            if imp.imp_id in self._imps:
                self._imps[imp.imp_id] = imp
                self._cold -= 1
        self._load_small(st)
        for k, (_, vs) in enumerate(self._convs):
            vs.entries = {
                e.imp.imp_id: ConversionEntry(e.imp, e.anchor, e.conversion, e.status)
                for e in store.open_entries(k)
            }
            vs.expiry = []
            nxt = store.min_expiry(k, vs.expired_below)
            self._cold_next[k] = _NEVER if nxt is None else nxt
        self._due = self._next_due()

    # --- snapshot ---------------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """The complete state (undrained outputs and stats included) as compact msgpack.

        With a store, what is there is read back into the copy (this reads the whole store).
        """
        self._catch_up()
        self._compact()  # the snapshot carries no evicted entries and cursors stay aligned
        return ENCODER.encode(self._state(stored=False))

    def _state(self, *, stored: bool) -> JoinState:
        """The state; ``stored``: without what the store holds (after :meth:`_settle`)."""
        convs: list[ConversionModelState] = []
        for k, (w, vs) in enumerate(self._convs):
            entries = {} if stored else self._all_entries(k, vs)
            span = w.window_ms + w.horizon_ms
            expiry = sorted((e.anchor + span, i) for i, e in entries.items() if e.status != OPEN)
            convs.append(
                ConversionModelState(
                    vs.name,
                    entries,
                    vs.opening,
                    expiry,
                    vs.corrections,
                    vs.out,
                    vs.emitted,
                    vs.positives,
                    vs.corrected,
                    vs.expired_below,
                )
            )
        if stored:
            impressions: list[Impression] = []
            incoming: list[tuple[int, int]] = []
            line: list[tuple[int, int]] = []
        else:
            impressions = [
                imp if imp is not None else self._cold_imp(iid) for iid, imp in self._imps.items()
            ]
            incoming = [(k >> _ID_BITS, k & _ID_MASK) for k in self._incoming]
            line = [(k >> _ID_BITS, k & _ID_MASK) for k in self._line]
        return JoinState(
            version=STATE_VERSION,
            identity=self._plan.identity(),
            schema_fingerprint=self._schema_fp,
            max_ts_ms=self._max_ts,
            watermark_ms=self._wm,
            seq=self._seq,
            impressions=impressions,
            incoming=incoming,
            line=line,
            clicks=self._clk,
            conversions=self._cnv,
            pending=self._pending,
            pending_heap=self._pending_heap,
            click_models=[cs for _, cs in self._clicks],
            conversion_models=convs,
            late=list(self._late),
            processed=self._processed,
            orphans=self._orphans,
            duplicates=self._duplicates,
            late_impressions=self._late_impressions,
            late_dropped=self._late_dropped,
            unclicked=self._unclicked,
            skewed=self._skewed,
            stored=stored,
        )

    def _all_entries(self, k: int, vs: ConversionModelState) -> dict[int, ConversionEntry]:
        """Model ``k``'s entries, those only in the store included."""
        if self._store is None or self._cold_next[k] >= _NEVER:
            return vs.entries
        out = dict(vs.entries)
        for iid in self._store.entry_ids(k, vs.expired_below):
            if iid not in out:
                stored = self._store.entry(k, iid, vs.expired_below)
                if stored is not None:
                    out[iid] = ConversionEntry(
                        stored.imp, stored.anchor, stored.conversion, stored.status
                    )
        return out

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
        st = joiner._decode(state, "join snapshot")
        if st.stored:
            raise CheckpointError(
                "join snapshot: expected a full snapshot, got a store's checkpoint state "
                "(resume it from its store)"
            )
        joiner._load(st)
        return joiner

    def _decode(self, state: bytes, where: str) -> JoinState:
        try:
            st = DECODER.decode(state)
        except msgspec.DecodeError as exc:  # ValidationError derives from DecodeError
            raise CheckpointError(f"{where}: cannot decode the state ({exc})") from exc
        if st.version != STATE_VERSION:
            raise CheckpointError(
                f"{where}: expected state version {STATE_VERSION}, got {st.version}"
            )
        mine = self._plan.identity()
        if st.identity != mine:
            missing = [x for x in mine if x not in st.identity]
            extra = [x for x in st.identity if x not in mine]
            raise CheckpointError(
                f"{where}: the joiner's models or join settings differ from the snapshot's: "
                f"configured but not in the snapshot {missing}, in the snapshot but not "
                f"configured {extra}"
            )
        if st.schema_fingerprint != self._schema_fp:
            raise CheckpointError(
                f"{where}: expected feature schema {self._schema_fp}, got {st.schema_fingerprint}"
            )
        return st

    def _load(self, st: JoinState) -> None:
        # (ts, imp_id) pairs keep heap order as keys: the key order is the pair order.
        self._incoming = [(ts << _ID_BITS) | iid for ts, iid in st.incoming]
        self._line = [(ts << _ID_BITS) | iid for ts, iid in st.line]
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
        self._load_small(st)
        self._due = self._next_due()

    def _load_small(self, st: JoinState) -> None:
        """Everything but the impressions and the pCVR entries (and their indexes)."""
        self._max_ts = st.max_ts_ms
        self._wm = st.watermark_ms
        self._seq = st.seq
        self._head = 0
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
        self._unclicked = st.unclicked
        self._skewed = st.skewed
        self._pending_due = self._pending_heap[0][0] if self._pending_heap else _NEVER
