import pytest

from minutely.errors import SchemaError
from minutely.schema import FeatureSpec, Schema, default_schema


def test_default_schema_kinds_and_round_trip() -> None:
    s = default_schema()
    assert [f.name for f in s.sparse][-1] == "user_interests"
    assert [f.name for f in s.dense] == ["ad_age_hours", "user_activity", "ad_ctr_1h"]
    assert Schema.from_dict(s.to_dict()) == s
    assert Schema.from_dict(s.to_dict()).fingerprint() == s.fingerprint()


def test_fingerprint_changes_with_schema() -> None:
    a = Schema((FeatureSpec("a", "sparse"),))
    b = Schema((FeatureSpec("a", "sparse", hour_level=True),))
    assert a.fingerprint() != b.fingerprint()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: FeatureSpec("not a name", "sparse"), "expected an identifier"),
        (lambda: FeatureSpec("x", "text"), "expected kind in"),  # type: ignore[arg-type]
        (lambda: Schema((FeatureSpec("x", "dense"), FeatureSpec("x", "dense"))), "duplicates"),
        (lambda: Schema(()), "expected at least one feature"),
        (lambda: Schema.from_dict({"features": 3}), "malformed schema document"),
        (lambda: Schema.from_dict({"features": [{"kind": "dense"}]}), "malformed schema"),
        (lambda: default_schema().get("nope"), "no feature named 'nope'"),
    ],
)
def test_schema_errors(make: object, message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        make()  # type: ignore[operator]
