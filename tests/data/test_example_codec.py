"""The tf.train.Example codec: wire compatibility with TensorFlow's messages, bulk encode and
decode against the reference protobuf, every refusal and its reason, TFRecord framing."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from example_records import (
    bytes_list,
    compiled_kernels,  # noqa: F401 (an autouse fixture: the kernels compile in set-up)
    entry,
    example,
    float_list,
    int64_list,
    ld,
    reference_features,
    reference_record,
    sample_values,
    tag,
    varint,
)
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st
from tfrecord import example_pb2 as ref
from tfrecord.writer import TFRecordWriter

from conftest import build_samples
from minutely.data import arrow_schema, samples_to_record_batch
from minutely.data.arrow import FINGERPRINT_KEY, check_record_batch
from minutely.data.example import (
    DEFAULT_MAX_IDS,
    DecodedExamples,
    ExampleSpec,
    encode_tfrecords,
    examples_to_record_batch,
    record_batch_to_examples,
    split_tfrecords,
)
from minutely.data.proto import example_pb2 as ours
from minutely.data.samples import Sample
from minutely.errors import CodecError, ConfigError
from minutely.schema import FeatureSpec, Schema, default_schema

SCHEMA = default_schema()
SPEC = ExampleSpec.build(SCHEMA)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
F32_MAX = float(np.finfo(np.float32).max)
F32_TINY = float(np.float32(2.0**-149))  # the smallest subnormal


def sample(sid: int = 1, **overrides: object) -> Sample:
    feats: dict[str, object] = {}
    for f in SCHEMA.features:
        feats[f.name] = [3, 1, 4] if f.kind == "multi_sparse" else 0.5 if f.kind == "dense" else 9
    feats.update(overrides)
    return Sample(sid, 1_000, 61_000, 1, True, 5_000, feats)  # type: ignore[arg-type]


def decode(records: list[bytes], spec: ExampleSpec = SPEC) -> DecodedExamples:
    out = examples_to_record_batch(records, spec)
    assert len(out.rows) + len(out.bad) == len(records)
    check_record_batch(out.batch, spec.schema)
    return out


def only_reason(record: bytes, spec: ExampleSpec = SPEC) -> str:
    """The reason the codec refuses a record (it must refuse it)."""
    out = decode([record], spec)
    assert out.batch.num_rows == 0, "the record was accepted"
    ((index, reason),) = out.bad
    assert index == 0
    return reason


def parses(record: bytes) -> bool:
    try:
        ref.Example.FromString(record)
    except DecodeError:
        return False
    return True


def entries(s: Sample, spec: ExampleSpec = SPEC, **replace: bytes) -> list[bytes]:
    """The sample's map entries, a key's Feature replaced by ``replace[key]``."""
    feats = reference_features(s, spec)
    feats.update(replace)
    return [entry(k, f) for k, f in feats.items()]


# -- the messages -----------------------------------------------------------------------------


def _messages() -> list[dict[str, tuple[str, list[object]]]]:
    many = {f"k{i:03d}": ("int64", [i, -i]) for i in range(300)}
    return [
        {"a": ("int64", [INT64_MIN, -1, 0, 1, INT64_MAX])},
        {"empty_ints": ("int64", []), "empty_floats": ("float", []), "empty_bytes": ("bytes", [])},
        {"f": ("float", [F32_MAX, -F32_MAX, F32_TINY, -0.0, 1.5]), "b": ("bytes", [b"\x00\xff"])},
        {"é": ("int64", [2**40]), "中文": ("float", [0.25]), "label": ("int64", [1])},
        many,
        {},
    ]


def _build(module: object, spec: dict[str, tuple[str, list[object]]]) -> object:
    msg = module.Example()  # type: ignore[attr-defined]
    for key, (kind, values) in spec.items():
        feature = msg.features.feature[key]
        getattr(feature, f"{kind}_list").SetInParent()
        getattr(feature, f"{kind}_list").value.extend(values)
    return msg


@pytest.mark.parametrize("spec", _messages(), ids=lambda s: ",".join(list(s)[:3]) or "empty")
def test_our_messages_and_tensorflows_write_the_same_bytes_and_read_each_other(
    spec: dict[str, tuple[str, list[object]]],
) -> None:
    mine, theirs = _build(ours, spec), _build(ref, spec)
    data = mine.SerializeToString(deterministic=True)  # type: ignore[attr-defined]
    assert data == theirs.SerializeToString(deterministic=True)  # type: ignore[attr-defined]
    assert ours.Example.FromString(theirs.SerializeToString()) == mine
    assert ref.Example.FromString(mine.SerializeToString()) == theirs  # type: ignore[attr-defined]
    assert ours.DESCRIPTOR.package == "minutely.example"


# -- encoding ---------------------------------------------------------------------------------


def _f32s() -> st.SearchStrategy[float]:
    return st.one_of(
        st.floats(width=32, allow_nan=False, allow_infinity=False),
        st.sampled_from([F32_MAX, -F32_MAX, F32_TINY, -F32_TINY, 0.0, -0.0, 1.0]),
    )


_IDS = st.one_of(
    st.integers(INT64_MIN, INT64_MAX),
    st.sampled_from([INT64_MIN, INT64_MAX, -1, 0, 127, 128, 16383, 16384]),
    st.integers(0, 200_000),
)


@st.composite
def _samples(draw: st.DrawFn) -> Sample:
    feats: dict[str, object] = {}
    for f in SCHEMA.features:
        if f.kind == "sparse":
            feats[f.name] = draw(_IDS)
        elif f.kind == "multi_sparse":
            feats[f.name] = draw(st.lists(_IDS, max_size=12))
        else:
            feats[f.name] = draw(_f32s())
    label = draw(st.integers(0, 1))
    return Sample(
        draw(_IDS),
        draw(_IDS),
        draw(_IDS),
        label,
        draw(st.booleans()),
        draw(_IDS),
        feats,  # type: ignore[arg-type]
    )


@settings(max_examples=60, deadline=None)
@given(st.lists(_samples(), min_size=1, max_size=6))
def test_encoding_is_byte_for_byte_protobufs_deterministic_serialization(
    samples: list[Sample],
) -> None:
    rb = samples_to_record_batch(samples, SCHEMA)
    assert record_batch_to_examples(rb, SPEC) == [reference_record(s, SPEC) for s in samples]
    out = decode(record_batch_to_examples(rb, SPEC))
    assert out.bad == []
    assert out.batch.equals(rb)


def test_renamed_keys_sort_as_protobuf_sorts_them_prefixes_and_unicode_included() -> None:
    # Python's protobuf writes, of two keys where one is a prefix of the other, the longer
    # first ('label_ts_ms' before 'label'); bytewise otherwise, UTF-8 included.
    keys = {"label": "a", "label_ts_ms": "ab", "sample_id": "é", "user_id": "aé", "ad_id": "b"}
    spec = ExampleSpec.build(SCHEMA, keys)
    samples = build_samples(SCHEMA, 20, seed=3)
    rb = samples_to_record_batch(samples, SCHEMA)
    records = record_batch_to_examples(rb, spec)
    assert records == [reference_record(s, spec) for s in samples]
    assert decode(records, spec).batch.equals(rb)


def test_a_sliced_batch_encodes_only_its_rows() -> None:
    samples = build_samples(SCHEMA, 30, seed=5)
    rb = samples_to_record_batch(samples, SCHEMA)
    part = rb.slice(7, 11)
    assert record_batch_to_examples(part, SPEC) == [
        reference_record(s, SPEC) for s in samples[7:18]
    ]
    assert record_batch_to_examples(rb.slice(0, 0), SPEC) == []


def test_columns_in_another_order_encode_by_name() -> None:
    rb = samples_to_record_batch(build_samples(SCHEMA, 4), SCHEMA)
    names = list(reversed(rb.schema.names))
    shuffled = pa.RecordBatch.from_arrays([rb.column(n) for n in names], names=names)
    assert record_batch_to_examples(shuffled, SPEC) == record_batch_to_examples(rb, SPEC)


def test_encoding_refuses_a_batch_that_does_not_match_or_that_the_decoder_would_refuse() -> None:
    rb = samples_to_record_batch([sample(1), sample(2)], SCHEMA)
    with pytest.raises(CodecError, match=r"missing column 'user_id' \(int64\)"):
        record_batch_to_examples(rb.drop_columns(["user_id"]), SPEC)
    with pytest.raises(CodecError, match=r"expected a pyarrow.RecordBatch, got Table"):
        record_batch_to_examples(pa.Table.from_batches([rb]), SPEC)  # type: ignore[arg-type]

    def with_column(name: str, values: pa.Array) -> pa.RecordBatch:
        i = rb.schema.get_field_index(name)
        return rb.set_column(i, rb.schema.field(name), values)

    bad_label = with_column("label", pa.array([1, 2], pa.int8()))
    with pytest.raises(
        CodecError, match=r"row 1 \(sample_id 2\): column 'label' expected 0 or 1, got 2"
    ):
        record_batch_to_examples(bad_label, SPEC)
    nan = with_column("ad_ctr_1h", pa.array([0.5, float("nan")], pa.float32()))
    with pytest.raises(CodecError, match=r"column 'ad_ctr_1h' expected a finite float32, got nan"):
        record_batch_to_examples(nan, SPEC)
    small = ExampleSpec.build(SCHEMA, max_ids=2)
    with pytest.raises(
        CodecError,
        match=r"row 0 \(sample_id 1\): column 'user_interests' expected at most max_ids 2 ids, "
        r"got 3",
    ):
        record_batch_to_examples(rb, small)


# -- decoding what others write ---------------------------------------------------------------


def test_examples_decode_into_what_samples_to_record_batch_builds() -> None:
    samples = build_samples(SCHEMA, 200, seed=11)
    extremes = sample(
        9,
        user_id=INT64_MIN,
        ad_id=INT64_MAX,
        campaign_id=-1,
        user_interests=[],
        ad_age_hours=F32_MAX,
        user_activity=-F32_TINY,
        ad_ctr_1h=-0.0,
    )
    samples.append(extremes)
    rb = samples_to_record_batch(samples, SCHEMA)
    out = decode([reference_record(s, SPEC) for s in samples])
    assert out.bad == []
    assert out.rows.tolist() == list(range(len(samples)))
    assert out.batch.equals(rb)
    assert out.batch.schema.metadata[FINGERPRINT_KEY] == SCHEMA.fingerprint().encode()
    assert out.rows.dtype == np.int64


def _feature(name: str, value: object, packed: bool = True, inside: bytes = b"") -> bytes:
    """A Feature for ``name`` written by hand; ``inside`` goes into the list and the Feature."""
    kind = {f.name: f.kind for f in SCHEMA.features}.get(name, "sparse")
    if kind == "dense":
        feature = float_list([value], packed)  # type: ignore[list-item]
    else:
        feature = int64_list(value if kind == "multi_sparse" else [value], packed)  # type: ignore[arg-type]
    if inside:  # re-open the list message: its field header is 2 bytes for these sizes
        body = feature[2:] + inside
        feature = feature[:1] + varint(len(body)) + body + inside
    return feature


def test_any_valid_encoding_decodes_unpacked_reordered_merged_with_unknown_fields() -> None:
    s = sample(4, user_interests=[5, -6, 2**62], ad_age_hours=F32_MAX, slot=9)
    want = samples_to_record_batch([s], SCHEMA)
    values = sample_values(s)
    unknown = tag(15, 0) + varint(1) + tag(16, 5) + b"abcd" + tag(17, 1) + b"12345678"
    group = tag(18, 3) + tag(19, 0) + varint(7) + tag(20, 3) + tag(20, 4) + ld(5, b"x") + tag(18, 4)
    plain = [entry(k, _feature(k, v)) for k, v in values.items()]
    variants = {
        "unpacked": example(entry(k, _feature(k, v, packed=False)) for k, v in values.items()),
        "keys in reverse order": example(reversed(plain)),
        "unknown fields at every level but the map entry": ld(
            1,
            b"".join(
                unknown + ld(1, entry(k, _feature(k, v, inside=unknown + group))) + group
                for k, v in values.items()
            ),
        )
        + unknown
        + group,
        "two Features messages": example(plain[:5]) + example(plain[5:]),
        "one list over two Feature fields and two packed runs": example(
            [
                *(e for e, k in zip(plain, values, strict=True) if k != "user_interests"),
                ld(1, b"user_interests")
                + ld(2, ld(3, ld(1, varint(5))))
                + ld(2, ld(3, ld(1, varint(-6)) + ld(1, varint(2**62)))),
            ]
        ),
        "an entry's key given twice, the last wins": example(
            [
                *(e for e, k in zip(plain, values, strict=True) if k != "user_id"),
                ld(1, b"no such key") + ld(1, b"user_id") + ld(2, _feature("user_id", 9)),
            ]
        ),
        "a dropped entry (a field besides key and value) for no key of the spec": example(
            [*plain, entry("extra", int64_list([1])) + unknown]
        ),
        "value before key": example(
            ld(2, _feature(k, v)) + ld(1, k.encode()) for k, v in values.items()
        ),
        "an overlong varint": example(
            [
                *(e for e, k in zip(plain, values, strict=True) if k != "slot"),
                entry("slot", ld(3, tag(1, 0) + b"\x89\x80\x80\x80\x80\x80\x80\x80\x80\x00")),
            ]
        ),
    }
    for name, record in variants.items():
        assert parses(record), name
        out = decode([record])
        assert out.bad == [], name
        assert out.batch.equals(want), name


# -- refusals ---------------------------------------------------------------------------------

GOOD = reference_record(sample(), SPEC)


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (b"\xff\xff", "a varint at byte 0 is cut off by the end of its message (byte 2)"),
        (b"\x0a", "a varint at byte 1 is cut off by the end of its message (byte 1)"),
        (b"junk", "a length of 117 at byte 1 runs past the end of its message (byte 4)"),
        (b"\x0f", "a tag at byte 0 (field 1) has wire type 7, which does not exist"),
        (b"\x16\x00", "a tag at byte 0 (field 2) has wire type 6, which does not exist"),
        (b"\x00\x01", "a tag at byte 0 has field number 0"),
        (b"\x10" + b"\xff" * 10 + b"\x01", "a varint at byte 1 is longer than 10 bytes"),
        (b"\x80\x80\x80\x80\x10\x01", "a tag at byte 0 is longer than 5 bytes or 32 bits"),
        (b"\x88\x80\x80\x80\x80\x00\x01", "a tag at byte 0 is longer than 5 bytes or 32 bits"),
        (b"\x0c", "an end-group tag at byte 0 (field 1) closes no group"),
        (
            b"\x0b\x08\x01\x14",
            "an end-group tag at byte 3 (field 2) does not close the open group (field 1)",
        ),
        (
            b"\x0b\x08\x01",
            "a group at byte 0 (field 1) is not closed before the end of its message (byte 3)",
        ),
        (b"\x0a\x80\x80\x80\x80\x80\x00", "a length at byte 1 is longer than 5 bytes"),
        (
            b"\x0d\x01\x02",
            "a fixed32 value at byte 1 is cut off by the end of its message (byte 3)",
        ),
        (
            b"\x11\x01\x02",
            "a fixed64 value at byte 1 is cut off by the end of its message (byte 3)",
        ),
        (b"\x0b" * 101 + b"\x0c" * 101, "groups at byte 100 nest deeper than protobuf's limit"),
        (
            example([entry(b"\xff", int64_list([1]))]),
            "a key at byte 4 is not valid UTF-8",
        ),
        (
            example([ld(1, b"\xc0\x80") + ld(1, b"user_id") + ld(2, int64_list([1]))]),
            "a key at byte 4 is not valid UTF-8",
        ),
        (
            example([entry("ad_ctr_1h", ld(2, ld(1, b"\x00\x00\x80")))]),
            "a packed float list at byte 20 has a length of 3, not a multiple of 4",
        ),
        (
            example([entry("ad_ctr_1h", ld(2, tag(1, 5) + b"\x00\x00"))]),
            "a fixed32 value at byte 20 is cut off by the end of its message (byte 22)",
        ),
        (
            example([entry("user_interests", ld(3, ld(1, b"\x05\x85")))]),
            "a varint at byte 27 is cut off by the end of its message (byte 28)",
        ),
        (
            example([entry("user_interests", ld(3, ld(1, b"\x85" * 11)))]),
            "a varint at byte 26 is longer than 10 bytes",
        ),
        (
            example([entry("slot", ld(3, tag(1, 0)))]),  # an unpacked value's tag, no value
            "a varint at byte 15 is cut off by the end of its message (byte 15)",
        ),
        (
            GOOD[:-1],
            "a length of",
        ),
    ],
)
def test_a_record_that_is_no_valid_example_is_refused_saying_what_and_where(
    record: bytes, reason: str
) -> None:
    assert not parses(record)  # the reference parser refuses it too
    got = only_reason(record)
    assert got.startswith("not a valid Example: ")
    assert reason in got


def _groups(n: int) -> bytes:
    return tag(5, 3) * n + tag(5, 4) * n


@pytest.mark.parametrize(("level", "limit"), [(0, 100), (1, 99), (3, 97), (4, 96)])
def test_unknown_groups_nest_as_deep_as_protobuf_allows_at_each_level(
    level: int, limit: int
) -> None:
    feats = reference_features(sample(), SPEC)

    def record(n: int) -> bytes:
        inner = {k: f for k, f in feats.items()}
        if level == 3:  # inside a Feature
            inner["slot"] = feats["slot"] + _groups(n)
        elif level == 4:  # inside an Int64List
            inner["slot"] = ld(3, ld(1, varint(9)) + _groups(n))
        body = b"".join(ld(1, entry(k, f)) for k, f in inner.items())
        if level == 1:
            body += _groups(n)
        return ld(1, body) + (_groups(n) if level == 0 else b"")

    assert parses(record(limit))
    assert decode([record(limit)]).bad == []
    assert not parses(record(limit + 1))
    assert "nest deeper than protobuf's limit of 100" in only_reason(record(limit + 1))


S = sample()
_SPEC_CASES: list[tuple[bytes, str]] = [
    (
        example([*entries(S), entry("clk", int64_list([1]))]),
        "unknown key 'clk'",
    ),
    (
        example([*entries(S), ld(2, int64_list([1]))]),  # an entry without a key: ''
        "unknown key ''",
    ),
    (
        example([*entries(S), entry("user_id", int64_list([2]))]),
        "duplicate key 'user_id' (feature user_id): a second entry at byte",
    ),
    (
        example(e for e in entries(S) if not e.startswith(ld(1, b"user_id"))),
        "missing key 'user_id' (feature user_id)",
    ),
    (
        example(e for e in entries(S) if not e.startswith(ld(1, b"label") + b"\x12")),
        "missing key 'label' (field label)",
    ),
    (
        example(
            [
                *(e for e in entries(S) if not e.startswith(ld(1, b"ad_id"))),
                entry("ad_id", int64_list([1])) + tag(9, 0) + varint(1),
            ]
        ),
        "missing key 'ad_id' (feature ad_id); its entry at byte",
    ),
    (
        example(entries(S, user_id=bytes_list([b"x"]))),
        "key 'user_id' (feature user_id): expected an int64_list of one value, got a bytes_list",
    ),
    (
        example(entries(S, user_id=float_list([1.0]))),
        "key 'user_id' (feature user_id): expected an int64_list of one value, got a float_list",
    ),
    (
        example(entries(S, user_interests=float_list([1.0]))),
        "key 'user_interests' (feature user_interests): expected an int64_list, got a float_list",
    ),
    (
        example(entries(S, ad_ctr_1h=int64_list([1]))),
        "key 'ad_ctr_1h' (feature ad_ctr_1h): expected a float_list of one value, got a int64_list",
    ),
    (
        example(entries(S, user_id=b"")),
        "key 'user_id' (feature user_id): expected an int64_list of one value, got a Feature with "
        "no list",
    ),
    (
        example(entries(S, user_id=int64_list([1]) + float_list([1.0]))),
        "key 'user_id' (feature user_id): expected an int64_list of one value, got a Feature with "
        "more than one list (float_list and int64_list)",
    ),
    (
        example(
            [
                *(e for e in entries(S) if not e.startswith(ld(1, b"slot"))),
                ld(1, b"slot") + ld(2, float_list([1.0])) + ld(2, int64_list([1])),
            ]
        ),
        "key 'slot' (feature slot): expected an int64_list of one value, got a Feature with more "
        "than one list (float_list and int64_list)",
    ),
    (
        example(entries(S, sample_id=int64_list([1, 2]))),
        "key 'sample_id' (field sample_id): expected an int64_list of one value, got 2 values",
    ),
    (
        example(entries(S, device=int64_list([]))),
        "key 'device' (feature device): expected an int64_list of one value, got 0 values",
    ),
    (
        example(entries(S, user_activity=float_list([1.0, 2.0]))),
        "key 'user_activity' (feature user_activity): expected a float_list of one value, "
        "got 2 values",
    ),
    (
        example(entries(S, label=int64_list([2]))),
        "key 'label' (field label): expected 0 or 1, got 2",
    ),
    (
        example(entries(S, is_correction=int64_list([-1]))),
        "key 'is_correction' (field is_correction): expected 0 or 1, got -1",
    ),
    (
        example(entries(S, user_interests=int64_list(range(1500)))),
        "key 'user_interests' (feature user_interests): too many ids: 1500 > max_ids 1024",
    ),
    (
        example(entries(S, ad_age_hours=float_list([float("nan")]))),
        "key 'ad_age_hours' (feature ad_age_hours): expected a finite float32, got nan",
    ),
    (
        example(entries(S, ad_age_hours=float_list([float("-inf")], packed=False))),
        "key 'ad_age_hours' (feature ad_age_hours): expected a finite float32, got -inf",
    ),
]


@pytest.mark.parametrize(("record", "reason"), _SPEC_CASES, ids=[r for _, r in _SPEC_CASES])
def test_a_record_that_breaks_the_spec_is_refused_naming_the_key_and_the_field(
    record: bytes, reason: str
) -> None:
    assert parses(record)  # valid protobuf: the spec refuses it
    got = only_reason(record)
    assert got.startswith(reason), got


def test_a_wire_error_is_reported_before_a_spec_violation_earlier_in_the_record() -> None:
    record = example([entry("clk", int64_list([1]))]) + b"\x0f"
    assert only_reason(record).startswith("not a valid Example: a tag at byte")


def test_refused_records_leave_the_others_in_order_with_their_input_indices() -> None:
    samples = build_samples(SCHEMA, 6, seed=2)
    good = [reference_record(s, SPEC) for s in samples]
    records = [good[0], b"\x0a", good[1], good[2], example([]), good[3], good[4], good[5]]
    out = decode(records)
    assert out.rows.tolist() == [0, 2, 3, 5, 6, 7]
    assert [i for i, _ in out.bad] == [1, 4]
    assert out.batch.equals(samples_to_record_batch(samples, SCHEMA))


def test_nothing_good_gives_an_empty_batch_of_the_schema() -> None:
    for records in ([], [b"\x0a", b""]):
        out = decode(records)
        assert out.batch.num_rows == 0
        assert out.batch.schema == arrow_schema(SCHEMA)
        assert out.batch.schema.metadata == arrow_schema(SCHEMA).metadata
        assert out.rows.tolist() == []


def test_max_ids_bounds_each_list_and_a_list_at_the_bound_is_accepted() -> None:
    spec = ExampleSpec.build(SCHEMA, max_ids=3)
    at = reference_record(sample(1, user_interests=[1, 2, 3]), spec)
    over = reference_record(sample(2, user_interests=[1, 2, 3, 4]), spec)
    out = decode([at, over], spec)
    assert out.rows.tolist() == [0]
    assert out.bad == [
        (1, "key 'user_interests' (feature user_interests): too many ids: 4 > max_ids 3")
    ]
    assert DEFAULT_MAX_IDS == 1024
    assert SPEC.max_ids == 1024


def test_decoding_refuses_what_is_not_a_sequence_of_records() -> None:
    with pytest.raises(
        CodecError, match="expected a sequence of records \\(bytes\\), got one bytes"
    ):
        examples_to_record_batch(GOOD, SPEC)
    with pytest.raises(CodecError, match="expected a sequence of bytes, got str at index 1"):
        examples_to_record_batch([GOOD, "text"], SPEC)  # type: ignore[list-item]


def test_a_schema_with_several_list_and_dense_features_decodes_each_column() -> None:
    schema = Schema(
        (
            FeatureSpec("a", "multi_sparse"),
            FeatureSpec("x", "dense"),
            FeatureSpec("b", "multi_sparse"),
            FeatureSpec("y", "dense"),
        )
    )
    spec = ExampleSpec.build(schema, {"a": "zz", "b": "aa"})
    rng = random.Random(4)
    samples = [
        Sample(
            i,
            i,
            i,
            i % 2,
            False,
            -1,
            {
                "a": [rng.randrange(-9, 2**40) for _ in range(rng.randrange(4))],
                "x": float(np.float32(rng.random())),
                "b": [rng.randrange(300) for _ in range(rng.randrange(4))],
                "y": -1.5,
            },
        )
        for i in range(50)
    ]
    rb = samples_to_record_batch(samples, schema)
    records = record_batch_to_examples(rb, spec)
    assert records == [reference_record(s, spec) for s in samples]
    # one bad record in the middle must not shift the lists of the next ones
    out = decode([*records[:20], example([]), *records[20:]], spec)
    assert out.batch.equals(rb)


# -- the spec ---------------------------------------------------------------------------------


def test_a_spec_maps_every_name_to_a_key_defaulting_to_the_name() -> None:
    spec = ExampleSpec.build(SCHEMA, {"label": "clicked"})
    assert list(spec.keys) == [*arrow_schema(SCHEMA).names]
    assert spec.keys["label"] == "clicked"
    assert spec.keys["user_id"] == "user_id"
    assert spec == ExampleSpec.build(SCHEMA, {"label": "clicked"})
    assert hash(spec) == hash(ExampleSpec.build(SCHEMA, {"label": "clicked"}))
    assert spec != SPEC


@pytest.mark.parametrize(
    ("keys", "max_ids", "field", "message"),
    [
        ({"nope": "x"}, 8, "where.keys.nope", "the name of a sample field or feature"),
        ({"label": ""}, 8, "where.keys.label", "a non-empty string, got ''"),
        ({"label": 3}, 8, "where.keys.label", "a non-empty string, got 3 (int)"),
        ({"label": "\ud800"}, 8, "where.keys.label", "a key that encodes as UTF-8"),
        (
            {"label": "user_id"},
            8,
            "where.keys.label",
            "a key no other name has ('user_id' has 'user_id' too), got 'user_id'",
        ),
        (
            {"label": "k", "ad_id": "k"},
            8,
            "where.keys.ad_id",
            "a key no other name has ('label' has 'k' too), got 'k'",
        ),
        ({}, 0, "where.max_ids", "int >= 1, got 0"),
        ({}, True, "where.max_ids", "int >= 1, got True"),
    ],
)
def test_a_bad_spec_fails_naming_the_field(
    keys: dict[str, object], max_ids: int, field: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=f"config field '{field}'") as info:
        ExampleSpec.build(SCHEMA, keys, max_ids, where="where")  # type: ignore[arg-type]
    assert info.value.field == field
    assert message in str(info.value)


def test_a_spec_built_directly_must_name_every_field_and_feature() -> None:
    keys = dict(SPEC.keys)
    del keys["label"]
    with pytest.raises(ConfigError, match=r"'ExampleSpec.keys'.*missing \['label'\]"):
        ExampleSpec(SCHEMA, keys, 4)
    assert ExampleSpec(SCHEMA, dict(SPEC.keys), DEFAULT_MAX_IDS) == SPEC


# -- TFRecord framing -------------------------------------------------------------------------


def test_framing_is_byte_for_byte_what_tensorflows_writer_writes(tmp_path: Path) -> None:
    path = tmp_path / "data.tfrecord"
    writer = TFRecordWriter(str(path))
    datums = [
        {"a": (i, "int"), "b": ([0.5] * i, "float"), "c": (b"x" * (i * 40), "byte")}
        for i in range(12)
    ]
    for d in datums:
        writer.write(d)
    writer.close()
    records = [TFRecordWriter.serialize_tf_example(d) for d in datums]
    assert encode_tfrecords(records) == path.read_bytes()
    assert split_tfrecords(path.read_bytes()) == (records, [])
    assert encode_tfrecords([]) == b""
    assert split_tfrecords(b"") == ([], [])
    assert split_tfrecords(encode_tfrecords([b""])) == ([b""], [])


def _frames() -> tuple[list[bytes], bytes, list[int]]:
    records = [bytes([i]) * (10 * i + 3) for i in range(5)]
    data = encode_tfrecords(records)
    starts = [0]
    for r in records:
        starts.append(starts[-1] + 16 + len(r))
    return records, data, starts


def test_a_data_crc_mismatch_refuses_that_record_only() -> None:
    records, data, starts = _frames()
    broken = bytearray(data)
    broken[starts[2] + 12 + 5] ^= 0x01
    got, bad = split_tfrecords(bytes(broken))
    assert got == records[:2] + records[3:]
    assert bad == [(2, f"record 2 at byte {starts[2]}: the data's crc does not match")]
    broken = bytearray(data)
    broken[starts[3] - 1] ^= 0x80  # the data crc itself
    assert split_tfrecords(bytes(broken))[1] == [
        (2, f"record 2 at byte {starts[2]}: the data's crc does not match")
    ]


def test_a_length_crc_mismatch_or_a_truncated_frame_refuses_the_rest() -> None:
    records, data, starts = _frames()
    broken = bytearray(data)
    broken[starts[3]] ^= 0x04  # the length of record 3
    got, bad = split_tfrecords(bytes(broken))
    assert got == records[:3]
    assert bad == [
        (
            3,
            f"record 3 at byte {starts[3]}: the length's crc does not match; the framing is lost, "
            f"and the rest of the message ({len(data) - starts[3]} bytes) with it",
        )
    ]
    cut = data[: starts[4] + 20]
    got, bad = split_tfrecords(cut)
    assert got == records[:4]
    assert bad == [
        (
            4,
            f"record 4 at byte {starts[4]}: a truncated frame (length 43, 8 bytes after the "
            "header, the data and its crc take 47); the framing is lost",
        )
    ]
    got, bad = split_tfrecords(data[: starts[1] + 5])
    assert got == records[:1]
    assert bad == [
        (
            1,
            f"record 1 at byte {starts[1]}: a truncated header (5 bytes, a header takes 12); "
            "the framing is lost",
        )
    ]


def test_framing_refuses_what_is_not_bytes() -> None:
    with pytest.raises(CodecError, match="tfrecord: expected bytes, got int"):
        split_tfrecords(5)  # type: ignore[arg-type]
    with pytest.raises(
        CodecError, match="tfrecord: expected a sequence of bytes, got str at index 0"
    ):
        encode_tfrecords(["x"])  # type: ignore[list-item]
    with pytest.raises(
        CodecError, match="expected a sequence of records \\(bytes\\), got one bytes"
    ):
        encode_tfrecords(b"abc")
    assert split_tfrecords(bytearray(encode_tfrecords([b"ab"]))) == ([b"ab"], [])
    assert struct.calcsize("<QI") == 12
