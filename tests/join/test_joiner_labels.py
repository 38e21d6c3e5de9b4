"""Scenario tests of the joiner's labels, corrections, late data and state bounds."""

from __future__ import annotations

import doctest

import pytest

import minutely.join.joiner
import minutely.join.plan
from minutely.config import JoinConfig, ModelConfig
from minutely.data.samples import Sample
from minutely.errors import ConfigError, EventError
from minutely.events import Click, Conversion, Event, Impression
from minutely.join import Joiner, LateEvent
from minutely.schema import default_schema

S = 1_000
CTR = ModelConfig(name="ctr", label="click", attribution_window_s=10, correction_horizon_s=100)
CVR = ModelConfig(
    name="cvr", label="conversion", attribution_window_s=50, correction_horizon_s=1_000
)


def make(
    *models: ModelConfig, lateness_s: int = 0, max_click_delay_s: int = 60, **kw: int
) -> Joiner:
    cfg = JoinConfig(allowed_lateness_s=lateness_s, max_click_delay_s=max_click_delay_s)
    return Joiner(models or (CTR,), cfg, default_schema(), **kw)


def imp(iid: int, ts: int) -> Impression:
    return Impression(iid, ts, {"user_id": iid})


def run(j: Joiner, events: list[Event]) -> dict[str, list[Sample]]:
    j.process_many(events)
    j.flush_all()
    return j.drain()


def brief(samples: list[Sample]) -> list[tuple[int, int, int, bool, int, int]]:
    return [
        (s.sample_id, s.emit_ts_ms, s.label, s.is_correction, s.label_ts_ms, s.event_ts_ms)
        for s in samples
    ]


def test_docstring_examples_run() -> None:
    for module in (minutely.join.joiner, minutely.join.plan):
        result = doctest.testmod(module)
        assert result.attempted > 0
        assert result.failed == 0


# --- pCTR ---------------------------------------------------------------------------------


def test_ctr_positive_and_negative_emit_at_window_close() -> None:
    out = run(make(), [imp(1, 0), imp(2, 1 * S), Click(1, 4 * S)])["ctr"]
    assert brief(out) == [(1, 10 * S, 1, False, 4 * S, 0), (2, 11 * S, 0, False, -1, 1 * S)]
    assert out[0].features == {"user_id": 1}


def test_ctr_click_on_the_window_close_counts() -> None:
    out = run(make(), [imp(1, 0), Click(1, 10 * S)])["ctr"]
    assert brief(out) == [(1, 10 * S, 1, False, 10 * S, 0)]


def test_ctr_sample_waits_for_the_watermark_to_pass_the_close() -> None:
    j = make()
    j.process(imp(1, 0))
    j.advance_to(10 * S)  # watermark == close: a click at the close may still come
    assert j.drain()["ctr"] == []
    j.process(Click(1, 10 * S))  # on time: the watermark has not passed it
    j.advance_to(10 * S + 1)
    assert brief(j.drain()["ctr"]) == [(1, 10 * S, 1, False, 10 * S, 0)]
    j.flush_all()
    assert j.drain()["ctr"] == []
    assert j.stats.corrections == {"ctr": 0}


def test_ctr_late_click_within_horizon_is_a_correction_at_its_time() -> None:
    j = make()
    j.process_many([imp(1, 0), imp(2, 0), Click(2, 50 * S)])
    first = j.drain()["ctr"]
    assert brief(first) == [(1, 10 * S, 0, False, -1, 0), (2, 10 * S, 0, False, -1, 0)]
    assert j.drain()["ctr"] == []  # the correction waits for the watermark to pass 50 s
    j.advance_to(50 * S + 1)
    (fix,) = j.drain()["ctr"]
    assert brief([fix]) == [(2, 50 * S, 1, True, 50 * S, 0)]
    assert fix.features == first[1].features
    assert j.stats.corrections == {"ctr": 1}
    assert j.stats.positives == {"ctr": 1}
    assert j.stats.emitted == {"ctr": 3}


def test_ctr_click_after_the_horizon_changes_nothing() -> None:
    out = run(make(), [imp(1, 0), Click(1, 110 * S + 1)])["ctr"]
    assert brief(out) == [(1, 10 * S, 0, False, -1, 0)]


def test_ctr_click_within_lateness_is_a_positive_not_a_correction() -> None:
    j = make(lateness_s=5)
    # the click at 9 s arrives after an event at 14 s, still within the 5 s lateness
    out = run(j, [imp(1, 0), imp(2, 14 * S), Click(1, 9 * S)])["ctr"]
    assert brief(out)[0] == (1, 10 * S, 1, False, 9 * S, 0)
    assert j.stats.corrections == {"ctr": 0}


def test_ctr_click_later_than_lateness_is_a_correction_at_the_watermark() -> None:
    j = make(lateness_s=5)
    j.process_many([imp(1, 0), imp(2, 30 * S)])  # watermark 25 s: sample 1 is out, negative
    j.process(Click(1, 9 * S))  # its true time is inside the window
    j.advance_to(31 * S)
    out = j.drain()["ctr"]
    assert brief(out) == [(1, 10 * S, 0, False, -1, 0), (1, 25 * S, 1, True, 9 * S, 0)]


def test_ctr_click_seen_before_the_close_but_after_the_window_is_a_correction() -> None:
    j = make(lateness_s=30)
    out = run(j, [imp(1, 0), Click(1, 15 * S)])["ctr"]
    assert brief(out) == [(1, 10 * S, 0, False, -1, 0), (1, 15 * S, 1, True, 15 * S, 0)]


def test_ctr_duplicate_clicks_count_once_first_by_time() -> None:
    j = make(lateness_s=5)
    out = run(j, [imp(1, 0), Click(1, 8 * S), Click(1, 3 * S), Click(1, 8 * S)])["ctr"]
    assert brief(out) == [(1, 10 * S, 1, False, 3 * S, 0)]
    assert j.stats.duplicates == 2


def test_ctr_only_the_first_late_click_corrects() -> None:
    j = make()
    out = run(j, [imp(1, 0), Click(1, 40 * S), Click(1, 30 * S), Click(1, 60 * S)])["ctr"]
    assert brief(out) == [(1, 10 * S, 0, False, -1, 0), (1, 40 * S, 1, True, 40 * S, 0)]
    assert j.stats.duplicates == 2


def test_click_before_its_impression_within_lateness_joins() -> None:
    j = make(lateness_s=5)
    j.process_many([imp(9, 0), Click(1, 4 * S), imp(1, 3 * S)])
    assert j.state_size() == 2
    out = run(j, [])["ctr"]
    assert brief(out)[1] == (1, 13 * S, 1, False, 4 * S, 3 * S)
    assert j.stats.orphans == 0


def test_duplicate_impression_is_counted_and_ignored() -> None:
    j = make()
    out = run(j, [imp(1, 0), imp(1, 0)])["ctr"]
    assert len(out) == 1
    assert j.stats.duplicates == 1


# --- pCVR ---------------------------------------------------------------------------------


def test_cvr_one_sample_per_clicked_impression() -> None:
    j = make(CTR, CVR)
    events: list[Event] = [imp(1, 0), imp(2, 0), imp(3, 0), Click(1, 2 * S), Click(2, 5 * S)]
    events += [Conversion(1, 40 * S), Conversion(2, 60 * S)]
    out = run(j, events)
    assert brief(out["cvr"]) == [
        (1, 52 * S, 1, False, 40 * S, 2 * S),
        (2, 55 * S, 0, False, -1, 5 * S),
        (2, 60 * S, 1, True, 60 * S, 5 * S),  # after the window, within the horizon
    ]
    assert [s.sample_id for s in out["ctr"]] == [1, 2, 3]
    assert list(out) == ["ctr", "cvr"]


def test_cvr_conversion_within_horizon_corrects_after_impression_eviction() -> None:
    j = make(CTR, CVR, max_click_delay_s=60)
    j.process_many([imp(1, 0), Click(1, 2 * S)])
    j.advance_to(500 * S)  # impression retention is max(60 s, 110 s): it is gone
    assert j.drain()["cvr"][0].label == 0
    j.process(Conversion(1, 600 * S))
    j.advance_to(600 * S + 1)
    (fix,) = j.drain()["cvr"]
    assert brief([fix]) == [(1, 600 * S, 1, True, 600 * S, 2 * S)]
    assert fix.features == {"user_id": 1}
    assert j.stats.orphans == 0


def test_cvr_conversion_before_click_is_kept_for_the_window() -> None:
    j = make(CVR, lateness_s=5)
    out = run(j, [imp(1, 0), Conversion(1, 3 * S), Click(1, 2 * S)])["cvr"]
    assert brief(out) == [(1, 52 * S, 1, False, 3 * S, 2 * S)]


def test_cvr_click_after_max_click_delay_opens_no_window() -> None:
    j = make(CTR, CVR, max_click_delay_s=20)
    out = run(j, [imp(1, 0), Click(1, 21 * S), Conversion(1, 25 * S)])
    assert out["cvr"] == []
    assert brief(out["ctr"]) == [(1, 10 * S, 0, False, -1, 0), (1, 21 * S, 1, True, 21 * S, 0)]


def test_cvr_earlier_duplicate_click_moves_the_open_window() -> None:
    j = make(CVR, lateness_s=10)
    out = run(j, [imp(1, 0), Click(1, 8 * S), Click(1, 2 * S), Conversion(1, 55 * S)])["cvr"]
    # anchored at the first click by time: window [2 s, 52 s]; 55 s is a correction
    assert brief(out) == [(1, 52 * S, 0, False, -1, 2 * S), (1, 55 * S, 1, True, 55 * S, 2 * S)]


def test_cvr_late_click_is_emitted_at_the_watermark() -> None:
    j = make(CVR, lateness_s=0, max_click_delay_s=600)
    j.process_many([imp(1, 0), imp(2, 100 * S)])
    j.process(Click(1, 2 * S))  # window [2 s, 52 s] closed long ago in event time
    j.process(Conversion(1, 60 * S))  # after the window: a correction, not before the sample
    j.advance_to(100 * S + 1)
    assert brief(j.drain()["cvr"]) == [
        (1, 100 * S, 0, False, -1, 2 * S),
        (1, 100 * S, 1, True, 60 * S, 2 * S),
    ]


def test_cvr_window_opens_on_an_earlier_duplicate_that_qualifies() -> None:
    j = make(CVR, lateness_s=30, max_click_delay_s=20)
    out = run(j, [imp(1, 0), Click(1, 25 * S), Click(1, 15 * S)])["cvr"]
    assert brief(out) == [(1, 65 * S, 0, False, -1, 15 * S)]


def test_cvr_conversion_later_than_lateness_is_a_correction_at_the_watermark() -> None:
    j = make(CVR)
    j.process_many([imp(1, 0), Click(1, 2 * S), imp(2, 53 * S)])  # the window [2 s, 52 s] is out
    j.process(Conversion(1, 40 * S))
    out = run(j, [])["cvr"]
    assert brief(out) == [(1, 52 * S, 0, False, -1, 2 * S), (1, 53 * S, 1, True, 40 * S, 2 * S)]


def test_cvr_duplicate_conversions_count_once() -> None:
    j = make(CVR)
    out = run(j, [imp(1, 0), Click(1, 1 * S), Conversion(1, 9 * S), Conversion(1, 7 * S)])
    assert brief(out["cvr"]) == [(1, 51 * S, 1, False, 7 * S, 1 * S)]
    assert j.stats.duplicates == 1


def test_conversions_are_ignored_without_a_conversion_model() -> None:
    j = make(CTR)
    run(j, [Conversion(5, 0)])
    assert j.stats.orphans == 0
    assert j.stats.processed == 1


# --- late data, orphans, bounds -------------------------------------------------------------


def test_orphan_click_waits_then_is_reported() -> None:
    j = make(lateness_s=5)
    j.process(Click(7, 10 * S))
    assert j.drain_late() == []
    assert j.state_size() == 1
    j.advance_to(15 * S + 1)  # watermark 10.001 s: its impression can no longer come
    assert j.drain_late() == [LateEvent(Click(7, 10 * S), "no_impression", 10 * S + 1)]
    assert j.stats.orphans == 1
    assert j.state_size() == 0


def test_a_waiting_click_is_not_expired_by_an_older_wait_of_the_same_impression() -> None:
    # conversion model only, no click delay: an impression is held only until its own time
    j = make(CVR, lateness_s=200, max_click_delay_s=0)
    j.process_many([Click(7, 100 * S), imp(7, 1 * S)])  # waits, then joins (too late for pCVR)
    j.advance_to(205 * S)  # watermark 5 s: the impression is gone
    j.process(Click(7, 150 * S))  # waits in turn
    j.advance_to(301 * S)  # watermark 101 s: past the first wait, not the second
    assert j.stats.orphans == 0
    j.advance_to(350 * S + 1)
    assert [e.event for e in j.drain_late()] == [Click(7, 150 * S)]


def test_orphans_are_reported_as_soon_as_the_watermark_passes_them() -> None:
    j = make()
    j.process_many([Click(7, 10 * S), imp(1, 20 * S)])  # the event moves the watermark past 10 s
    assert j.stats.orphans == 1
    j.process(imp(2, 5 * S))
    late = j.drain_late()
    assert [(e.event.imp_id, e.reason, e.watermark_ms) for e in late] == [
        (7, "no_impression", 20 * S),
        (2, "late_impression", 20 * S),
    ]


def test_click_behind_the_watermark_without_impression_is_an_orphan_at_once() -> None:
    j = make(CTR, CVR)
    j.process_many([imp(1, 100 * S), Click(2, 50 * S), Conversion(3, 60 * S)])
    late = j.drain_late()
    assert [(e.event.imp_id, e.reason) for e in late] == [(2, "no_impression")] * 1 + [
        (3, "no_impression")
    ]
    assert j.stats.orphans == 2


def test_click_for_an_evicted_impression_is_an_orphan() -> None:
    j = make()
    j.process(imp(1, 0))
    j.advance_to(111 * S)  # past 0 + W + H
    assert j.state_size() == 0
    j.process(Click(1, 100 * S))
    assert j.stats.orphans == 1
    assert j.drain_late()[0].event == Click(1, 100 * S)


def test_impression_is_held_until_the_watermark_passes_its_retention() -> None:
    j = make()
    j.process(imp(0, 0))
    j.advance_to(110 * S)  # watermark == 0 + W + H: still held
    j.process(Click(0, 100 * S))
    assert j.stats.orphans == 0
    j.advance_to(110 * S + 1)
    assert j.state_size() == 0
    assert brief(j.drain()["ctr"])[1] == (0, 110 * S, 1, True, 100 * S, 0)


def test_impression_id_seen_again_after_eviction_is_a_new_impression() -> None:
    j = make()
    j.process(imp(1, 0))
    j.advance_to(50 * S)
    j.process_many([imp(3, 112 * S), imp(1, 112 * S)])  # the first is past its retention
    out = run(j, [])["ctr"]
    assert [(s.sample_id, s.event_ts_ms) for s in out] == [(1, 0), (1, 112 * S), (3, 112 * S)]
    assert j.stats.duplicates == 0


def test_late_impression_is_rejected_and_reported() -> None:
    j = make(lateness_s=5)
    out = run(j, [imp(1, 100 * S), imp(2, 94 * S), Click(2, 96 * S)])
    assert [s.sample_id for s in out["ctr"]] == [1]
    late = j.drain_late()
    assert [(e.event, e.reason, e.watermark_ms) for e in late] == [
        (imp(2, 94 * S), "late_impression", 95 * S),
        (Click(2, 96 * S), "no_impression", 1 << 62),
    ]
    assert j.stats.late_impressions == 1


def test_late_buffer_is_bounded_and_counts_drops() -> None:
    j = make(late_capacity=2)
    j.process(imp(1, 100 * S))
    j.process_many([Click(i, i) for i in range(10, 15)])
    late = j.drain_late()
    assert [e.event.imp_id for e in late] == [13, 14]
    assert j.stats.late_dropped == 3
    assert j.stats.orphans == 5


def test_late_capacity_zero_keeps_nothing() -> None:
    j = make(late_capacity=0)
    j.process_many([imp(1, 100 * S), Click(2, 0)])
    assert j.drain_late() == []
    assert j.stats.late_dropped == 1


def test_negative_late_capacity_is_refused() -> None:
    with pytest.raises(ConfigError, match="'late_capacity': expected int >= 0, got -1"):
        make(late_capacity=-1)


def test_state_returns_to_zero_after_a_long_idle_advance() -> None:
    j = make(CTR, CVR, lateness_s=5)
    events: list[Event] = []
    for i in range(200):
        events.append(imp(i, i * 300))
        if i % 3 == 0:
            events.append(Click(i, i * 300 + 2 * S))
        if i % 9 == 0:
            events.append(Conversion(i, i * 300 + 30 * S))
    events.append(Click(10_000, 60 * S))  # an orphan waiting for its impression
    j.process_many(sorted(events, key=lambda e: e.ts_ms))
    assert j.state_size() > 0
    j.advance_to(200 * 300 + 60 * S + 50 * S + 1_000 * S + 5 * S + 1)
    assert j.state_size() == 0
    out = j.drain()
    assert len(out["ctr"]) == 200
    assert len(out["cvr"]) == 67


def test_outputs_leave_in_emit_time_order_across_drains() -> None:
    j = make(lateness_s=3)
    seen: list[int] = []
    for i in range(100):
        j.process(imp(i, i * S))
        if i % 4 == 0:
            j.process(Click(i - 3, i * S - 500))  # some become corrections, some positives
        seen += [s.emit_ts_ms for s in j.drain()["ctr"]]
    j.flush_all()
    seen += [s.emit_ts_ms for s in j.drain()["ctr"]]
    assert seen == sorted(seen)
    assert len(seen) == 100 + j.stats.corrections["ctr"]


def test_watermark_never_decreases() -> None:
    j = make(lateness_s=5)
    assert j.watermark_ms < 0
    j.process(imp(1, 100 * S))
    assert j.watermark_ms == 95 * S
    j.process(imp(2, 97 * S))
    j.advance_to(50 * S)
    assert j.watermark_ms == 95 * S
    j.advance_to(200 * S)
    assert j.watermark_ms == 195 * S


def test_flush_all_empties_state_and_later_events_are_late() -> None:
    j = make(CTR, CVR)
    j.process_many([imp(1, 0), Click(1, 1 * S)])
    j.flush_all()
    assert j.state_size() == 0
    j.process_many([imp(2, 5 * S), Conversion(1, 2 * S)])
    assert [e.reason for e in j.drain_late()] == ["late_impression", "no_impression"]


def test_process_refuses_an_impression_id_out_of_range() -> None:
    j = make()
    with pytest.raises(EventError, match=r"imp_id expected in \[0, 2\*\*64\), got -3"):
        j.process(imp(-3, 0))
    assert j.stats.processed == 0


def test_process_refuses_a_non_event() -> None:
    j = make()
    with pytest.raises(EventError, match=r"expected an Impression, Click or Conversion, got str"):
        j.process("click")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("models", "cfg", "match"),
    [
        ((), JoinConfig(), r"'models': expected at least one model"),
        ((CTR, CTR), JoinConfig(), r"'models': expected unique model names"),
        (
            (ModelConfig(name="x", label="view"),),  # type: ignore[arg-type]
            JoinConfig(),
            r"'models.x.label': expected one of \['click', 'conversion'\], got 'view'",
        ),
        (
            (ModelConfig(name="x", attribution_window_s=-1),),
            JoinConfig(),
            r"'models.x.attribution_window_s': expected int >= 0, got -1",
        ),
        (
            (ModelConfig(name="x", correction_horizon_s=-1),),
            JoinConfig(),
            r"'models.x.correction_horizon_s': expected int >= 0, got -1",
        ),
        ((CTR,), JoinConfig(allowed_lateness_s=-1), r"'join.allowed_lateness_s': expected"),
        ((CTR,), JoinConfig(max_click_delay_s=-1), r"'join.max_click_delay_s': expected"),
    ],
)
def test_bad_configuration_fails_fast(
    models: tuple[ModelConfig, ...], cfg: JoinConfig, match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        Joiner(models, cfg, default_schema())


def test_retention_follows_models() -> None:
    assert make(CTR).plan.impression_retention_ms == 110 * S
    assert make(CVR, max_click_delay_s=60).plan.impression_retention_ms == 60 * S
    assert make(CTR, CVR, max_click_delay_s=600).plan.impression_retention_ms == 600 * S
