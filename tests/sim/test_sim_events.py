import itertools

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minutely.config import SimConfig
from minutely.events import (
    Click,
    Conversion,
    Impression,
    decode_event,
    encode_event,
    validate_event,
)
from minutely.schema import default_schema
from minutely.sim import CLICK, CONVERSION, IMP_ID_STRIDE, IMPRESSION, EventBatch, Market

DAY = 86_400_000
CFG = SimConfig(impressions_per_day=20_000, users=5_000, delay_preset="criteo")


@pytest.fixture(scope="module")
def market() -> Market:
    return Market(CFG)


@pytest.fixture(scope="module")
def day1(market: Market) -> EventBatch:
    return market.events_between(market.day_start_ms(1), market.day_start_ms(2))


def assert_stream_order(b: EventBatch) -> None:
    order = np.lexsort((b.imp_id, b.kind, b.ts_ms))
    np.testing.assert_array_equal(order, np.arange(len(b)))


def test_batch_is_sorted_by_time_kind_and_id(day1: EventBatch) -> None:
    assert len(day1) > 20_000
    assert set(np.unique(day1.kind).tolist()) == {IMPRESSION, CLICK, CONVERSION}
    assert day1.kind.dtype == np.uint8
    assert_stream_order(day1)
    assert np.all(np.diff(day1.ts_ms) >= 0)


def test_every_event_has_its_own_timestamp_in_the_range(market: Market, day1: EventBatch) -> None:
    start, end = market.day_start_ms(1), market.day_start_ms(2)
    assert day1.ts_ms.min() >= start
    assert day1.ts_ms.max() < end
    assert day1.count(IMPRESSION) == CFG.impressions_per_day


def test_late_conversions_of_earlier_days_are_in_the_stream(
    market: Market, day1: EventBatch
) -> None:
    conv_ids = day1.imp_id[day1.kind == CONVERSION]
    assert np.any(conv_ids // IMP_ID_STRIDE == 0)  # day 0 impressions converting on day 1
    day0 = market.simulate_day(0)
    in_day1 = (day0.conv_ts_ms >= market.day_start_ms(1)) & (
        day0.conv_ts_ms < market.day_start_ms(2)
    )
    late = conv_ids[conv_ids < IMP_ID_STRIDE].tolist()
    assert sorted(day0.conv_imp_id[in_day1].tolist()) == sorted(late)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(cuts=st.lists(st.integers(0, 2 * DAY), min_size=1, max_size=4))
def test_adjacent_ranges_partition_the_stream(
    market: Market, day1: EventBatch, cuts: list[int]
) -> None:
    start = market.day_start_ms(1)
    bounds = [start, *sorted(start + c // 2 for c in cuts), start + DAY]
    parts = [market.events_between(a, b) for a, b in itertools.pairwise(bounds)]
    for p in parts:
        assert_stream_order(p)
    np.testing.assert_array_equal(np.concatenate([p.kind for p in parts]), day1.kind)
    np.testing.assert_array_equal(np.concatenate([p.imp_id for p in parts]), day1.imp_id)
    np.testing.assert_array_equal(np.concatenate([p.ts_ms for p in parts]), day1.ts_ms)
    users = np.concatenate([p.features["user_id"] for p in parts])
    np.testing.assert_array_equal(users, day1.features["user_id"])


def test_all_events_of_two_days_are_delivered_exactly_once() -> None:
    m = Market(SimConfig(impressions_per_day=5_000, users=2_000, delay_preset="fast"))
    # "fast" conversions land within 40 minutes of the impression
    b = m.events_between(m.cfg.start_ms - DAY, m.day_start_ms(2) + 3_600_000)
    days = [m.simulate_day(0), m.simulate_day(1)]
    of_days = b.imp_id // IMP_ID_STRIDE < 2
    assert np.count_nonzero(b.kind[of_days] == IMPRESSION) == sum(len(d) for d in days)
    assert np.count_nonzero(b.kind[of_days] == CLICK) == sum(int(d.clicked.sum()) for d in days)
    n_conv = sum(int(d.converted.sum()) for d in days)
    assert n_conv > 0
    assert np.count_nonzero(b.kind[of_days] == CONVERSION) == n_conv
    for k in (IMPRESSION, CLICK, CONVERSION):
        ids = b.imp_id[b.kind == k]
        assert len(np.unique(ids)) == len(ids)


def test_impressions_validate_against_the_schema(market: Market, day1: EventBatch) -> None:
    schema = default_schema()
    events = day1.events()
    assert len(events) == len(day1)
    now = market.day_start_ms(2)
    for ev in events:
        validate_event(ev, schema, now, 0, 40 * DAY)
    imps = [e for e in events if isinstance(e, Impression)]
    assert len(imps) == CFG.impressions_per_day
    f = imps[0].features
    assert list(f) == [spec.name for spec in schema.features]
    for spec in schema.features:
        value = f[spec.name]
        want = {"sparse": int, "multi_sparse": list, "dense": float}[spec.kind]
        assert type(value) is want, spec.name
    for e in imps[:1000]:
        interests = e.features["user_interests"]
        assert isinstance(interests, list)
        assert all(type(v) is int for v in interests)


def test_events_are_the_batch_columns(day1: EventBatch) -> None:
    events = day1.events()
    kinds = {Impression: IMPRESSION, Click: CLICK, Conversion: CONVERSION}
    assert [kinds[type(e)] for e in events] == day1.kind.tolist()
    assert [e.imp_id for e in events] == day1.imp_id.tolist()
    assert [e.ts_ms for e in events] == day1.ts_ms.tolist()
    imps = [e for e in events if isinstance(e, Impression)]
    for name in ("ad_age_hours", "user_activity", "ad_ctr_1h"):
        logged = np.array([e.features[name] for e in imps], dtype=np.float32)
        np.testing.assert_array_equal(logged, day1.features[name])  # float32 round trip
    values, offsets = day1.features["user_interests"]
    assert imps[7].features["user_interests"] == values[offsets[7] : offsets[8]].tolist()


def test_messages_are_encoded_events_keyed_by_impression(day1: EventBatch) -> None:
    msgs = day1.messages()
    events = day1.events()
    assert len(msgs) == len(events)
    for (key, value, ts), ev in zip(msgs, events, strict=True):
        assert key == ev.imp_id.to_bytes(8, "big")
        assert value == encode_event(ev)
        assert ts == ev.ts_ms
    assert decode_event(msgs[0][1]) == events[0]


def test_impression_ids_are_unique_across_days(market: Market) -> None:
    ids = np.concatenate([market.simulate_day(d).imp_id for d in (0, 1, 2)])
    assert len(np.unique(ids)) == len(ids)
    assert ids.min() >= 0


def test_clicks_follow_impressions_and_conversions_follow_clicks(market: Market) -> None:
    t = market.simulate_day(0)
    imp_ts = dict(zip(t.imp_id.tolist(), t.imp_ts_ms.tolist(), strict=True))
    click_ts = dict(zip(t.click_imp_id.tolist(), t.click_ts_ms.tolist(), strict=True))
    assert set(click_ts) == set(t.imp_id[t.clicked].tolist())
    assert set(t.conv_imp_id.tolist()) == set(t.imp_id[t.converted].tolist())
    assert not np.any(t.converted & ~t.clicked)
    for i, ts in click_ts.items():
        assert 1_000 <= ts - imp_ts[i] <= 30 * 60_000
    for i, ts in zip(t.conv_imp_id.tolist(), t.conv_ts_ms.tolist(), strict=True):
        assert 1_000 <= ts - click_ts[i] <= 30 * DAY
    assert_stream_order(
        EventBatch(
            t.schema, np.ones(len(t.click_imp_id), np.uint8), t.click_imp_id, t.click_ts_ms, {}
        )
    )


def test_empty_and_out_of_market_ranges(market: Market) -> None:
    start = market.cfg.start_ms
    assert len(market.events_between(start, start)) == 0
    before = market.events_between(start - DAY, start)
    assert len(before) == 0
    assert before.events() == []
    assert before.messages() == []
    assert before.features["user_interests"][1].tolist() == [0]


def test_a_reversed_range_is_refused(market: Market) -> None:
    with pytest.raises(ValueError, match=r"expected start_ms <= end_ms, got 5 > 4"):
        market.events_between(5, 4)


def test_messages_decode_to_valid_raw_events(day1: EventBatch) -> None:
    doc = msgspec.json.decode(day1.messages()[0][1])
    assert doc["type"] == "impression"
    assert set(doc) == {"type", "imp_id", "ts_ms", "features"}


def test_messages_by_reference_are_encoded_events_by_reference(day1: EventBatch) -> None:
    msgs = day1.messages(by_reference=True)
    events = day1.events(by_reference=True)
    inline = day1.messages()
    assert len(msgs) == len(events) == len(inline)
    for (key, value, ts), ev, (key0, value0, ts0) in zip(msgs, events, inline, strict=True):
        assert (key, ts) == (key0, ts0)
        assert value == encode_event(ev)
        if isinstance(ev, Impression):
            assert ev.features == {}
            assert ev.request_id == ev.imp_id
            assert ev.by_reference
        else:
            assert value == value0  # clicks and conversions do not change
    first = next(ev for ev in events if isinstance(ev, Impression))
    assert msgspec.json.decode(encode_event(first)) == {
        "type": "impression",
        "imp_id": first.imp_id,
        "ts_ms": first.ts_ms,
        "features": {},
        "request_id": first.imp_id,
    }


def test_snapshots_are_the_logged_features_of_the_impressions(day1: EventBatch) -> None:
    ids, ts, feats = day1.snapshots()
    imps = [e for e in day1.events() if isinstance(e, Impression)]
    assert ids.tolist() == [e.imp_id for e in imps]
    assert ts.tolist() == [e.ts_ms for e in imps]
    schema = default_schema()
    assert list(feats) == [spec.name for spec in schema.features]
    for spec in schema.features:
        logged = [e.features[spec.name] for e in imps]
        col = feats[spec.name]
        if spec.kind == "dense":
            assert col.dtype == np.float32  # the snapshot table's type
            np.testing.assert_array_equal(col, np.array(logged, dtype=np.float32))
        elif spec.kind == "sparse":
            assert col.tolist() == logged
        else:
            values, offsets = col
            assert [values[a:b].tolist() for a, b in itertools.pairwise(offsets)] == logged


def test_an_empty_batch_has_no_snapshots(market: Market) -> None:
    start = market.cfg.start_ms
    ids, ts, feats = market.events_between(start - DAY, start).snapshots()
    assert len(ids) == len(ts) == 0
    for spec in default_schema().features:
        if spec.kind == "multi_sparse":
            assert [part.tolist() for part in feats[spec.name]] == [[], [0]]
        else:
            assert len(feats[spec.name]) == 0
    assert market.events_between(start - DAY, start).messages(by_reference=True) == []
