from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minutely.data import (
    Sample,
    TensorBatch,
    concat_tensor_batches,
    decode_batch,
    encode_batch,
    feature_salt,
    hash_ids,
    instances_to_tensors,
    record_batch_to_tensors,
    samples_to_record_batch,
)
from minutely.errors import CodecError, SchemaError
from minutely.schema import FeatureSpec, Schema, default_schema

BUCKETS = 1 << 20
MakeSamples = Callable[..., list[Sample]]


def _assert_same_features(a: TensorBatch, b: TensorBatch) -> None:
    assert list(a.sparse) == list(b.sparse)
    for name in a.sparse:
        assert torch.equal(a.sparse[name].values, b.sparse[name].values), name
        assert torch.equal(a.sparse[name].offsets, b.sparse[name].offsets), name
    assert torch.equal(a.dense, b.dense)


def _assert_same_batch(a: TensorBatch, b: TensorBatch) -> None:
    _assert_same_features(a, b)
    for field in (
        "labels",
        "is_correction",
        "sample_ids",
        "event_ts_ms",
        "emit_ts_ms",
        "label_ts_ms",
    ):
        assert torch.equal(getattr(a, field), getattr(b, field)), field


def _instance(schema: Schema, **overrides: object) -> dict[str, object]:
    inst: dict[str, object] = {
        f.name: ([4, 5] if f.kind == "multi_sparse" else 0.5 if f.kind == "dense" else 3)
        for f in schema.features
    }
    inst.update(overrides)
    return inst


# -- record batch -> tensors ----------------------------------------------------------------


def test_record_batch_to_tensors_layout_and_values(schema: Schema, samples: list[Sample]) -> None:
    tb = record_batch_to_tensors(samples_to_record_batch(samples, schema), schema, BUCKETS)
    n = len(samples)
    assert len(tb) == n
    assert list(tb.sparse) == [f.name for f in schema.sparse]
    for spec in schema.sparse:
        jag = tb.sparse[spec.name]
        assert jag.values.dtype == jag.offsets.dtype == torch.int64
        lists: list[list[int]] = []
        for s in samples:
            v = s.features[spec.name]
            lists.append(v if isinstance(v, list) else [int(v)])
        lengths = [len(v) for v in lists]
        assert jag.offsets.tolist() == np.concatenate([[0], np.cumsum(lengths)]).tolist()
        flat = np.array([i for v in lists for i in v], dtype=np.int64)
        assert jag.values.tolist() == hash_ids(flat, feature_salt(spec.name), BUCKETS).tolist()
    raw_dense = np.array([[s.features[f.name] for f in schema.dense] for s in samples], np.float32)
    assert tb.dense.dtype == torch.float32
    assert tuple(tb.dense.shape) == (n, len(schema.dense))
    expected = np.sign(raw_dense) * np.log1p(np.abs(raw_dense))
    np.testing.assert_array_equal(tb.dense.numpy(), expected)
    assert tb.labels.dtype == torch.float32
    assert tb.labels.tolist() == [float(s.label) for s in samples]
    assert tb.is_correction.dtype == torch.bool
    assert tb.is_correction.tolist() == [s.is_correction for s in samples]
    assert tb.sample_ids.tolist() == [s.sample_id for s in samples]
    assert tb.event_ts_ms.tolist() == [s.event_ts_ms for s in samples]
    assert tb.emit_ts_ms.tolist() == [s.emit_ts_ms for s in samples]
    assert tb.label_ts_ms.dtype == torch.int64
    assert tb.label_ts_ms.tolist() == [s.label_ts_ms for s in samples]
    assert -1 in tb.label_ts_ms.tolist()  # the fixture holds negatives and positives
    assert any(t > 0 for t in tb.label_ts_ms.tolist())


def test_dense_transform_is_signed_log1p(schema: Schema) -> None:
    values = [0.0, 1.0, -1.0, 1e6, -3.5]
    tb = instances_to_tensors([_instance(schema, ad_ctr_1h=v) for v in values], schema, 10)
    col = schema.dense.index(schema.get("ad_ctr_1h"))
    got = tb.dense[:, col].tolist()
    assert got == pytest.approx([0.0, np.log(2), -np.log(2), np.log1p(1e6), -np.log(4.5)])


@pytest.mark.parametrize(("start", "length"), [(0, 64), (0, 10), (7, 13), (50, 14), (64, 0)])
def test_sliced_batch_has_offsets_from_zero(
    schema: Schema, samples: list[Sample], start: int, length: int
) -> None:
    rb = samples_to_record_batch(samples, schema)
    sliced = record_batch_to_tensors(rb.slice(start, length), schema, BUCKETS)
    fresh = record_batch_to_tensors(
        samples_to_record_batch(samples[start : start + length], schema), schema, BUCKETS
    )
    _assert_same_batch(sliced, fresh)
    jag = sliced.sparse["user_interests"]
    assert jag.offsets[0] == 0
    assert jag.offsets[-1] == len(jag.values)
    assert len(jag.offsets) == length + 1


def test_tensors_own_their_memory(schema: Schema, samples: list[Sample]) -> None:
    data = encode_batch(samples_to_record_batch(samples, schema))
    rb = decode_batch(data, schema)
    tb = record_batch_to_tensors(rb, schema, BUCKETS)
    before = bytes(data)
    ad_ids = tb.sparse["ad_id"].values
    for t in (tb.sample_ids, tb.event_ts_ms, tb.label_ts_ms, tb.labels, tb.dense, ad_ids):
        t.zero_()
    tb.is_correction.fill_(True)
    assert data == before
    assert rb.column("sample_id").to_pylist() == [s.sample_id for s in samples]


def test_empty_batch_gives_empty_tensors(schema: Schema) -> None:
    tb = record_batch_to_tensors(samples_to_record_batch([], schema), schema, BUCKETS)
    assert len(tb) == 0
    assert tuple(tb.dense.shape) == (0, len(schema.dense))
    assert tb.sparse["user_interests"].offsets.tolist() == [0]
    assert tb.sparse["user_id"].offsets.tolist() == [0]


def test_schema_without_dense_features_gives_zero_width_dense() -> None:
    schema = Schema(features=(FeatureSpec("a", "sparse"), FeatureSpec("t", "multi_sparse")))
    tb = instances_to_tensors([{"a": 1, "t": []}, {"a": 2, "t": [1]}], schema, 10)
    assert tuple(tb.dense.shape) == (2, 0)
    rb = samples_to_record_batch([Sample(1, 0, 0, 0, False, -1, {"a": 1, "t": []})], schema)
    assert tuple(record_batch_to_tensors(rb, schema, 10).dense.shape) == (1, 0)


def _replace(rb: pa.RecordBatch, name: str, column: pa.Array) -> pa.RecordBatch:
    return rb.set_column(rb.schema.get_field_index(name), rb.schema.field(name), column)


def test_nulls_in_a_required_column_are_refused(schema: Schema, samples: list[Sample]) -> None:
    rb = samples_to_record_batch(samples[:3], schema)
    for name, column in [
        ("event_ts_ms", pa.array([1, None, 3], pa.int64())),
        ("is_correction", pa.array([True, None, False])),
        ("user_interests", pa.array([[1], None, []], pa.list_(pa.int64()))),
        ("ad_ctr_1h", pa.array([0.1, 0.2, None], pa.float32())),
    ]:
        with pytest.raises(CodecError, match=rf"^sample batch: column '{name}' expected no nulls"):
            record_batch_to_tensors(_replace(rb, name, column), schema, BUCKETS)


def test_labels_other_than_0_or_1_are_refused(schema: Schema, samples: list[Sample]) -> None:
    rb = _replace(
        samples_to_record_batch(samples[:3], schema), "label", pa.array([0, 1, 3], pa.int8())
    )
    with pytest.raises(CodecError, match="column 'label' expected 0 or 1, got 3 at row 2"):
        record_batch_to_tensors(rb, schema, BUCKETS)


def test_non_finite_dense_values_are_refused(schema: Schema, samples: list[Sample]) -> None:
    bad = pa.array([1.0, float("inf"), 2.0], pa.float32())
    rb = _replace(samples_to_record_batch(samples[:3], schema), "user_activity", bad)
    with pytest.raises(CodecError, match="column 'user_activity' expected finite values, got inf"):
        record_batch_to_tensors(rb, schema, BUCKETS)


def test_mismatched_columns_are_refused(schema: Schema, samples: list[Sample]) -> None:
    rb = samples_to_record_batch(samples[:3], schema)
    rb = rb.set_column(rb.schema.get_field_index("ad_id"), "ad_id", pa.array([1, 2, 3], pa.int32()))
    with pytest.raises(CodecError, match="column 'ad_id': expected int64, got int32"):
        record_batch_to_tensors(rb, schema, BUCKETS)


# -- serving instances -> tensors, and train/serve agreement -----------------------------------


def test_train_and_serve_give_identical_tensors(make_samples: MakeSamples, schema: Schema) -> None:
    samples = make_samples(schema, 300, seed=7)
    trained = record_batch_to_tensors(
        decode_batch(encode_batch(samples_to_record_batch(samples, schema)), schema),
        schema,
        BUCKETS,
    )
    served = instances_to_tensors([s.features for s in samples], schema, BUCKETS)
    _assert_same_features(trained, served)
    assert served.labels.tolist() == [0.0] * 300
    assert served.sample_ids.tolist() == [-1] * 300
    assert served.event_ts_ms.tolist() == served.emit_ts_ms.tolist() == [0] * 300
    assert served.label_ts_ms.tolist() == [-1] * 300
    assert not served.is_correction.any()


_ids = st.integers(min_value=-(2**63), max_value=2**63 - 1)
_dense = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, min_value=-3e38, max_value=3e38),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
)


@st.composite
def _features(draw: st.DrawFn) -> dict[str, int | float | list[int]]:
    feats: dict[str, int | float | list[int]] = {}
    for spec in default_schema().features:
        if spec.kind == "sparse":
            feats[spec.name] = draw(_ids)
        elif spec.kind == "multi_sparse":
            feats[spec.name] = draw(st.lists(_ids, max_size=5))
        else:
            feats[spec.name] = draw(_dense)
    return feats


@settings(max_examples=50, deadline=None)
@given(st.lists(_features(), min_size=1, max_size=8))
def test_train_and_serve_agree_on_any_valid_features(
    feats: list[dict[str, int | float | list[int]]],
) -> None:
    # Includes float64 values that are not float32-exact and ints above 2**24: both paths must
    # round them the same way.
    schema = default_schema()
    samples = [Sample(i, 0, 0, 0, False, -1, f) for i, f in enumerate(feats)]
    trained = record_batch_to_tensors(samples_to_record_batch(samples, schema), schema, 1000)
    _assert_same_features(trained, instances_to_tensors(feats, schema, 1000))


def test_no_instances_give_an_empty_batch(schema: Schema) -> None:
    tb = instances_to_tensors([], schema, BUCKETS)
    assert len(tb) == 0
    assert tuple(tb.dense.shape) == (0, len(schema.dense))
    assert tb.sparse["user_interests"].offsets.tolist() == [0]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"ad_id": "17"}, r"feature 'ad_id': expected an int64 id, got '17' \(str\)"),
        ({"ad_id": 17.0}, r"feature 'ad_id': expected an int64 id, got 17.0 \(float\)"),
        ({"ad_id": False}, r"feature 'ad_id': expected an int64 id, got False \(bool\)"),
        ({"ad_id": 2**63}, r"feature 'ad_id': expected an int64 id, got 9223372036854775808"),
        ({"ad_id": None}, r"feature 'ad_id': expected an int64 id, got None \(NoneType\)"),
        (
            {"user_interests": 4},
            r"feature 'user_interests': expected a list of int64 ids, got 4 \(int\)",
        ),
        (
            {"user_interests": (4, 5)},
            r"feature 'user_interests': expected a list of int64 ids, got \(4, 5\) \(tuple\)",
        ),
        (
            {"user_interests": [4, 5.5]},
            r"feature 'user_interests': expected .*, got 5.5 \(float\) at position 1",
        ),
        ({"ad_ctr_1h": "0.1"}, r"feature 'ad_ctr_1h': expected a finite number, got '0.1'"),
        ({"ad_ctr_1h": True}, r"feature 'ad_ctr_1h': expected a finite number, got True"),
        ({"ad_ctr_1h": [0.1]}, r"feature 'ad_ctr_1h': expected a finite number, got \[0.1\]"),
        ({"ad_ctr_1h": float("nan")}, r"feature 'ad_ctr_1h': expected a finite number .*nan"),
        ({"ad_ctr_1h": float("-inf")}, r"feature 'ad_ctr_1h': expected a finite number .*-inf"),
        ({"ad_ctr_1h": 4e38}, r"feature 'ad_ctr_1h': .* within float32 range, got 4e\+38"),
        ({"ad_ctr_1h": 10**30}, r"feature 'ad_ctr_1h': .* within int64 range, got 10000"),
        ({"browser": 2}, r"unknown feature 'browser'$"),
    ],
)
def test_invalid_instances_name_index_and_feature(
    schema: Schema, override: dict[str, object], message: str
) -> None:
    instances = [_instance(schema), _instance(schema, **override)]
    with pytest.raises(SchemaError, match=r"^instance 1: " + message):
        instances_to_tensors(instances, schema, BUCKETS)


def test_instance_missing_features_are_named(schema: Schema) -> None:
    inst = _instance(schema)
    del inst["slot"]
    with pytest.raises(SchemaError, match=r"^instance 0: missing feature 'slot'$"):
        instances_to_tensors([inst], schema, BUCKETS)


def test_instance_that_is_not_a_mapping_is_refused(schema: Schema) -> None:
    instances = [_instance(schema), _instance(schema), [1, 2]]
    with pytest.raises(SchemaError, match=r"^instance 2: expected a mapping .*, got list"):
        instances_to_tensors(instances, schema, BUCKETS)  # type: ignore[arg-type]


# -- concatenation --------------------------------------------------------------------------


def test_concat_equals_the_batch_of_all_rows(schema: Schema, samples: list[Sample]) -> None:
    rb = samples_to_record_batch(samples, schema)
    whole = record_batch_to_tensors(rb, schema, BUCKETS)
    parts = [
        record_batch_to_tensors(rb.slice(a, b - a), schema, BUCKETS)
        for a, b in [(0, 10), (10, 10), (10, 33), (33, 64)]
    ]
    _assert_same_batch(concat_tensor_batches(parts), whole)
    _assert_same_batch(concat_tensor_batches([whole]), whole)


def test_concat_rebases_offsets_that_do_not_start_at_zero(schema: Schema) -> None:
    one = instances_to_tensors([_instance(schema, user_interests=[1, 2, 3])], schema, 100)
    jag = one.sparse["user_interests"]
    # A view into a larger values buffer, as a consumer might hand over.
    shifted = TensorBatch(
        sparse={
            **one.sparse,
            "user_interests": type(jag)(
                values=torch.cat([torch.tensor([99, 98]), jag.values]), offsets=jag.offsets + 2
            ),
        },
        dense=one.dense,
        labels=one.labels,
        is_correction=one.is_correction,
        sample_ids=one.sample_ids,
        event_ts_ms=one.event_ts_ms,
        emit_ts_ms=one.emit_ts_ms,
        label_ts_ms=one.label_ts_ms,
    )
    both = concat_tensor_batches([shifted, one])
    assert both.sparse["user_interests"].offsets.tolist() == [0, 3, 6]
    assert torch.equal(both.sparse["user_interests"].values, jag.values.repeat(2))


def test_concat_refuses_no_batches() -> None:
    with pytest.raises(SchemaError, match="expected at least one batch, got none"):
        concat_tensor_batches([])


def test_concat_refuses_batches_of_different_features(schema: Schema) -> None:
    one = instances_to_tensors([_instance(schema)], schema, 100)
    small = Schema(features=(FeatureSpec("user_id", "sparse"), FeatureSpec("x", "dense")))
    other = instances_to_tensors([{"user_id": 1, "x": 0.0}], small, 100)
    with pytest.raises(SchemaError, match=r"batch 1 has sparse features \['user_id'\], expected"):
        concat_tensor_batches([one, other])
    wide = TensorBatch(
        sparse=one.sparse,
        dense=torch.zeros(1, 5),
        labels=one.labels,
        is_correction=one.is_correction,
        sample_ids=one.sample_ids,
        event_ts_ms=one.event_ts_ms,
        emit_ts_ms=one.emit_ts_ms,
        label_ts_ms=one.label_ts_ms,
    )
    with pytest.raises(SchemaError, match="batch 2 has 5 dense features, expected 3"):
        concat_tensor_batches([one, one, wide])
