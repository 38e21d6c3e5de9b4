"""The joiner's answers to inconsistent input: conversions without a click, clicks and
conversions stamped too far before their impression, impression ids reused for other content."""

from __future__ import annotations

import pytest

from minutely.config import JoinConfig, ModelConfig
from minutely.errors import EventError
from minutely.events import Click, Conversion, Impression
from minutely.join import Joiner, LateEvent
from minutely.schema import default_schema

S = 1_000
CTR = ModelConfig(name="ctr", label="click", attribution_window_s=10, correction_horizon_s=100)
CVR = ModelConfig(
    name="cvr", label="conversion", attribution_window_s=50, correction_horizon_s=1_000
)


def make(lateness_s: int = 0) -> Joiner:
    cfg = JoinConfig(allowed_lateness_s=lateness_s, max_click_delay_s=60, max_clock_skew_s=5)
    return Joiner([CTR, CVR], cfg, default_schema())


def imp(iid: int, ts: int, user: int = 0) -> Impression:
    return Impression(iid, ts, {"user_id": user or iid})


def test_the_conversion_of_an_impression_never_clicked_is_late_once_it_is_evicted() -> None:
    j = make()
    j.process_many([imp(1, 0), imp(2, 1 * S), Conversion(1, 5 * S), Conversion(1, 5 * S)])
    j.process(Click(2, 6 * S))  # a click that opens a window: its conversion is not reported
    j.process(Conversion(2, 7 * S))
    j.advance_to(111 * S)  # past the impressions' retention (window + horizon of ctr)
    assert j.drain_late() == [LateEvent(Conversion(1, 5 * S), "no_click", 111 * S)]
    assert j.stats.unclicked == 1
    j.process(imp(3, 200 * S))  # the join goes on
    j.flush_all()
    assert [s.sample_id for s in j.drain()["ctr"]] == [1, 2, 3]


def test_a_click_too_early_for_its_held_impression_fails_alone() -> None:
    j = make()
    j.process(imp(1, 10 * S))
    with pytest.raises(
        EventError,
        match=r"click for impression 1 expected at most 5000 ms before its impression "
        r"\(join\.max_clock_skew_s\), got 6000 ms before",
    ):
        j.process(Click(1, 4 * S))
    with pytest.raises(EventError, match=r"conversion for impression 1 expected at most 5000 ms"):
        j.process(Conversion(1, 4 * S))
    j.process(Click(1, 5 * S))  # within the skew: joins
    j.flush_all()
    assert [(s.sample_id, s.label) for s in j.drain()["ctr"]] == [(1, 1)]
    assert j.stats.processed == 2


def test_a_waiting_click_too_early_for_its_impression_is_returned_as_skewed() -> None:
    j = make(lateness_s=30)
    j.process_many([Click(1, 10 * S), Conversion(1, 10_500), imp(1, 16 * S)])
    late = j.drain_late()
    assert [(e.event, e.reason) for e in late] == [
        (Click(1, 10 * S), "clock_skew"),
        (Conversion(1, 10_500), "clock_skew"),
    ]
    assert late[0].detail == (
        "Joiner.process: click for impression 1 expected at most 5000 ms before its impression "
        "(join.max_clock_skew_s), got 6000 ms before"
    )
    assert j.stats.skewed == 2
    j.flush_all()
    assert [(s.sample_id, s.label) for s in j.drain()["ctr"]] == [(1, 0)]


def test_an_impression_id_reused_for_other_features_fails_alone() -> None:
    j = make()
    j.process_many([imp(1, 0), imp(1, 0)])  # a repeat: counted
    assert j.stats.duplicates == 1
    with pytest.raises(
        EventError,
        match=r"impression 1 expected to repeat the held one \(ts_ms 0\) or to be new, got "
        r"other features",
    ):
        j.process(imp(1, 0, user=99))
    j.flush_all()
    out = j.drain()["ctr"]
    assert [(s.sample_id, s.features) for s in out] == [(1, {"user_id": 1})]
