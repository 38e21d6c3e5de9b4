"""Predict bodies: instances, columns and Arrow decode to the same rows under the same rules."""

from __future__ import annotations

import doctest
import re
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import minutely.serve.codec as codec_mod
from minutely.data import instances_to_tensors
from minutely.data.tensors import (
    FeatureColumns,
    columns_from_arrow,
    columns_from_instances,
    columns_from_lists,
    columns_to_tensors,
    concat_columns,
)
from minutely.errors import SchemaError
from minutely.schema import default_schema
from minutely.serve.codec import ARROW_STREAM, BodyError, decode_body, encode_arrow

SCHEMA = default_schema()
BUCKETS = 1 << 16
JSON = "application/json"


def instance(i: int, **overrides: object) -> dict[str, Any]:
    inst: dict[str, Any] = {}
    for f in SCHEMA.features:
        if f.kind == "sparse":
            inst[f.name] = i * 7919 + len(f.name)
        elif f.kind == "multi_sparse":
            inst[f.name] = list(range(i % 4))
        else:
            inst[f.name] = 0.5 * i - 3 if f.name != "ad_age_hours" else i  # ints and floats
    inst.update(overrides)
    return inst


def columns_of(instances: list[dict[str, Any]]) -> dict[str, list[Any]]:
    return {f.name: [inst[f.name] for inst in instances] for f in SCHEMA.features}


def arrow_batch(cols: dict[str, list[Any]], **types: pa.DataType) -> pa.RecordBatch:
    kinds = {"sparse": pa.int64(), "multi_sparse": pa.list_(pa.int64()), "dense": pa.float64()}
    arrays = {}
    for f in SCHEMA.features:
        arrays[f.name] = pa.array(cols[f.name], type=types.get(f.name, kinds[f.kind]))
    return pa.record_batch(arrays)


def stream(rb: pa.RecordBatch, batches: int = 1) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, rb.schema) as writer:
        for _ in range(batches):
            writer.write_batch(rb)
    out: bytes = sink.getvalue().to_pybytes()
    return out


def assert_same(a: FeatureColumns, b: FeatureColumns) -> None:
    assert a.n == b.n
    assert [s[0] for s in a.sparse] == [s[0] for s in b.sparse]
    for (name, ids_a, off_a), (_, ids_b, off_b) in zip(a.sparse, b.sparse, strict=True):
        assert ids_a.dtype == ids_b.dtype == np.int64, name
        assert np.array_equal(ids_a, ids_b), name
        assert (off_a is None) == (off_b is None), name
        if off_a is not None and off_b is not None:
            assert np.array_equal(off_a, off_b), name
    assert a.dense.dtype == b.dense.dtype == np.float32
    assert np.array_equal(a.dense, b.dense)


# --- the three bodies agree ----------------------------------------------------------------------


def test_the_three_bodies_decode_to_the_same_rows() -> None:
    instances = [instance(i) for i in range(7)]
    cols = columns_of(instances)
    from_instances = decode_body(
        codec_json({"instances": instances}), JSON, SCHEMA, max_instances=10
    )
    from_columns = decode_body(codec_json({"columns": cols}), JSON, SCHEMA, max_instances=10)
    from_arrow = decode_body(encode_arrow(cols, SCHEMA), ARROW_STREAM, SCHEMA, max_instances=10)
    assert len(from_instances) == 7
    assert_same(from_instances, from_columns)
    assert_same(from_instances, from_arrow)
    # and to the tensors the instance path always built
    want = instances_to_tensors(instances, SCHEMA, BUCKETS)
    got = columns_to_tensors(from_arrow, BUCKETS)
    for name in want.sparse:
        assert torch.equal(want.sparse[name].values, got.sparse[name].values)
        assert torch.equal(want.sparse[name].offsets, got.sparse[name].offsets)
    assert torch.equal(want.dense, got.dense)


def codec_json(doc: object) -> bytes:
    import msgspec

    return msgspec.json.encode(doc)


_ids = st.integers(min_value=-(2**63), max_value=2**63 - 1)
_dense = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, min_value=-3e38, max_value=3e38),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
)


@st.composite
def _instances(draw: st.DrawFn) -> list[dict[str, Any]]:
    n = draw(st.integers(min_value=0, max_value=6))
    out = []
    for _ in range(n):
        inst: dict[str, Any] = {}
        for spec in SCHEMA.features:
            if spec.kind == "sparse":
                inst[spec.name] = draw(_ids)
            elif spec.kind == "multi_sparse":
                inst[spec.name] = draw(st.lists(_ids, max_size=4))
            else:
                inst[spec.name] = draw(_dense)
        out.append(inst)
    return out


@settings(max_examples=60, deadline=None)
@given(_instances())
def test_any_valid_rows_decode_alike_from_every_body(instances: list[dict[str, Any]]) -> None:
    want = columns_from_instances(instances, SCHEMA)
    cols = columns_of(instances)
    if instances:
        assert_same(want, columns_from_lists(cols, SCHEMA))
    # Arrow's dense column is float64: an int goes in as the float64 NumPy would make of it.
    arrow_cols = {
        f.name: [float(v) for v in cols[f.name]] if f.kind == "dense" else cols[f.name]
        for f in SCHEMA.features
    }
    assert_same(want, columns_from_arrow(arrow_batch(arrow_cols), SCHEMA))


def test_concat_columns_equals_decoding_all_rows_at_once() -> None:
    instances = [instance(i) for i in range(9)]
    parts = [columns_from_instances(instances[a:b], SCHEMA) for a, b in ((0, 4), (4, 5), (5, 9))]
    assert_same(concat_columns(parts), columns_from_instances(instances, SCHEMA))
    assert concat_columns(parts[:1]) is parts[0]
    with pytest.raises(SchemaError, match="concat_columns: expected at least one part, got none"):
        concat_columns([])


def test_sliced_arrow_columns_decode_their_own_rows() -> None:
    instances = [instance(i) for i in range(8)]
    rb = arrow_batch(columns_of(instances)).slice(3, 4)
    assert_same(columns_from_arrow(rb, SCHEMA), columns_from_instances(instances[3:7], SCHEMA))
    assert len(columns_from_arrow(rb.slice(0, 0), SCHEMA)) == 0


def test_arrow_dense_columns_of_any_numeric_type_are_read() -> None:
    instances = [instance(i) for i in range(3)]
    cols = columns_of(instances)
    cols["ad_age_hours"] = [1, 2, 3]
    rb = arrow_batch(cols, ad_age_hours=pa.int32(), ad_ctr_1h=pa.float32())
    fc = columns_from_arrow(rb, SCHEMA)
    assert fc.dense[:, 0].tolist() == [1.0, 2.0, 3.0]


# --- the same errors, the same words --------------------------------------------------------------

BAD_VALUES = [
    ("ad_id", "17", r"'ad_id': expected an int64 id, got '17' \(str\)"),
    ("ad_id", True, r"'ad_id': expected an int64 id, got True \(bool\)"),
    ("ad_id", 2**63, r"'ad_id': expected an int64 id, got 9223372036854775808 \(int\)"),
    ("ad_id", None, r"'ad_id': expected an int64 id, got None \(NoneType\)"),
    ("user_interests", 4, r"'user_interests': expected a list of int64 ids, got 4 \(int\)"),
    ("user_interests", [4, 2.5], r"'user_interests': expected .*, got 2.5 \(float\) at position 1"),
    ("user_interests", [1, -(2**64)], r"'user_interests': .*, got -18446744073709551616 \(int\)"),
    ("ad_ctr_1h", "0.1", r"'ad_ctr_1h': expected a finite number, got '0.1' \(str\)"),
    ("ad_ctr_1h", False, r"'ad_ctr_1h': expected a finite number, got False \(bool\)"),
    ("ad_ctr_1h", 4e38, r"'ad_ctr_1h': expected a finite number within float32 range, got 4e\+38"),
    ("ad_ctr_1h", 10**30, r"'ad_ctr_1h': expected a finite number within int64 range, got 1000"),
]


@pytest.mark.parametrize(("feature", "value", "message"), BAD_VALUES)
def test_a_bad_value_gets_the_same_message_from_instances_and_columns(
    feature: str, value: object, message: str
) -> None:
    instances = [instance(i) for i in range(4)]
    instances[2][feature] = value
    pattern = r"^instance 2: feature " + message
    with pytest.raises(BodyError, match=pattern) as a:
        decode_body(codec_json({"instances": instances}), JSON, SCHEMA, max_instances=10)
    with pytest.raises(BodyError, match=pattern) as b:
        decode_body(codec_json({"columns": columns_of(instances)}), JSON, SCHEMA, max_instances=10)
    assert str(a.value) == str(b.value)
    assert a.value.status == b.value.status == 400


def test_non_finite_dense_values_are_named_in_columns_and_arrow() -> None:
    # JSON has no NaN, so the column path is called directly, as a caller with lists would.
    instances = [instance(i) for i in range(3)]
    cols = columns_of(instances)
    cols["ad_ctr_1h"][1] = float("nan")
    message = r"^instance 1: feature 'ad_ctr_1h': expected a finite number within float32 range"
    with pytest.raises(SchemaError, match=message + r", got nan \(float\)$"):
        columns_from_lists(cols, SCHEMA)
    with pytest.raises(SchemaError, match=message + r", got nan \(float\)$"):
        columns_from_arrow(arrow_batch(cols), SCHEMA)
    cols["ad_ctr_1h"][1] = float("inf")
    with pytest.raises(SchemaError, match=message + r", got inf \(float\)$"):
        columns_from_arrow(arrow_batch(cols, ad_ctr_1h=pa.float32()), SCHEMA)


def test_arrow_nulls_are_named_like_json_nulls() -> None:
    instances = [instance(i) for i in range(4)]
    cols = columns_of(instances)
    cols["slot"][3] = None
    with pytest.raises(SchemaError, match=r"^instance 3: feature 'slot': expected an int64 id, "):
        columns_from_arrow(arrow_batch(cols), SCHEMA)
    cols = columns_of(instances)
    cols["user_interests"][2] = None
    with pytest.raises(SchemaError, match=r"^instance 2: feature 'user_interests': .*got None"):
        columns_from_arrow(arrow_batch(cols), SCHEMA)
    cols = columns_of(instances)
    cols["user_interests"][3] = [5, None]
    with pytest.raises(
        SchemaError,
        match=r"^instance 3: feature 'user_interests': expected a list of int64 ids, "
        r"got None \(NoneType\) at position 1$",
    ):
        columns_from_arrow(arrow_batch(cols), SCHEMA)
    cols = columns_of(instances)
    cols["ad_ctr_1h"][0] = None
    with pytest.raises(SchemaError, match=r"^instance 0: feature 'ad_ctr_1h': .*got None"):
        columns_from_arrow(arrow_batch(cols), SCHEMA)


def test_arrow_uint64_dense_values_beyond_int64_are_refused() -> None:
    cols = columns_of([instance(0), instance(1)])
    cols["ad_age_hours"] = [1, 2**63]
    with pytest.raises(SchemaError, match=r"^instance 1: feature 'ad_age_hours': .*int64 range"):
        columns_from_arrow(arrow_batch(cols, ad_age_hours=pa.uint64()), SCHEMA)


def json_error(doc: object) -> BodyError:
    with pytest.raises(BodyError) as info:
        decode_body(codec_json(doc), JSON, SCHEMA, max_instances=5)
    return info.value


def test_columns_of_different_lengths_are_refused() -> None:
    cols = columns_of([instance(i) for i in range(3)])
    cols["slot"] = cols["slot"][:2]
    err = json_error({"columns": cols})
    assert err.status == 400
    assert str(err) == "columns: feature 'slot': expected 3 values (as many as 'user_id'), got 2"


def test_unknown_and_missing_columns_are_named() -> None:
    cols = columns_of([instance(0)])
    cols["browser"] = [1]
    del cols["ad_id"]
    assert str(json_error({"columns": cols})) == (
        "columns: missing feature 'ad_id'; unknown feature 'browser'"
    )
    rb = arrow_batch(columns_of([instance(0)])).drop_columns(["slot", "device"])
    with pytest.raises(SchemaError, match=r"^arrow batch: missing features 'slot', 'device'$"):
        columns_from_arrow(rb, SCHEMA)


def test_a_column_that_is_not_a_list_is_refused() -> None:
    cols: dict[str, Any] = columns_of([instance(0)])
    cols["ad_id"] = 5
    assert str(json_error({"columns": cols})) == (
        "columns: feature 'ad_id': expected a list of values, one per instance, got int"
    )
    assert str(json_error({"columns": [1, 2]})) == (
        "request body: Expected `object`, got `array` - at `$.columns`"
    )


def test_a_body_with_both_or_neither_field_is_refused() -> None:
    both = json_error({"instances": [], "columns": {}})
    assert str(both) == "request body: expected one of `instances` and `columns`, got both"
    assert str(json_error({"rows": []})) == (
        "request body: expected a field `instances` or `columns`, got neither"
    )


def test_too_many_rows_is_413_in_every_body() -> None:
    instances = [instance(i) for i in range(6)]
    err = json_error({"instances": instances})
    assert (err.status, str(err)) == (413, "'instances': expected at most 5 per request, got 6")
    err = json_error({"columns": columns_of(instances)})
    assert (err.status, str(err)) == (413, "'columns': expected at most 5 per request, got 6")
    with pytest.raises(BodyError) as info:
        decode_body(
            encode_arrow(columns_of(instances), SCHEMA), ARROW_STREAM, SCHEMA, max_instances=5
        )
    assert (info.value.status, str(info.value)) == (
        413,
        "arrow batch: expected at most 5 per request, got 6",
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not arrow", r"^request body: expected an Arrow IPC stream \(application/vnd\.apache"),
        (b"", r"^request body: expected an Arrow IPC stream"),
    ],
)
def test_a_bad_arrow_body_is_refused(body: bytes, message: str) -> None:
    with pytest.raises(BodyError, match=message) as info:
        decode_body(body, ARROW_STREAM, SCHEMA, max_instances=5)
    assert info.value.status == 400


def test_an_arrow_stream_needs_exactly_one_batch() -> None:
    rb = arrow_batch(columns_of([instance(0)]))
    for batches in (0, 2):
        with pytest.raises(
            BodyError, match=rf"^request body: expected one Arrow record batch, got {batches}$"
        ):
            decode_body(stream(rb, batches), ARROW_STREAM, SCHEMA, max_instances=5)


def test_arrow_columns_of_the_wrong_type_are_named() -> None:
    cols = columns_of([instance(0), instance(1)])
    cases = [
        ({"ad_id": pa.string()}, "ad_id", "int64", "string"),
        ({"ad_id": pa.int32()}, "ad_id", "int64", "int32"),
        ({"user_interests": pa.list_(pa.int32())}, "user_interests", "list<int64>", "list<item"),
        ({"ad_ctr_1h": pa.string()}, "ad_ctr_1h", "an integer or floating-point type", "string"),
    ]
    for types, name, expected, got in cases:
        if types.get(name) == pa.string():
            cols_here = {**cols, name: [str(v) for v in cols[name]]}
        else:
            cols_here = cols
        body = stream(arrow_batch(cols_here, **types))
        with pytest.raises(BodyError) as info:
            decode_body(body, ARROW_STREAM, SCHEMA, max_instances=5)
        assert str(info.value).startswith(
            f"arrow batch: feature {name!r}: expected a column of {expected}, got {got}"
        ), str(info.value)


def test_repeated_arrow_columns_are_refused() -> None:
    rb = arrow_batch(columns_of([instance(0)]))
    doubled = pa.RecordBatch.from_arrays(
        [*rb.columns, rb.column("slot")], names=[*rb.schema.names, "slot"]
    )
    with pytest.raises(
        SchemaError, match=re.escape("expected one column per feature, got ['slot']")
    ):
        columns_from_arrow(doubled, SCHEMA)


def test_content_type_parameters_are_ignored() -> None:
    body = encode_arrow(columns_of([instance(0)]), SCHEMA)
    fc = decode_body(
        body, "Application/Vnd.Apache.Arrow.Stream; charset=x", SCHEMA, max_instances=5
    )
    assert len(fc) == 1


def test_docstring_examples_run() -> None:
    result = doctest.testmod(codec_mod)
    assert result.attempted > 0
    assert result.failed == 0
