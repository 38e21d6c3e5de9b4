"""Property tests: the joiner against a plain reference labeler, and snapshot/restore resumption.

Streams are small and random: impressions with clicks and conversions at random delays,
delivery out of order within the allowed lateness and sometimes later than it, duplicates,
orphans, idle clock ticks. Clicks and conversions never precede their impression in event
time (the reference relies on it, as the joiner documents).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minutely.config import JoinConfig, ModelConfig
from minutely.data.samples import Sample
from minutely.events import Click, Conversion, Event, Impression
from minutely.join import Joiner
from minutely.schema import default_schema

NEVER = 1 << 62
BEFORE = -(1 << 62)


@dataclass(frozen=True)
class Tick:
    now_ms: int


Step = Event | Tick
Label = Literal["click", "conversion"]


@dataclass(frozen=True)
class Case:
    models: tuple[ModelConfig, ...]
    cfg: JoinConfig
    steps: tuple[Step, ...]


@st.composite
def cases(draw: st.DrawFn) -> Case:
    lateness_s = draw(st.integers(0, 3))
    delay_s = draw(st.integers(0, 12))
    labels: tuple[Label, ...] = draw(
        st.sampled_from(
            [("click",), ("conversion",), ("click", "conversion"), ("click", "click", "conversion")]
        )
    )
    models = [
        ModelConfig(
            name=f"m{i}",
            label=label,
            attribution_window_s=draw(st.integers(0, 6)),  # 0: emit at once
            correction_horizon_s=draw(st.integers(0, 12)),
        )
        for i, label in enumerate(labels)
    ]
    span = 8_000 + 1_000 * max(m.attribution_window_s + m.correction_horizon_s for m in models)
    late_ms = lateness_s * 1_000
    arrivals: list[tuple[int, int, Step]] = []

    def deliver(ev: Step, ts: int) -> None:
        if draw(st.integers(0, 5)) == 0:
            lag = draw(st.integers(late_ms, late_ms + 10_000))  # later than the lateness
        else:
            lag = draw(st.integers(0, late_ms))
        arrivals.append((ts + lag, len(arrivals), ev))

    w_max = 1_000 * max(m.attribution_window_s for m in models)
    t = 0
    n_imps = draw(st.integers(0, 10))
    for iid in range(n_imps):
        t += draw(st.integers(0, 3_000))
        im = Impression(iid, t, {"user_id": iid})
        deliver(im, t)
        if draw(st.integers(0, 9)) == 0:
            deliver(im, t)  # re-delivered impression
        for _ in range(draw(st.integers(0, 2))):
            cts = t + draw(st.integers(0, w_max) | st.integers(w_max, span))
            deliver(Click(iid, cts), cts)
            if draw(st.booleans()):  # a duplicate, logged a little earlier or later
                dts = max(t, cts + draw(st.integers(-3_000, 3_000)))
                deliver(Click(iid, dts), dts)
            for _ in range(draw(st.integers(0, 2))):
                vts = cts + draw(st.integers(0, w_max) | st.integers(w_max, span))
                deliver(Conversion(iid, vts), vts)
    for k in range(draw(st.integers(0, 2))):  # orphans
        ots = draw(st.integers(0, t + span))
        ev: Event = Click(1_000 + k, ots) if k % 2 == 0 else Conversion(1_000 + k, ots)
        deliver(ev, ots)
    for _ in range(draw(st.integers(0, 5))):  # idle clock ticks
        now = draw(st.integers(0, t + 2 * span))
        arrivals.append((now, len(arrivals), Tick(now)))
    arrivals.sort(key=lambda a: (a[0], a[1]))
    return Case(
        tuple(models),
        JoinConfig(allowed_lateness_s=lateness_s, max_click_delay_s=delay_s),
        tuple(step for _, _, step in arrivals),
    )


def feed(j: Joiner, steps: tuple[Step, ...] | list[Step]) -> None:
    for step in steps:
        if isinstance(step, Tick):
            j.advance_to(step.now_ms)
        else:
            j.process(step)


def collect(j: Joiner, into: dict[str, list[Sample]]) -> None:
    for name, samples in j.drain().items():
        into.setdefault(name, []).extend(samples)


# --- the reference ------------------------------------------------------------------------


def reference(case: Case) -> dict[str, list[Sample]]:
    """Label every model's samples from the whole stream at once, by the documented rules.

    Step ``i``'s event is joined at the watermark ``before[i]``; then the watermark becomes
    ``after[i]`` and everything it has passed is emitted. A final step flushes.
    """
    lateness = case.cfg.allowed_lateness_s * 1_000
    delay = case.cfg.max_click_delay_s * 1_000
    steps = case.steps
    before: list[int] = []
    after: list[int] = []
    wm, top = BEFORE, BEFORE
    for step in steps:
        before.append(wm)
        if isinstance(step, Tick):
            wm = max(wm, step.now_ms - lateness)
        else:
            top = max(top, step.ts_ms)
            wm = max(wm, top - lateness)
        after.append(wm)
    before.append(wm)
    after.append(NEVER)  # the flush
    end = len(steps)

    def passes(t: int, start: int) -> int:
        """The first step from ``start`` whose watermark passes ``t``."""
        return next(k for k in range(start, end + 1) if after[k] > t)

    clicks_w = [m for m in case.models if m.label == "click"]
    convs_w = [m for m in case.models if m.label == "conversion"]
    retention = max(
        [1_000 * (m.attribution_window_s + m.correction_horizon_s) for m in clicks_w]
        + ([delay] if convs_w else [])
    )
    out: dict[str, list[Sample]] = {m.name: [] for m in case.models}

    accepted: dict[int, tuple[int, Impression]] = {}
    for i, step in enumerate(steps):
        if isinstance(step, Impression) and step.ts_ms >= before[i]:
            accepted.setdefault(step.imp_id, (i, step))

    for iid, (a, im) in accepted.items():
        evicted = passes(im.ts_ms + retention, a)

        def joined(
            kind: type[Click] | type[Conversion], upto: int, iid: int = iid, a: int = a
        ) -> list[tuple[int, int]]:
            """(effective step, ts) of this impression's clicks or conversions, joined order."""
            got = []
            for j, step in enumerate(steps):
                if not isinstance(step, (Click, Conversion)) or type(step) is not kind:
                    continue
                if step.imp_id != iid:
                    continue
                if j < a:
                    if step.ts_ms >= before[j]:  # waited for its impression
                        got.append((a, j, step.ts_ms))
                elif j <= upto:
                    got.append((j, j, step.ts_ms))
            return [(e, ts) for e, _, ts in sorted(got)]

        clicks = joined(Click, evicted)
        feats = im.features
        for m in clicks_w:
            w, h = 1_000 * m.attribution_window_s, 1_000 * m.correction_horizon_s
            close = im.ts_ms + w
            k = passes(close, a)
            first = min((ts for e, ts in clicks if e <= k), default=NEVER)
            if first <= close and w > 0:  # window 0: nothing counts in the first emission
                out[m.name].append(Sample(iid, im.ts_ms, close, 1, False, first, feats))
                continue
            out[m.name].append(Sample(iid, im.ts_ms, close, 0, False, -1, feats))
            if first <= close + h:
                emit = max(first, close)
                out[m.name].append(Sample(iid, im.ts_ms, emit, 1, True, first, feats))
                continue
            for e, ts in clicks:
                if e > k and ts <= close + h:
                    emit = max(ts, before[e])
                    out[m.name].append(Sample(iid, im.ts_ms, emit, 1, True, ts, feats))
                    break

        qualifying = [(e, ts) for e, ts in clicks if ts - im.ts_ms <= delay]
        if not qualifying:
            continue
        for m in convs_w:
            w, h = 1_000 * m.attribution_window_s, 1_000 * m.correction_horizon_s
            e0, anchor = qualifying[0]
            key = max(anchor + w, before[e0])
            kb = passes(key, e0)
            for e, ts in qualifying[1:]:
                if e <= kb and ts < anchor:
                    anchor = ts
                    key = max(ts + w, before[e])
                    kb = passes(key, e)
            close = anchor + w
            gone = max(kb, passes(close + h, 0))
            convs = joined(Conversion, max(evicted, gone))
            convs = [(e, ts) for e, ts in convs if e <= gone]
            first = min((ts for e, ts in convs if e <= kb), default=NEVER)
            if first <= close and w > 0:
                out[m.name].append(Sample(iid, anchor, key, 1, False, first, feats))
                continue
            out[m.name].append(Sample(iid, anchor, key, 0, False, -1, feats))
            if first <= close + h:
                emit = max(first, key)
                out[m.name].append(Sample(iid, anchor, emit, 1, True, first, feats))
                continue
            for e, ts in convs:
                if e > kb and ts <= close + h:
                    emit = max(ts, before[e])
                    out[m.name].append(Sample(iid, anchor, emit, 1, True, ts, feats))
                    break
    return out


def canonical(samples: list[Sample]) -> list[tuple[object, ...]]:
    return sorted(
        (s.emit_ts_ms, s.sample_id, s.is_correction, s.label, s.label_ts_ms, s.event_ts_ms)
        for s in samples
    )


# --- properties ---------------------------------------------------------------------------

PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(cases())
def test_labels_match_the_reference(case: Case) -> None:
    j = Joiner(case.models, case.cfg, default_schema())
    got: dict[str, list[Sample]] = {}
    for step in case.steps:
        feed(j, [step])
        collect(j, got)
    j.flush_all()
    collect(j, got)
    want = reference(case)
    for m in case.models:
        assert canonical(got[m.name]) == canonical(want[m.name]), m
        emits = [s.emit_ts_ms for s in got[m.name]]
        assert emits == sorted(emits)
        for s in got[m.name]:
            assert s.features == {"user_id": s.sample_id}
        stats = j.stats
        assert stats.emitted[m.name] == len(got[m.name])
        assert stats.positives[m.name] == sum(s.label for s in got[m.name])
        assert stats.corrections[m.name] == sum(s.is_correction for s in got[m.name])
    assert j.state_size() == 0
    assert stats.processed == sum(not isinstance(s, Tick) for s in case.steps)


@PROPS
@given(cases(), st.data())
def test_snapshot_resumes_exactly_after_the_last_event(case: Case, data: st.DataObject) -> None:
    n = len(case.steps)
    cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=3), label="cuts"))
    drains = set(data.draw(st.lists(st.integers(0, n), max_size=4), label="drains"))

    def run(restarts: list[int]) -> tuple[dict[str, list[Sample]], list[object], object]:
        j = Joiner(case.models, case.cfg, default_schema())
        got: dict[str, list[Sample]] = {}
        late: list[object] = []
        for i, step in enumerate(case.steps):
            for _ in range(restarts.count(i)):
                size = j.state_size()
                j = Joiner.restore(case.models, case.cfg, default_schema(), j.snapshot())
                assert j.state_size() == size
            if i in drains:
                collect(j, got)
                late += j.drain_late()
            feed(j, [step])
        j.flush_all()
        collect(j, got)
        late += j.drain_late()
        return got, late, j.stats

    assert run(cuts) == run([])


@settings(max_examples=100, deadline=None)
@given(cases())
def test_state_is_empty_after_a_long_idle_advance(case: Case) -> None:
    j = Joiner(case.models, case.cfg, default_schema())
    feed(j, case.steps)
    horizon = j.plan.impression_retention_ms + max(
        w.window_ms + w.horizon_ms for w in j.plan.click_models + j.plan.conversion_models
    )
    top = max((s.ts_ms for s in case.steps if not isinstance(s, Tick)), default=0)
    j.advance_to(top + 2 * horizon + j.plan.lateness_ms + 1)
    assert j.state_size() == 0
