"""The caller's clock caps the watermark: an event stamped ahead of it cannot make others late;
a run of events, each with its own clock, joins as the events one by one."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minutely.config import JoinConfig, ModelConfig
from minutely.errors import EventError
from minutely.events import Click, Conversion, Event, Impression
from minutely.join import Joiner
from minutely.schema import default_schema

CTR = ModelConfig(name="ctr", attribution_window_s=600, correction_horizon_s=3_600)
CVR = ModelConfig(name="cvr", label="conversion", attribution_window_s=600)
LATENESS_S = 30
CFG = JoinConfig(allowed_lateness_s=LATENESS_S, max_click_delay_s=3_600)
NOW = 10_000_000


def make() -> Joiner:
    return Joiner([CTR, CVR], CFG, default_schema())


def imp(iid: int, ts: int) -> Impression:
    return Impression(iid, ts, {"user_id": iid})


def test_a_click_stamped_ahead_of_the_clock_does_not_make_an_impression_late() -> None:
    j = make()
    j.process(Click(1, NOW + 290_000), now_ms=NOW)
    assert j.watermark_ms == NOW - LATENESS_S * 1000
    j.process(imp(2, NOW - 10_000), now_ms=NOW)
    j.advance_to(NOW + 700_000)
    # Only the click of impression 1 (never logged) is left over; impression 2 joined.
    assert [(late.event.imp_id, late.reason) for late in j.drain_late()] == [(1, "no_impression")]
    assert [(s.sample_id, s.label) for s in j.drain()["ctr"]] == [(2, 0)]


def test_without_a_clock_the_same_click_makes_the_impression_late() -> None:
    j = make()
    j.process(Click(1, NOW + 290_000))
    assert j.watermark_ms == NOW + 260_000
    j.process(imp(2, NOW - 10_000))
    assert [(late.event.imp_id, late.reason) for late in j.drain_late()] == [(2, "late_impression")]


def test_the_cap_never_moves_the_watermark_back_and_follows_the_clock() -> None:
    j = make()
    late = LATENESS_S * 1000
    j.process(imp(1, NOW + 50_000), now_ms=NOW)
    assert j.watermark_ms == NOW - late
    j.process(imp(2, NOW + 10_000), now_ms=NOW - 60_000)  # an earlier clock: no step back
    assert j.watermark_ms == NOW - late
    j.process(Click(1, NOW + 55_000), now_ms=NOW + 40_000)
    assert j.watermark_ms == NOW + 40_000 - late
    j.process_many([Click(2, NOW + 30_000), imp(3, NOW + 45_000)], now_ms=NOW + 100_000)
    assert j.watermark_ms == NOW + 45_000 - late  # the newest time, now below the clock
    assert j.drain_late() == []


def test_a_restored_joiner_keeps_the_capped_watermark() -> None:
    j = make()
    j.process(Click(1, NOW + 290_000), now_ms=NOW)
    again = Joiner.restore([CTR, CVR], CFG, default_schema(), j.snapshot())
    assert again.watermark_ms == NOW - LATENESS_S * 1000
    again.process(imp(2, NOW - 10_000), now_ms=NOW)
    assert again.drain_late() == []


@st.composite
def streams(draw: st.DrawFn) -> list[tuple[int, Event]]:
    """(clock, event) pairs: a non-decreasing clock, events stamped up to 300 s either side."""
    steps: list[tuple[int, Event]] = []
    now = 400_000
    for iid in range(draw(st.integers(1, 30))):
        now += draw(st.integers(0, 20_000))
        ts = now + draw(st.integers(-300_000, 300_000))
        kind = draw(st.sampled_from([Impression, Click, Conversion]))
        ev: Event = imp(iid % 7, ts) if kind is Impression else kind(iid % 7, ts)
        steps.append((now, ev))
    return steps


@settings(max_examples=200, deadline=None)
@given(streams())
def test_watermark_is_the_newest_time_capped_at_the_clock(steps: list[tuple[int, Event]]) -> None:
    j = make()
    lateness = LATENESS_S * 1000
    newest = -(1 << 62)
    for now, ev in steps:
        on_time = ev.ts_ms >= now - lateness
        failed: list[Exception] = []
        j.process_clocked([(ev, now)], lambda _, exc, failed=failed: failed.append(exc))
        if not failed:  # a refused event (clock skew, a conflicting repeat) moves nothing
            newest = max(newest, min(ev.ts_ms, now))
        assert j.watermark_ms == newest - lateness
        if isinstance(ev, Impression) and on_time:
            # Stamped within the lateness of the clock: never late, whatever came before.
            assert all(late.event is not ev for late in j.drain_late())


@settings(max_examples=100, deadline=None)
@given(streams())
def test_a_clocked_run_joins_as_the_events_one_by_one(steps: list[tuple[int, Event]]) -> None:
    one_by_one = make()
    alone: list[str] = []
    for now, ev in steps:
        one_by_one.process_clocked([(ev, now)], lambda _, exc: alone.append(str(exc)))
    run = make()
    together: list[str] = []
    run.process_clocked([(ev, now) for now, ev in steps], lambda _, exc: together.append(str(exc)))
    assert together == alone
    assert run.watermark_ms == one_by_one.watermark_ms
    one_by_one.flush_all()
    run.flush_all()
    assert run.drain() == one_by_one.drain()
    assert run.drain_late() == one_by_one.drain_late()
    assert run.stats == one_by_one.stats


def test_a_failing_event_in_a_run_costs_that_event_only() -> None:
    bad = Impression(2**64, NOW, {})  # beyond the joiner's id space
    events = [(imp(1, NOW), NOW), (bad, NOW), (imp(3, NOW + 1_000), NOW + 1_000)]
    failures: list[tuple[int, str]] = []
    j = make()
    j.process_clocked(events, lambda i, exc: failures.append((i, str(exc))))
    assert failures == [
        (1, f"Joiner.process: impression imp_id expected in [0, 2**64), got {2**64}")
    ]
    assert j.stats.processed == 2
    j.flush_all()
    assert [s.sample_id for s in j.drain()["ctr"]] == [1, 3]


def test_without_on_error_a_failing_event_raises_after_the_events_before_it() -> None:
    j = make()
    with pytest.raises(EventError, match=r"imp_id expected in \[0, 2\*\*64\), got -1"):
        j.process_clocked([(imp(1, NOW), NOW), (Impression(-1, NOW, {}), NOW), (imp(3, NOW), NOW)])
    assert j.stats.processed == 1
    j.flush_all()
    assert [s.sample_id for s in j.drain()["ctr"]] == [1]
