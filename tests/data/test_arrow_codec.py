from __future__ import annotations

import struct

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minutely.data import (
    Sample,
    arrow_schema,
    decode_batch,
    encode_batch,
    record_batch_to_samples,
    samples_from_json,
    samples_to_json,
    samples_to_record_batch,
)
from minutely.data import arrow as arrow_module
from minutely.data.arrow import FINGERPRINT_KEY
from minutely.errors import CodecError, SchemaError
from minutely.schema import FeatureSpec, Schema


def _features(schema: Schema, **overrides: object) -> dict[str, object]:
    feats: dict[str, object] = {
        f.name: ([1, 2] if f.kind == "multi_sparse" else 1.5 if f.kind == "dense" else 7)
        for f in schema.features
    }
    feats.update(overrides)
    return feats


def _sample(schema: Schema, **fields: object) -> Sample:
    base: dict[str, object] = {
        "sample_id": 1,
        "event_ts_ms": 1_000,
        "emit_ts_ms": 2_000,
        "label": 0,
        "is_correction": False,
        "label_ts_ms": -1,
        "features": _features(schema),
    }
    base.update(fields)
    return Sample(**base)  # type: ignore[arg-type]


def _ipc(*batches: pa.RecordBatch, schema: pa.Schema | None = None) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema if schema is not None else batches[0].schema) as writer:
        for rb in batches:
            writer.write_batch(rb)
    return bytes(sink.getvalue().to_pybytes())


# -- layout ---------------------------------------------------------------------------------


def test_arrow_schema_has_fixed_columns_then_features_with_fingerprint(schema: Schema) -> None:
    pa_schema = arrow_schema(schema)
    assert pa_schema.names == [
        "sample_id",
        "event_ts_ms",
        "emit_ts_ms",
        "label",
        "is_correction",
        "label_ts_ms",
        *[f.name for f in schema.features],
    ]
    assert pa_schema.field("label").type == pa.int8()
    assert pa_schema.field("is_correction").type == pa.bool_()
    assert pa_schema.field("user_id").type == pa.int64()
    assert pa_schema.field("user_interests").type == pa.list_(pa.int64())
    assert pa_schema.field("ad_ctr_1h").type == pa.float32()
    assert pa_schema.metadata == {FINGERPRINT_KEY: schema.fingerprint().encode()}


def test_arrow_schema_rejects_a_feature_named_like_a_sample_column() -> None:
    clash = Schema(features=(FeatureSpec("label", "sparse"), FeatureSpec("x", "dense")))
    with pytest.raises(
        SchemaError, match=r"must differ from the sample columns .* got \['label'\]"
    ):
        arrow_schema(clash)


# -- round trips ----------------------------------------------------------------------------


def test_samples_round_trip_through_ipc_bytes(schema: Schema, samples: list[Sample]) -> None:
    rb = samples_to_record_batch(samples, schema)
    assert rb.num_rows == len(samples)
    back = decode_batch(encode_batch(rb), schema)
    assert back.equals(rb)
    assert record_batch_to_samples(back, schema) == samples


def test_empty_batch_round_trips(schema: Schema) -> None:
    rb = samples_to_record_batch([], schema)
    back = decode_batch(encode_batch(rb), schema)
    assert back.num_rows == 0
    assert record_batch_to_samples(back, schema) == []


def test_all_empty_lists_and_negative_ids_round_trip(schema: Schema) -> None:
    s = _sample(
        schema,
        sample_id=-5,
        features=_features(schema, user_interests=[], user_id=-(2**63), ad_id=2**63 - 1),
    )
    rb = samples_to_record_batch([s, s], schema)
    assert rb.column("user_interests").type == pa.list_(pa.int64())
    assert record_batch_to_samples(decode_batch(encode_batch(rb), schema), schema) == [s, s]


def test_dense_values_come_back_as_their_float32(schema: Schema) -> None:
    s = _sample(schema, features=_features(schema, ad_ctr_1h=0.1, ad_age_hours=3))
    (back,) = record_batch_to_samples(samples_to_record_batch([s], schema), schema)
    assert back.features["ad_ctr_1h"] == float(np.float32(0.1)) != 0.1
    assert back.features["ad_age_hours"] == 3.0


def test_sliced_batch_decodes_to_the_slice(schema: Schema, samples: list[Sample]) -> None:
    rb = samples_to_record_batch(samples, schema)
    assert record_batch_to_samples(rb.slice(5, 9), schema) == samples[5:14]
    again = decode_batch(encode_batch(rb.slice(5, 9)), schema)
    assert record_batch_to_samples(again, schema) == samples[5:14]


_PROPERTY_SCHEMA = Schema(
    features=(
        FeatureSpec("a", "sparse"),
        FeatureSpec("tags", "multi_sparse"),
        FeatureSpec("x", "dense"),
        FeatureSpec("more_tags", "multi_sparse"),
        FeatureSpec("b", "sparse", hour_level=True),
    )
)
_ids = st.integers(min_value=-(2**63), max_value=2**63 - 1)
_dense = st.floats(width=32, allow_nan=False, allow_infinity=False)


@st.composite
def _samples(draw: st.DrawFn) -> Sample:
    label = draw(st.integers(0, 1))
    return Sample(
        sample_id=draw(_ids),
        event_ts_ms=draw(st.integers(0, 2**50)),
        emit_ts_ms=draw(st.integers(0, 2**50)),
        label=label,
        is_correction=draw(st.booleans()),
        label_ts_ms=draw(st.integers(-1, 2**50)),
        features={
            "a": draw(_ids),
            "tags": draw(st.lists(_ids, max_size=6)),
            "x": draw(_dense),
            "more_tags": draw(st.lists(_ids, max_size=3)),
            "b": draw(_ids),
        },
    )


@settings(max_examples=60, deadline=None)
@given(st.lists(_samples(), max_size=12))
def test_random_samples_round_trip_through_arrow_and_json(samples: list[Sample]) -> None:
    rb = samples_to_record_batch(samples, _PROPERTY_SCHEMA)
    back = decode_batch(encode_batch(rb), _PROPERTY_SCHEMA)
    assert record_batch_to_samples(back, _PROPERTY_SCHEMA) == samples
    assert samples_from_json(samples_to_json(samples), _PROPERTY_SCHEMA) == samples


# -- encoding samples that do not fit the schema ----------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"ad_id": 1.0}, r"feature 'ad_id': expected an int64 id, got 1.0 \(float\)"),
        ({"ad_id": True}, r"feature 'ad_id': expected an int64 id, got True \(bool\)"),
        ({"ad_id": 2**64}, r"feature 'ad_id': expected an int64 id, got 18446744073709551616"),
        ({"ad_id": None}, r"feature 'ad_id': expected an int64 id, got None \(NoneType\)"),
        (
            {"user_interests": 3},
            r"feature 'user_interests': expected a list of int64 ids, got 3 \(int\)",
        ),
        (
            {"user_interests": [1, "2"]},
            r"feature 'user_interests': expected a list of int64 .* '2' \(str\) at position 1",
        ),
        (
            {"user_interests": [None]},
            r"feature 'user_interests': expected a list .* None \(NoneType\) at position 0",
        ),
        (
            {"user_interests": [1, 2**63]},
            r"feature 'user_interests': expected a list .* 9223372036854775808 .* position 1",
        ),
        (
            {"ad_ctr_1h": float("nan")},
            r"feature 'ad_ctr_1h': expected a finite number within float32 range, got nan",
        ),
        (
            {"ad_ctr_1h": 1e39},
            r"feature 'ad_ctr_1h': expected a finite number within float32 range, got 1e\+39",
        ),
        ({"ad_ctr_1h": "0.5"}, r"feature 'ad_ctr_1h': expected a finite number, got '0.5' \(str\)"),
        ({"ad_ctr_1h": 2**70}, r"feature 'ad_ctr_1h': expected a finite number within int64 range"),
    ],
)
def test_encoding_a_mistyped_feature_names_sample_and_feature(
    schema: Schema, override: dict[str, object], message: str
) -> None:
    good = _sample(schema)
    bad = _sample(schema, sample_id=42, features=_features(schema, **override))
    with pytest.raises(SchemaError, match=r"^sample 1 \(sample_id 42\): " + message):
        samples_to_record_batch([good, bad, good], schema)


def test_encoding_names_missing_and_unknown_features(schema: Schema) -> None:
    feats = _features(schema)
    del feats["ad_id"], feats["slot"]
    missing = _sample(schema, features=feats)
    with pytest.raises(
        SchemaError, match=r"sample 0 \(sample_id 1\): missing features 'ad_id', 'slot'$"
    ):
        samples_to_record_batch([missing], schema)
    extra = _sample(schema, features={**_features(schema), "zzz": 1})
    with pytest.raises(SchemaError, match=r"sample 1 \(sample_id 1\): unknown feature 'zzz'$"):
        samples_to_record_batch([_sample(schema), extra], schema)
    renamed = _sample(schema, features={**feats, "adid": 1, "slot": 2})
    with pytest.raises(SchemaError, match=r"missing feature 'ad_id'; unknown feature 'adid'$"):
        samples_to_record_batch([renamed], schema)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"sample_id": 1.5}, r"field 'sample_id' expected an int64, got 1.5 \(float\)"),
        ({"event_ts_ms": 2**63}, r"field 'event_ts_ms' expected an int64, got 9223372036854775808"),
        ({"emit_ts_ms": None}, r"field 'emit_ts_ms' expected an int64, got None \(NoneType\)"),
        ({"label": 2}, r"field 'label' expected 0 or 1, got 2 \(int\)"),
        ({"label": -1}, r"field 'label' expected 0 or 1, got -1 \(int\)"),
        ({"label": True}, r"field 'label' expected 0 or 1, got True \(bool\)"),
        ({"is_correction": 1}, r"field 'is_correction' expected a bool, got 1 \(int\)"),
        ({"label_ts_ms": "x"}, r"field 'label_ts_ms' expected an int64, got 'x' \(str\)"),
    ],
)
def test_encoding_a_mistyped_field_names_sample_and_field(
    schema: Schema, fields: dict[str, object], message: str
) -> None:
    bad = _sample(schema, **fields)
    with pytest.raises(SchemaError, match=r"^sample 1 \(sample_id .*\): " + message):
        samples_to_record_batch([_sample(schema), bad], schema)


def test_dense_ints_beyond_float64_precision_are_rounded(schema: Schema) -> None:
    s = _sample(schema, features=_features(schema, ad_age_hours=2**53 + 1, ad_ctr_1h=-(2**62)))
    (back,) = record_batch_to_samples(samples_to_record_batch([s], schema), schema)
    assert back.features["ad_age_hours"] == float(np.float32(2.0**53))
    assert back.features["ad_ctr_1h"] == -(2.0**62)


def test_encoder_reports_values_it_failed_to_convert(
    schema: Schema, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Values that fit the schema but that the conversion refuses: an internal fault, still
    # reported as a SchemaError that names the column.
    monkeypatch.setattr(arrow_module, "_fast_columns", lambda samples, layout: None)
    monkeypatch.setattr(arrow_module, "_try_int_lists", lambda values: None)
    with pytest.raises(
        SchemaError,
        match=r"feature 'user_interests' fits the schema but could not be encoded as list<item",
    ):
        samples_to_record_batch([_sample(schema)], schema)
    monkeypatch.setattr(arrow_module, "_try_ints", lambda values: None)
    with pytest.raises(
        SchemaError, match="field 'sample_id' fits but could not be encoded as an int64"
    ):
        samples_to_record_batch([_sample(schema)], schema)


def test_the_fast_path_encodes_what_the_checked_path_encodes(
    schema: Schema, samples: list[Sample]
) -> None:
    unusual = [
        _sample(schema, features=_features(schema, user_interests=[])),
        _sample(schema, features=_features(schema, ad_ctr_1h=3, user_activity=2**53 + 1)),
        _sample(schema, sample_id=-(2**63), label=1, is_correction=True, label_ts_ms=2**63 - 1),
    ]
    for batch in (samples, unusual, samples[:1], [*samples, *unusual]):
        fast = arrow_module._fast_columns(batch, arrow_module._layout(schema))
        assert fast is not None
        checked = arrow_module._checked_record_batch(batch, schema)
        assert pa.RecordBatch.from_arrays(fast, schema=checked.schema).equals(checked)
        assert encode_batch(samples_to_record_batch(batch, schema)) == encode_batch(checked)


@pytest.mark.parametrize(
    ("numpy_fields", "python_fields"),
    [
        ({"sample_id": np.int64(3)}, {"sample_id": 3}),
        ({"label": np.int8(1)}, {"label": 1}),
        ({"ad_id": np.int64(-5)}, {"ad_id": -5}),
        ({"ad_ctr_1h": np.float32(0.25)}, {"ad_ctr_1h": 0.25}),
        ({"user_interests": [np.int64(4)]}, {"user_interests": [4]}),
    ],
)
def test_values_the_fast_path_refuses_are_encoded_by_the_checked_path(
    schema: Schema, numpy_fields: dict[str, object], python_fields: dict[str, object]
) -> None:
    def batch(fields: dict[str, object]) -> list[Sample]:
        feats = _features(schema, **{k: v for k, v in fields.items() if k in _features(schema)})
        rest = {k: v for k, v in fields.items() if k not in feats}
        return [_sample(schema), _sample(schema, features=feats, **rest)]

    unusual = batch(numpy_fields)
    assert arrow_module._fast_columns(unusual, arrow_module._layout(schema)) is None
    got = samples_to_record_batch(unusual, schema)
    assert got.equals(samples_to_record_batch(batch(python_fields), schema))


# -- decoding bytes that are not a sample batch of this schema --------------------------------


@pytest.mark.parametrize("data", [b"", b"not arrow at all", b"\xff" * 64])
def test_decode_rejects_bytes_that_are_not_arrow_ipc(schema: Schema, data: bytes) -> None:
    with pytest.raises(
        CodecError, match=rf"expected an Arrow IPC stream, got {len(data)} bytes that do not"
    ):
        decode_batch(data, schema)


def test_decode_rejects_a_truncated_stream(schema: Schema, samples: list[Sample]) -> None:
    data = encode_batch(samples_to_record_batch(samples, schema))
    with pytest.raises(CodecError, match="truncated or corrupt Arrow IPC stream"):
        decode_batch(data[:-40], schema)


def test_decode_rejects_a_stream_without_a_batch(schema: Schema) -> None:
    with pytest.raises(CodecError, match=r"expected exactly one record batch .* empty stream"):
        decode_batch(_ipc(schema=arrow_schema(schema)), schema)


def test_decode_rejects_a_stream_with_two_batches(schema: Schema, samples: list[Sample]) -> None:
    rb = samples_to_record_batch(samples, schema)
    with pytest.raises(CodecError, match="expected exactly one record batch per message, got 2"):
        decode_batch(_ipc(rb, rb), schema)


def test_decode_names_missing_extra_and_mistyped_columns(
    schema: Schema, samples: list[Sample]
) -> None:
    rb = samples_to_record_batch(samples, schema)
    rb = rb.drop_columns(["ad_id"])
    rb = rb.set_column(
        rb.schema.get_field_index("user_activity"),
        "user_activity",
        rb.column("user_activity").cast(pa.float64()),
    )
    rb = rb.append_column("debug_note", pa.array(["x"] * rb.num_rows))
    with pytest.raises(CodecError) as info:
        decode_batch(encode_batch(rb), schema)
    msg = str(info.value)
    assert f"columns do not match schema {schema.fingerprint()}" in msg
    assert "missing column 'ad_id' (int64)" in msg
    assert "column 'user_activity': expected float, got double" in msg
    assert "extra column 'debug_note' (string)" in msg


def test_decode_names_a_duplicated_column(schema: Schema, samples: list[Sample]) -> None:
    rb = samples_to_record_batch(samples, schema)
    rb = rb.append_column("ad_id", rb.column("ad_id"))
    with pytest.raises(
        CodecError, match=r"columns do not match schema \w+: duplicate column 'ad_id'$"
    ):
        decode_batch(encode_batch(rb), schema)


def test_decode_rejects_another_schema_fingerprint(schema: Schema, samples: list[Sample]) -> None:
    # Same columns, different schema: the hour-level flag moved, so the fingerprint differs.
    other = Schema(
        features=tuple(
            FeatureSpec(f.name, f.kind, hour_level=f.name == "user_activity")
            for f in schema.features
        )
    )
    data = encode_batch(samples_to_record_batch(samples, other))
    with pytest.raises(
        CodecError,
        match=f"expected schema fingerprint {schema.fingerprint()}, got {other.fingerprint()}",
    ):
        decode_batch(data, schema)


def test_decode_rejects_a_batch_without_fingerprint(schema: Schema, samples: list[Sample]) -> None:
    rb = samples_to_record_batch(samples, schema)
    bare = pa.RecordBatch.from_arrays(rb.columns, schema=rb.schema.remove_metadata())
    with pytest.raises(CodecError, match=r"expected schema fingerprint .* in the Arrow metadata"):
        decode_batch(encode_batch(bare), schema)


def test_decode_rejects_nulls(schema: Schema, samples: list[Sample]) -> None:
    rb = samples_to_record_batch(samples, schema)
    idx = rb.schema.get_field_index("ad_id")
    nulled = rb.set_column(idx, "ad_id", pa.array([None] + [1] * (rb.num_rows - 1), pa.int64()))
    with pytest.raises(CodecError, match="column 'ad_id' expected no nulls, got 1"):
        decode_batch(encode_batch(nulled), schema)


def test_decode_rejects_nulls_inside_id_lists(schema: Schema) -> None:
    rb = samples_to_record_batch([_sample(schema), _sample(schema)], schema)
    idx = rb.schema.get_field_index("user_interests")
    lists = pa.array([[1, None], [3]], pa.list_(pa.int64()))
    with pytest.raises(CodecError, match="column 'user_interests' expected no nulls, got 1"):
        decode_batch(encode_batch(rb.set_column(idx, "user_interests", lists)), schema)


def test_decode_rejects_out_of_bounds_list_offsets(schema: Schema) -> None:
    def with_list(n: int) -> Sample:
        return _sample(schema, features=_features(schema, user_interests=list(range(n))))

    data = encode_batch(samples_to_record_batch([with_list(3), with_list(4)], schema))
    offsets = struct.pack("<3i", 0, 3, 7)
    assert data.count(offsets) == 1
    corrupt = data.replace(offsets, struct.pack("<3i", 0, 3, 700))
    with pytest.raises(CodecError, match=r"inconsistent record batch .* out of bounds"):
        decode_batch(corrupt, schema)


def test_record_batch_to_samples_checks_columns(schema: Schema, samples: list[Sample]) -> None:
    rb = samples_to_record_batch(samples, schema).drop_columns(["slot"])
    with pytest.raises(CodecError, match="missing column 'slot'"):
        record_batch_to_samples(rb, schema)
