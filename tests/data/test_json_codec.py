from __future__ import annotations

import json

import pytest

from minutely.data import Sample, samples_from_json, samples_to_json
from minutely.errors import CodecError
from minutely.schema import Schema


def test_json_round_trip_keeps_float64_dense_values(schema: Schema, samples: list[Sample]) -> None:
    s = samples[0]
    precise = Sample(
        s.sample_id,
        s.event_ts_ms,
        s.emit_ts_ms,
        s.label,
        s.is_correction,
        s.label_ts_ms,
        {**s.features, "ad_ctr_1h": 0.1},
    )
    data = samples_to_json([precise, *samples])
    back = samples_from_json(data, schema)
    assert back == [precise, *samples]
    assert back[0].features["ad_ctr_1h"] == 0.1


def test_json_is_one_array_of_plain_objects(schema: Schema, samples: list[Sample]) -> None:
    doc = json.loads(samples_to_json(samples[:2]))
    assert isinstance(doc, list)
    assert len(doc) == 2
    assert doc[0]["sample_id"] == samples[0].sample_id
    assert doc[0]["features"]["user_interests"] == samples[0].features["user_interests"]


def _doc(schema: Schema, samples: list[Sample]) -> list[dict[str, object]]:
    doc = json.loads(samples_to_json(samples[:3]))
    assert isinstance(doc, list)
    return doc


def test_json_rejects_bytes_that_are_not_json(schema: Schema) -> None:
    with pytest.raises(CodecError, match=r"sample json: bytes are not valid JSON \(.*malformed"):
        samples_from_json(b"[{]", schema)


def test_json_rejects_a_document_that_is_not_an_array(schema: Schema) -> None:
    with pytest.raises(CodecError, match=r"sample json: Expected `array`, got `object`"):
        samples_from_json(b"{}", schema)


def test_json_names_the_path_of_a_mistyped_field(schema: Schema, samples: list[Sample]) -> None:
    doc = _doc(schema, samples)
    doc[1]["emit_ts_ms"] = "soon"
    with pytest.raises(CodecError, match=r"Expected `int`, got `str` - at `\$\[1\]\.emit_ts_ms`"):
        samples_from_json(json.dumps(doc).encode(), schema)


def test_json_names_the_path_of_a_value_outside_the_feature_types(
    schema: Schema, samples: list[Sample]
) -> None:
    doc = _doc(schema, samples)
    feats = doc[0]["features"]
    assert isinstance(feats, dict)
    feats["user_interests"] = [1.5]
    with pytest.raises(CodecError, match=r"got `float` - at `\$\[0\]\.features\[\.\.\.\]\[0\]`"):
        samples_from_json(json.dumps(doc).encode(), schema)


def test_json_names_a_missing_field(schema: Schema, samples: list[Sample]) -> None:
    doc = _doc(schema, samples)
    del doc[2]["label"]
    with pytest.raises(CodecError, match=r"missing required field `label` - at `\$\[2\]`"):
        samples_from_json(json.dumps(doc).encode(), schema)


def test_json_refuses_ids_beyond_int64_at_decode(schema: Schema, samples: list[Sample]) -> None:
    doc = _doc(schema, samples)
    feats = doc[1]["features"]
    assert isinstance(feats, dict)
    feats["ad_id"] = 2**63
    with pytest.raises(CodecError, match=r"<= 9223372036854775807 - at `\$\[1\]\.features"):
        samples_from_json(json.dumps(doc).encode(), schema)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"drop": "device"}, r"missing feature 'device'$"),
        ({"add": "browser"}, r"unknown feature 'browser'$"),
        ({"ad_id": 3.0}, r"feature 'ad_id': expected an int64 id, got 3.0 \(float\)$"),
        ({"user_interests": 5}, r"feature 'user_interests': expected a list of int64 ids, got 5"),
        ({"ad_age_hours": [1]}, r"feature 'ad_age_hours': expected a finite number, got \[1\]"),
    ],
)
def test_json_names_the_sample_and_feature_that_do_not_fit(
    schema: Schema, samples: list[Sample], change: dict[str, object], message: str
) -> None:
    doc = _doc(schema, samples)
    feats = doc[1]["features"]
    assert isinstance(feats, dict)
    if "drop" in change:
        del feats[str(change["drop"])]
    elif "add" in change:
        feats[str(change["add"])] = 1
    else:
        feats.update(change)
    with pytest.raises(CodecError, match=r"^sample json: sample 1 \(sample_id 1001\): " + message):
        samples_from_json(json.dumps(doc).encode(), schema)
