"""Emit at once (``attribution_window_s = 0``): a negative as soon as the watermark passes the
sample's event time, and the action within the horizon as a positive duplicate."""

from __future__ import annotations

from minutely.config import JoinConfig, ModelConfig
from minutely.data.samples import Sample
from minutely.events import Click, Conversion, Event, Impression
from minutely.join import Joiner
from minutely.schema import default_schema

S = 1_000
CTR0 = ModelConfig(name="ctr", label="click", attribution_window_s=0, correction_horizon_s=100)
CVR0 = ModelConfig(
    name="cvr", label="conversion", attribution_window_s=0, correction_horizon_s=1_000
)


def make(*models: ModelConfig, lateness_s: int = 0) -> Joiner:
    cfg = JoinConfig(allowed_lateness_s=lateness_s, max_click_delay_s=60)
    return Joiner(models, cfg, default_schema())


def imp(iid: int, ts: int) -> Impression:
    return Impression(iid, ts, {"user_id": iid})


def brief(samples: list[Sample]) -> list[tuple[int, int, int, bool, int, int]]:
    """(sample_id, emit, label, is_correction, label_ts, event_ts) per sample."""
    return [
        (s.sample_id, s.emit_ts_ms, s.label, s.is_correction, s.label_ts_ms, s.event_ts_ms)
        for s in samples
    ]


def run(j: Joiner, events: list[Event]) -> dict[str, list[Sample]]:
    j.process_many(events)
    j.flush_all()
    return j.drain()


def test_ctr_negative_leaves_as_soon_as_the_watermark_passes_the_impression() -> None:
    j = make(CTR0)
    j.process(imp(1, 10 * S))
    j.advance_to(10 * S)  # the watermark is at the impression, not past it
    assert j.drain()["ctr"] == []
    j.advance_to(10 * S + 1)
    assert brief(j.drain()["ctr"]) == [(1, 10 * S, 0, False, -1, 10 * S)]


def test_ctr_click_at_the_same_millisecond_is_a_duplicate_not_a_positive() -> None:
    out = run(make(CTR0), [imp(1, 0), Click(1, 0)])["ctr"]
    assert brief(out) == [(1, 0, 0, False, -1, 0), (1, 0, 1, True, 0, 0)]


def test_ctr_click_within_the_horizon_is_a_positive_duplicate_at_its_time() -> None:
    j = make(CTR0)
    j.process(imp(1, 0))
    j.advance_to(1)
    assert brief(j.drain()["ctr"]) == [(1, 0, 0, False, -1, 0)]
    j.process(Click(1, 40 * S))
    j.flush_all()
    assert brief(j.drain()["ctr"]) == [(1, 40 * S, 1, True, 40 * S, 0)]
    assert j.stats.corrections == {"ctr": 1}
    assert j.stats.positives == {"ctr": 1}


def test_ctr_click_after_the_horizon_and_repeated_clicks_add_nothing() -> None:
    out = run(make(CTR0), [imp(1, 0), imp(2, 0), Click(1, 5 * S), Click(1, 6 * S)])["ctr"]
    out += run(make(CTR0), [imp(3, 0), Click(3, 101 * S)])["ctr"]
    assert brief(out) == [
        (1, 0, 0, False, -1, 0),
        (2, 0, 0, False, -1, 0),
        (1, 5 * S, 1, True, 5 * S, 0),
        (3, 0, 0, False, -1, 0),
    ]


def test_ctr_click_stamped_before_its_impression_is_a_duplicate_at_the_impression() -> None:
    # Clock skew: the click is logged first and waits for its impression (within lateness).
    out = run(make(CTR0, lateness_s=5), [Click(1, 9 * S), imp(1, 10 * S)])["ctr"]
    assert brief(out) == [(1, 10 * S, 0, False, -1, 10 * S), (1, 10 * S, 1, True, 9 * S, 10 * S)]


def test_cvr_negative_at_the_click_and_conversion_as_a_duplicate() -> None:
    events: list[Event] = [imp(1, 0), imp(2, 0), imp(3, 0), Click(1, 2 * S), Conversion(1, 2 * S)]
    events += [Click(2, 3 * S), Click(3, 4 * S), Conversion(2, 500 * S)]
    events += [Conversion(3, 1_005 * S)]  # after the horizon: nothing
    out = run(make(CVR0), events)["cvr"]
    assert brief(out) == [
        (1, 2 * S, 0, False, -1, 2 * S),
        (1, 2 * S, 1, True, 2 * S, 2 * S),
        (2, 3 * S, 0, False, -1, 3 * S),
        (3, 4 * S, 0, False, -1, 4 * S),
        (2, 500 * S, 1, True, 500 * S, 3 * S),
    ]


def test_cvr_conversion_after_the_emission_is_corrected_once() -> None:
    j = make(CVR0)
    j.process_many([imp(1, 0), Click(1, 2 * S)])
    j.advance_to(2 * S + 1)
    assert brief(j.drain()["cvr"]) == [(1, 2 * S, 0, False, -1, 2 * S)]
    j.process_many([Conversion(1, 50 * S), Conversion(1, 60 * S)])
    j.flush_all()
    assert brief(j.drain()["cvr"]) == [(1, 50 * S, 1, True, 50 * S, 2 * S)]
    assert j.stats.duplicates == 1


def test_both_kinds_emit_at_once_side_by_side_with_a_windowed_model() -> None:
    ctr10 = ModelConfig(name="ctr10", label="click", attribution_window_s=10)
    out = run(make(CTR0, ctr10, CVR0), [imp(1, 0), Click(1, 3 * S), Conversion(1, 3 * S)])
    assert brief(out["ctr"]) == [(1, 0, 0, False, -1, 0), (1, 3 * S, 1, True, 3 * S, 0)]
    assert brief(out["ctr10"]) == [(1, 10 * S, 1, False, 3 * S, 0)]
    assert brief(out["cvr"]) == [(1, 3 * S, 0, False, -1, 3 * S), (1, 3 * S, 1, True, 3 * S, 3 * S)]
