from typing import Any

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minutely.config import IngestConfig, load_config
from minutely.data import Sample, samples_to_record_batch
from minutely.errors import ConfigError, EventError, SchemaError
from minutely.events import (
    F32_OVERFLOW,
    FUTURE_EVENT,
    INVALID_EVENT,
    INVALID_IMPRESSION,
    INVALID_SNAPSHOT,
    MISSING_SNAPSHOT,
    OVERSIZE_EVENT,
    REASONS,
    STALE_EVENT,
    UNDECODABLE_EVENT,
    Click,
    Conversion,
    Event,
    EventValidator,
    Impression,
    decode_event,
    encode_event,
    validate_event,
)
from minutely.schema import default_schema
from minutely.stream.dead_letters import reason_group

SCHEMA = default_schema()

NOW = 10_000_000


def features() -> dict[str, int | float | list[int]]:
    return {
        "user_id": 1,
        "ad_id": 2,
        "campaign_id": 3,
        "advertiser_id": 4,
        "category": 5,
        "slot": 0,
        "device": 1,
        "hour_of_day": 13,
        "user_interests": [5, 7],
        "ad_age_hours": 1.5,
        "user_activity": 3,
        "ad_ctr_1h": 0.02,
    }


def test_round_trip_all_kinds() -> None:
    for ev in (Impression(1, NOW, features()), Click(1, NOW), Conversion(1, NOW)):
        assert decode_event(encode_event(ev)) == ev


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"type":"click","imp_id":1}', "missing required field `ts_ms`"),
        (b'{"type":"click","imp_id":"1","ts_ms":2}', r"Expected `int`, got `str` - at `\$.imp_id`"),
        (b'{"type":"view","imp_id":1,"ts_ms":2}', "Invalid value 'view'"),
        (b'{"type":"click","imp_id":1,"ts_ms":2,"x":1}', "unknown field `x`"),
        (b"\xff\x00", "undecodable event"),
        (b'{"type":"click","imp_id":9223372036854775808,"ts_ms":2}', r"\$\.imp_id"),
        (b'{"type":"click","imp_id":-1,"ts_ms":2}', r"Expected `int` >= 0 - at `\$\.imp_id`"),
        (
            b'{"type":"impression","imp_id":1,"ts_ms":2,"features":{"a":[' + b"9" * 30 + b"]}}",
            r"at `\$\.features\[\.\.\.\]\[0\]`",
        ),
        (
            b'{"type":"impression","imp_id":1,"ts_ms":2,"features":{"a":' + b"9" * 400 + b"}}",
            r"at `\$\.features\[\.\.\.\]`",
        ),
    ],
)
def test_decode_errors(raw: bytes, message: str) -> None:
    with pytest.raises(EventError, match=message):
        decode_event(raw)


def validator(**bounds: int) -> EventValidator:
    return EventValidator(
        default_schema(), **{"max_future_ms": 1000, "max_past_ms": 1000, **bounds}
    )


def impression_json(imp_id: int = 1, **changes: object) -> bytes:
    doc = {"type": "impression", "imp_id": imp_id, "ts_ms": NOW, "features": features()}
    doc["features"] = {**features(), **changes}
    return msgspec.json.encode(doc)


def test_valid_events_pass_and_decode() -> None:
    v = validator()
    for ev in (Impression(1, NOW, features()), Click(1, NOW + 1000), Conversion(1, NOW - 1000)):
        assert v.parse(encode_event(ev), NOW) == ev
    validate_event(Impression(1, NOW, features()), default_schema(), NOW, 1000, 1000)


@pytest.mark.parametrize(
    ("event", "message"),
    [
        (
            Click(1, NOW + 5_000),
            r"^future event: ts_ms 10005000 is 5000 ms in the future \(at most 1000 ms "
            r"allowed\) \(imp_id 1\)$",
        ),
        (
            Click(1, NOW - 5_000),
            r"^stale event: ts_ms 9995000 is 5000 ms in the past \(at most 1000 ms allowed\)",
        ),
        (Click(-1, NOW), r"^invalid event: imp_id expected in \[0, 2\*\*63\) .*got imp_id -1"),
        (Conversion(2**63, NOW), r"^invalid event: .*got imp_id 9223372036854775808"),
        (Click(1, -1), r"^invalid event: .*ts_ms >= 0, got imp_id 1 and ts_ms -1$"),
        (
            Impression(7, NOW, {k: v for k, v in features().items() if k != "ad_id"}),
            r"^invalid impression: missing features \['ad_id'\] \(imp_id 7\)$",
        ),
        (
            Impression(7, NOW, {**features(), "extra": 1}),
            r"^invalid impression: unknown features \['extra'\] \(imp_id 7\)$",
        ),
        (
            Impression(7, NOW, {**{k: 1 for k in "abcdefg"}, **features()}),
            r"unknown features \['a', 'b', 'c', 'd', 'e'\] and 2 more \(imp_id 7\)$",
        ),
        (
            Impression(7, NOW, {**features(), "ad_id": 2.5}),
            r"^invalid impression: feature 'ad_id' expected an int64 id, got 2\.5 \(imp_id 7\)$",
        ),
        (
            Impression(7, NOW, {**features(), "ad_id": 2**63}),
            r"feature 'ad_id' expected an int64 id, got 9223372036854775808 \(imp_id 7\)$",
        ),
        (
            Impression(7, NOW, {**features(), "ad_id": "x" * 100}),
            r"feature 'ad_id' expected an int64 id, got 'x{56}\.\.\. \(imp_id 7\)$",
        ),
        (
            Impression(7, NOW, {**features(), "user_interests": 3}),
            r"feature 'user_interests' expected a list of int64 ids, got 3 \(imp_id 7\)$",
        ),
        (
            Impression(7, NOW, {**features(), "user_interests": [1, 2.5]}),
            r"'user_interests' expected a list of int64 ids, got 2\.5 at position 1 \(imp_id 7\)$",
        ),
        (
            Impression(7, NOW, {**features(), "user_interests": [1, -(2**63) - 1]}),
            r"got -9223372036854775809 at position 1 \(imp_id 7\)$",
        ),
        (
            Impression(7, NOW, {**features(), "user_interests": list(range(1025))}),
            r"^invalid impression: feature 'user_interests' expected at most 1024 ids, got 1025",
        ),
        (
            Impression(7, NOW, {**features(), "ad_ctr_1h": float("nan")}),
            r"^invalid impression: feature 'ad_ctr_1h' expected a finite float32, got nan",
        ),
        (
            Impression(7, NOW, {**features(), "ad_ctr_1h": float("-inf")}),
            r"feature 'ad_ctr_1h' expected a finite float32, got -inf \(imp_id 7\)$",
        ),
        (
            Impression(7, NOW, {**features(), "ad_ctr_1h": 1e39}),
            r"feature 'ad_ctr_1h' expected a finite float32, got 1e\+39 \(imp_id 7\)$",
        ),
        (
            Impression(7, NOW, {**features(), "ad_ctr_1h": True}),
            r"feature 'ad_ctr_1h' expected a finite float32, got True \(imp_id 7\)$",
        ),
        (
            Impression(7, NOW, {**features(), "user_activity": 2**63}),
            r"feature 'user_activity' expected a finite float32, got 9223372036854775808",
        ),
    ],
)
def test_validation_errors_name_group_and_details(event: Event, message: str) -> None:
    with pytest.raises(EventError, match=message):
        validator().check(event, NOW)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"x" * 101, r"^oversize event: expected at most 100 bytes, got 101$"),
        (b"\xff" * 100, r"^undecodable event: JSON is malformed"),
        (b'{"type":"cl\xffick","imp_id":1,"ts_ms":2}', r"^undecodable event: 'utf-8' codec"),
        (b'{"type":"click","imp_id":1,"ts_ms":NaN}', r"^undecodable event: JSON is malformed"),
        (b'{"type":"click","imp_id":1,"ts_ms":1e400}', r"^invalid event: Number out of range"),
        (b'{"type":"view","imp_id":1,"ts_ms":2}', r"^invalid event: Invalid value 'view'"),
    ],
)
def test_parse_refuses_bad_messages_before_or_at_decoding(raw: bytes, message: str) -> None:
    with pytest.raises(EventError, match=message):
        validator(max_event_bytes=100).parse(raw, NOW)


def test_parse_checks_the_decoded_features() -> None:
    v = validator(max_ids_per_feature=2)
    with pytest.raises(EventError, match=r"^invalid impression: feature 'ad_ctr_1h' .*1e\+39"):
        v.parse(impression_json(ad_ctr_1h=1e39), NOW)
    with pytest.raises(EventError, match=r"'user_interests' expected at most 2 ids, got 3"):
        v.parse(impression_json(user_interests=[1, 2, 3]), NOW)
    assert v.parse(impression_json(user_interests=[1, 2]), NOW).imp_id == 1


def test_float32_bounds_are_the_sample_codec_bounds() -> None:
    top = float(np.finfo(np.float32).max)
    past = float(np.nextafter(F32_OVERFLOW, 0.0))  # rounds down to float32's largest value
    schema = default_schema()
    for value in (top, -top, past, -past, 1e-45, 0.0):
        feats = {**features(), "ad_ctr_1h": value}
        validator().check(Impression(1, NOW, feats), NOW)
        samples_to_record_batch([Sample(1, NOW, NOW, 0, False, -1, feats)], schema)
    for value in (F32_OVERFLOW, -F32_OVERFLOW, 1e39):
        feats = {**features(), "ad_ctr_1h": value}
        with pytest.raises(EventError, match="expected a finite float32"):
            validator().check(Impression(1, NOW, feats), NOW)
        with pytest.raises(SchemaError, match="within float32 range"):
            samples_to_record_batch([Sample(1, NOW, NOW, 0, False, -1, feats)], schema)


_VALUES = st.one_of(
    st.integers(min_value=-(2**64), max_value=2**64),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.lists(st.integers(min_value=-(2**64), max_value=2**64), max_size=3),
    st.lists(st.floats(), max_size=2),
    st.text(max_size=3),
)


@settings(max_examples=300, deadline=None)
@given(changes=st.dictionaries(st.sampled_from([*features(), "x"]), _VALUES, max_size=3))
def test_every_accepted_impression_encodes_as_a_sample(changes: dict[str, object]) -> None:
    feats = {**features(), **changes}
    event = Impression(1, NOW, feats)  # type: ignore[arg-type]
    try:
        validator().check(event, NOW)
    except EventError:
        with pytest.raises(SchemaError):  # the codec refuses what the ingest check refuses
            samples_to_record_batch([Sample(1, NOW, NOW, 0, False, -1, event.features)], SCHEMA)
        return
    samples_to_record_batch([Sample(1, NOW, NOW, 0, False, -1, event.features)], SCHEMA)


@pytest.mark.parametrize(
    ("bounds", "message"),
    [
        ({"max_future_ms": -1}, r"config field 'max_future_ms': expected int >= 0, got -1"),
        ({"max_past_ms": 1.5}, r"config field 'max_past_ms': expected int >= 0, got 1\.5"),
        ({"max_ids_per_feature": 0}, r"'max_ids_per_feature': expected int >= 1, got 0"),
        ({"max_event_bytes": True}, r"'max_event_bytes': expected int >= 1, got True"),
    ],
)
def test_bad_bounds_are_refused(bounds: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validator(**bounds)


def test_from_config_takes_the_ingest_bounds() -> None:
    ingest = IngestConfig(max_future_s=2, max_past_s=3, max_event_bytes=400, max_ids_per_feature=2)
    v = EventValidator.from_config(default_schema(), ingest)
    v.check(Click(1, NOW + 2_000), NOW)
    v.check(Click(1, NOW - 3_000), NOW)
    with pytest.raises(EventError, match=r"^future event"):
        v.check(Click(1, NOW + 2_001), NOW)
    with pytest.raises(EventError, match=r"^stale event"):
        v.check(Click(1, NOW - 3_001), NOW)
    with pytest.raises(EventError, match=r"^oversize event: expected at most 400 bytes"):
        v.parse(impression_json(user_interests=list(range(200))), NOW)
    with pytest.raises(EventError, match="expected at most 2 ids"):
        v.parse(impression_json(user_interests=[1, 2, 3]), NOW)


def test_every_refusal_starts_with_a_documented_group() -> None:
    assert len(set(REASONS)) == len(REASONS)
    assert all(":" not in group for group in REASONS)
    later = NOW + 10**10
    cases = [
        (b"x" * 70_000, NOW),
        (b"{", NOW),
        (b"[]", NOW),
        (impression_json(ad_ctr_1h=1e39), NOW),
        (encode_event(Click(1, NOW + 10**6)), NOW),
        (encode_event(Click(1, NOW)), later),
    ]
    v = EventValidator.from_config(default_schema(), IngestConfig())
    groups = []
    for raw, now in cases:
        with pytest.raises(EventError) as info:
            v.parse(raw, now)
        groups.append(reason_group(str(info.value)))
    assert groups == [
        OVERSIZE_EVENT,
        UNDECODABLE_EVENT,
        INVALID_EVENT,
        INVALID_IMPRESSION,
        FUTURE_EVENT,
        STALE_EVENT,
    ]
    assert set(groups) <= set(REASONS)


@pytest.mark.parametrize("field", ["max_event_bytes", "max_ids_per_feature"])
def test_the_ingest_bounds_are_config_fields(field: str) -> None:
    assert getattr(load_config(None, {"ingest": {field: 7}}).ingest, field) == 7
    with pytest.raises(ConfigError, match=rf"'ingest\.{field}': expected int >= 1, got 0"):
        load_config(None, {"ingest": {field: 0}})


_JSON_VALUES = st.one_of(
    st.integers(min_value=-(2**64), max_value=2**64),
    st.floats(width=64),
    st.sampled_from([F32_OVERFLOW, -F32_OVERFLOW, 3.4e38, -3.4e38, 2.0**63, -(2.0**63)]),
    st.booleans(),
    st.none(),
    st.text(max_size=2),
    st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=4),
    st.lists(st.one_of(st.floats(allow_nan=False), st.booleans()), max_size=2),
)


@settings(max_examples=400, deadline=None)
@given(
    changes=st.dictionaries(st.sampled_from([*features(), "x"]), _JSON_VALUES, max_size=4),
    dropped=st.sets(st.sampled_from(list(features())), max_size=2),
)
def test_parse_refuses_what_check_refuses_with_the_same_reason(
    changes: dict[str, object], dropped: set[str]
) -> None:
    feats = {k: v for k, v in {**features(), **changes}.items() if k not in dropped}
    raw = msgspec.json.encode({"type": "impression", "imp_id": 1, "ts_ms": NOW, "features": feats})
    v = validator(max_ids_per_feature=3)
    try:
        event = decode_event(raw)
    except EventError:
        return  # refused at decoding, by parse as by decode_event
    assert isinstance(event, Impression)
    # The shortcut of decoded features agrees with the full check, both ways.
    assert v._fits_decoded(event.features) == (v._first_bad(event.features) is None)
    expected: str | None = None
    try:
        v.check(event, NOW)
    except EventError as exc:
        expected = str(exc)
    if expected is None:
        assert v.parse(raw, NOW) == event
    else:
        with pytest.raises(EventError) as info:
            v.parse(raw, NOW)
        assert str(info.value) == expected


# --- impressions by reference -------------------------------------------------------------------


def test_an_impression_by_reference_round_trips() -> None:
    ref = Impression(7, NOW, {}, request_id=70)
    wire = encode_event(ref)
    assert wire == (
        b'{"type":"impression","imp_id":7,"ts_ms":10000000,"features":{},"request_id":70}'
    )
    assert decode_event(wire) == ref
    assert ref.by_reference
    both = Impression(7, NOW, features(), request_id=70)  # inline features and a request id
    assert decode_event(encode_event(both)) == both
    assert not both.by_reference
    assert not Impression(7, NOW, {}).by_reference


def test_an_impression_without_request_id_keeps_its_wire_format() -> None:
    imp = Impression(7, NOW, {"ad_id": 2, "ad_ctr_1h": 0.5})
    assert imp.request_id is None
    assert encode_event(imp) == (
        b'{"type":"impression","imp_id":7,"ts_ms":10000000,"features":{"ad_id":2,"ad_ctr_1h":0.5}}'
    )
    assert decode_event(b'{"type":"impression","imp_id":7,"ts_ms":1,"features":{}}') == (
        Impression(7, 1, {})
    )


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            b'{"type":"impression","imp_id":1,"ts_ms":2,"features":{},"request_id":-1}',
            r"^invalid event: Expected `int` >= 0 - at `\$\.request_id`$",
        ),
        (
            b'{"type":"impression","imp_id":1,"ts_ms":2,"features":{},"request_id":"5"}',
            r"^invalid event: Expected `int \| null`, got `str` - at `\$\.request_id`$",
        ),
        (
            b'{"type":"click","imp_id":1,"ts_ms":2,"request_id":5}',
            r"^invalid event: Object contains unknown field `request_id`",
        ),
    ],
)
def test_bad_request_ids_are_refused_at_decoding(raw: bytes, message: str) -> None:
    with pytest.raises(EventError, match=message):
        decode_event(raw)
    with pytest.raises(EventError, match=message):
        validator().parse(raw, 2)


def test_the_validator_accepts_an_impression_by_reference() -> None:
    v = validator()
    ref = Impression(7, NOW, {}, 70)
    assert v.parse(encode_event(ref), NOW) == ref
    v.check(ref, NOW)
    # Its time is checked as any event's.
    with pytest.raises(EventError, match=r"^future event: ts_ms 10005000 is 5000 ms in the future"):
        v.parse(encode_event(Impression(7, NOW + 5_000, {}, 70)), NOW)
    with pytest.raises(EventError, match=r"^stale event: ts_ms 9995000 is 5000 ms in the past"):
        v.check(Impression(7, NOW - 5_000, {}, 70), NOW)


def test_empty_features_without_a_request_id_are_refused_as_before() -> None:
    names = r"\['user_id', 'ad_id', 'campaign_id', 'advertiser_id', 'category'\] and 7 more"
    message = rf"^invalid impression: missing features {names} \(imp_id 7\)$"
    with pytest.raises(EventError, match=message):
        validator().check(Impression(7, NOW, {}), NOW)
    with pytest.raises(EventError, match=message):
        validator().parse(encode_event(Impression(7, NOW, {})), NOW)


def test_inline_features_with_a_request_id_are_checked() -> None:
    bad = Impression(7, NOW, {**features(), "ad_id": 2.5}, 70)
    message = r"^invalid impression: feature 'ad_id' expected an int64 id, got 2\.5 \(imp_id 7\)$"
    with pytest.raises(EventError, match=message):
        validator().check(bad, NOW)
    with pytest.raises(EventError, match=message):
        validator().parse(encode_event(bad), NOW)
    good = Impression(7, NOW, features(), 70)
    assert validator().parse(encode_event(good), NOW) == good


def test_a_request_id_beyond_int64_is_refused_when_built_in_python() -> None:
    with pytest.raises(
        EventError,
        match=r"^invalid event: request_id expected in \[0, 2\*\*63\), got -1 \(imp_id 7\)$",
    ):
        validator().check(Impression(7, NOW, {}, -1), NOW)
    with pytest.raises(EventError, match=r"got 9223372036854775808 \(imp_id 7\)$"):
        validator().check(Impression(7, NOW, {}, 2**63), NOW)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"ad_id": 2.5},
        {"user_interests": [1, 2, 3]},
        {"user_interests": [1, "x"]},
        {"ad_ctr_1h": float("nan")},
        {"extra": 1},
        {"ad_id": None},
    ],
)
def test_check_features_applies_the_inline_rules(changes: dict[str, object]) -> None:
    v = validator(max_ids_per_feature=2)
    feats = {k: val for k, val in {**features(), **changes}.items() if val is not None}
    inline: str | None = None
    try:
        v.check(Impression(7, NOW, feats), NOW)  # type: ignore[arg-type]
    except EventError as exc:
        inline = str(exc)
    if inline is None:
        v.check_features(feats, 7)  # type: ignore[arg-type]
        assert not changes
        return
    assert reason_group(inline) == INVALID_IMPRESSION
    with pytest.raises(EventError) as info:
        v.check_features(feats, 7)  # type: ignore[arg-type]
    assert str(info.value) == inline


def test_the_snapshot_groups_are_reasons() -> None:
    assert {INVALID_SNAPSHOT, MISSING_SNAPSHOT} <= set(REASONS)
    assert (INVALID_SNAPSHOT, MISSING_SNAPSHOT) == ("invalid snapshot", "missing snapshot")
