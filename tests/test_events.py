import pytest

from minutely.errors import EventError
from minutely.events import (
    Click,
    Conversion,
    Impression,
    decode_event,
    encode_event,
    validate_event,
)
from minutely.schema import default_schema

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


def test_valid_impression_passes() -> None:
    validate_event(Impression(1, NOW, features()), default_schema(), NOW, 1000, 1000)


@pytest.mark.parametrize(
    ("event", "message"),
    [
        (Click(1, NOW + 5_000), "5000 ms in the future"),
        (Click(1, NOW - 5_000), "5000 ms in the past"),
        (Click(-1, NOW), "imp_id must be >= 0"),
        (
            Impression(1, NOW, {k: v for k, v in features().items() if k != "ad_id"}),
            "missing feature 'ad_id'",
        ),
        (Impression(1, NOW, {**features(), "ad_id": 2.5}), "'ad_id' expected an int id"),
        (Impression(1, NOW, {**features(), "user_interests": 3}), "expected a list of int ids"),
        (Impression(1, NOW, {**features(), "ad_ctr_1h": float("nan")}), "a finite number"),
        (Impression(1, NOW, {**features(), "extra": 1}), r"unknown features \['extra'\]"),
    ],
)
def test_validation_errors(event: Impression | Click, message: str) -> None:
    with pytest.raises(EventError, match=message):
        validate_event(event, default_schema(), NOW, 1000, 1000)
