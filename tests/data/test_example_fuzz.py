"""Fuzzing the Example decoder: mutated records against the reference protobuf parser.

Valid records in many encodings are mutated (bit flips, truncations, splices, random bytes,
inserted and overwritten bytes, wrong list types, duplicate keys, too many ids, unknown fields)
and decoded in batches. Every record must be accounted for; a record the reference parser
refuses must be refused as not a valid Example; a record it accepts must be delivered with the
reference's values exactly when a plain check of the spec accepts it (and no key is given twice
and no Feature holds two lists, which the codec refuses beyond protobuf), refused otherwise.
"""

from __future__ import annotations

import random
import struct

import numpy as np
from example_records import (
    bytes_list,
    compiled_kernels,  # noqa: F401 (an autouse fixture: the kernels compile in set-up)
    entry,
    example,
    expected_row,
    float_list,
    int64_list,
    ld,
    reference_features,
    reference_record,
    sample_values,
    scan,
    tag,
    varint,
)
from google.protobuf.message import DecodeError
from tfrecord import example_pb2 as ref

from minutely.data.example import ExampleSpec, examples_to_record_batch
from minutely.data.samples import Sample
from minutely.schema import default_schema

SCHEMA = default_schema()
SPEC = ExampleSpec.build(SCHEMA, {"label": "clicked", "user_id": "uid"}, max_ids=8)
KINDS = {f.name: f.kind for f in SCHEMA.features}
N_RECORDS = 10_000
# Tags of the fields Example uses and of others, group markers, lengths, varint bytes.
_WIRE_BYTES = bytes(
    [0x0A, 0x12, 0x1A, 0x08, 0x0D, 0x0B, 0x0C, 0x13, 0x14, 0x2B, 0x2C, 0x00, 0x01, 0x80, 0xFF, 0x7F]
)
BATCH = 700


def _sample(rng: random.Random, sid: int) -> Sample:
    feats: dict[str, object] = {}
    for f in SCHEMA.features:
        if f.kind == "sparse":
            feats[f.name] = rng.choice([rng.randrange(-(2**63), 2**63), rng.randrange(300)])
        elif f.kind == "multi_sparse":
            feats[f.name] = [rng.randrange(-5, 2**35) for _ in range(rng.randrange(10))]
        else:
            bits = rng.getrandbits(32)
            value = struct.unpack("<f", struct.pack("<I", bits))[0]
            feats[f.name] = value if np.isfinite(value) else rng.random()
    label = rng.randrange(2)
    return Sample(sid, rng.randrange(2**41), rng.randrange(2**41), label, bool(label), -1, feats)  # type: ignore[arg-type]


def _hand_built(rng: random.Random, s: Sample) -> bytes:
    """The sample in another valid encoding: shuffled keys, unpacked lists, unknown fields."""
    parts = []
    for name, value in sample_values(s).items():
        key = SPEC.keys[name]
        packed = rng.random() < 0.5
        if KINDS.get(name) == "dense":
            feature = float_list([value], packed)  # type: ignore[list-item]
        else:
            ids = value if KINDS.get(name) == "multi_sparse" else [value]
            feature = int64_list(ids, packed)  # type: ignore[arg-type]
        if rng.random() < 0.2:
            feature += tag(rng.randrange(4, 30), 0) + varint(rng.randrange(1000))
        parts.append(entry(key, feature))
    rng.shuffle(parts)
    record = example(parts)
    if rng.random() < 0.3:
        record += tag(rng.randrange(2, 50), 5) + rng.randbytes(4)
    return record


def _mutate(rng: random.Random, record: bytes, other: bytes, s: Sample) -> bytes:
    kind = rng.randrange(13)
    data = bytearray(record)
    if kind == 0 or not data:
        return record
    if kind == 1:  # bit flips
        for _ in range(rng.randrange(1, 4)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        return bytes(data)
    if kind == 2:  # truncation
        return record[: rng.randrange(len(record))]
    if kind == 3:  # splice
        return record[: rng.randrange(len(record) + 1)] + other[rng.randrange(len(other) + 1) :]
    if kind == 4:  # random bytes
        return rng.randbytes(rng.randrange(60))
    if kind == 5:  # bytes inserted or deleted
        i = rng.randrange(len(data))
        if rng.random() < 0.5:
            return bytes(data[:i] + rng.randbytes(rng.randrange(1, 4)) + data[i:])
        return bytes(data[:i] + data[i + rng.randrange(1, 4) :])
    if kind == 6:  # bytes overwritten
        i = rng.randrange(len(data))
        data[i] = rng.randrange(256)
        return bytes(data)
    if kind == 12:  # bytes that read as tags, lengths and group markers, inserted
        i = rng.randrange(len(data) + 1)
        return bytes(data[:i] + bytes(rng.choices(_WIRE_BYTES, k=rng.randrange(1, 4))) + data[i:])
    feats = reference_features(s, SPEC)
    key = rng.choice(list(feats))
    if kind == 7:  # a wrong type, or a wrong number of values
        feats[key] = rng.choice(
            [
                bytes_list([b"x"]),
                float_list([1.0]),
                float_list([1.0, 2.0]),
                int64_list([1]),
                int64_list([]),
                int64_list([0, 1]),
                int64_list([2]),
                float_list([float("nan")]),
                b"",
                int64_list([1]) + float_list([1.0]),
            ]
        )
        return example(entry(k, f) for k, f in feats.items())
    if kind == 8:  # a key twice
        parts = [entry(k, f) for k, f in feats.items()]
        parts.insert(rng.randrange(len(parts) + 1), entry(key, feats[key]))
        return example(parts)
    if kind == 9:  # too many ids (or just enough)
        feats["user_interests"] = int64_list(range(rng.randrange(7, 14)))
        return example(entry(k, f) for k, f in feats.items())
    if kind == 10:  # an unknown key, or a dropped entry (a field besides key and value)
        extra = entry(rng.choice(["extra", "uid2", ""]), int64_list([1]))
        if rng.random() < 0.5:
            extra += tag(3, 0) + varint(1)
        return example([*(entry(k, f) for k, f in feats.items()), extra])
    # a key's entry holding an unknown field (dropped by protobuf: the key goes missing)
    return example(
        entry(k, f) + (tag(7, 0) + varint(1) if k == key else b"") for k, f in feats.items()
    )


def _expectation(record: bytes) -> tuple[str, dict[str, object] | None]:
    try:
        message = ref.Example.FromString(record)
    except DecodeError:
        return "invalid", None
    flags = scan(record)
    if flags.duplicate_key or flags.many_lists:
        return "refused", None
    row = expected_row(message, SPEC)
    return ("good", row) if row is not None else ("refused", None)


def test_mutated_records_are_refused_or_delivered_as_the_reference_reads_them() -> None:
    rng = random.Random(20240611)
    samples = [_sample(rng, i) for i in range(N_RECORDS)]
    bases = [
        reference_record(s, SPEC) if rng.random() < 0.5 else _hand_built(rng, s) for s in samples
    ]
    records = [
        _mutate(rng, bases[i], bases[rng.randrange(N_RECORDS)], s) for i, s in enumerate(samples)
    ]
    records[:3] = [b"", b"\x0a\x00", ld(1, b"")]  # empty ones too
    expected = [_expectation(r) for r in records]
    counts = {"good": 0, "refused": 0, "invalid": 0}
    for start in range(0, N_RECORDS, BATCH):
        chunk = records[start : start + BATCH]
        out = examples_to_record_batch(chunk, SPEC)
        assert len(out.rows) + len(out.bad) == len(chunk)
        reasons = dict(out.bad)
        columns = {name: out.batch.column(name).to_pylist() for name in SPEC.keys}
        delivered = {int(i): k for k, i in enumerate(out.rows)}
        for j, record in enumerate(chunk):
            what, row = expected[start + j]
            counts[what] += 1
            if what == "good":
                assert j in delivered, (record, reasons.get(j))
                got = {name: columns[name][delivered[j]] for name in SPEC.keys}
                assert got == row, record
            else:
                assert j in reasons, (what, record)
                if what == "invalid":
                    assert reasons[j].startswith("not a valid Example: "), (record, reasons[j])
                else:
                    assert not reasons[j].startswith("not a valid Example"), (record, reasons[j])
    # The fuzz found plenty of each kind to test.
    assert counts["good"] > 1_000, counts
    assert counts["refused"] > 1_000, counts
    assert counts["invalid"] > 1_000, counts
