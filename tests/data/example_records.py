"""tf.train.Example records for the codec tests, built without the codec under test.

``reference_record`` builds a sample's Example with TensorFlow's messages (the reference
``tfrecord.example_pb2``); the wire functions write any encoding by hand (unpacked lists, keys in
any order, unknown fields, broken bytes); ``scan`` reads a record the reference parser accepts
and reports what the codec refuses beyond protobuf (a key twice, a Feature with two lists).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass

import pytest
from tfrecord import example_pb2 as ref

from minutely.data.arrow import samples_to_record_batch
from minutely.data.example import ExampleSpec, examples_to_record_batch, record_batch_to_examples
from minutely.data.samples import Sample
from minutely.schema import default_schema


@pytest.fixture(scope="module", autouse=True)
def compiled_kernels() -> None:
    """Numba compiles the codec's kernels on first use (seconds; cached next to the module
    afterwards): that happens here, in set-up, rather than inside the first test that decodes."""
    spec = ExampleSpec.build(default_schema())
    examples_to_record_batch([b""], spec)
    feats = {f.name: ([1] if f.kind == "multi_sparse" else 1) for f in spec.schema.features}
    rb = samples_to_record_batch([Sample(1, 1, 1, 0, False, -1, feats)], spec.schema)
    record_batch_to_examples(rb, spec)


# -- wire writing ---------------------------------------------------------------------------


def varint(v: int) -> bytes:
    """A protobuf varint (negative int64 values as their two's complement, 10 bytes)."""
    v &= (1 << 64) - 1
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def tag(field: int, wire_type: int) -> bytes:
    return varint(field << 3 | wire_type)


def ld(field: int, body: bytes) -> bytes:
    """A length-delimited field."""
    return tag(field, 2) + varint(len(body)) + body


def int64_list(values: Iterable[int], packed: bool = True) -> bytes:
    """A Feature holding an Int64List."""
    values = list(values)
    if packed:
        body = ld(1, b"".join(varint(v) for v in values)) if values else b""
    else:
        body = b"".join(tag(1, 0) + varint(v) for v in values)
    return ld(3, body)


def float_list(values: Iterable[bytes | float], packed: bool = True) -> bytes:
    """A Feature holding a FloatList; a value is a float or its 4 bytes (little endian)."""
    raw = [v if isinstance(v, bytes) else _f32(v) for v in values]
    body = ld(1, b"".join(raw)) if packed and raw else b"".join(tag(1, 5) + r for r in raw)
    return ld(2, body)


def bytes_list(values: Iterable[bytes]) -> bytes:
    return ld(1, b"".join(ld(1, v) for v in values))


def entry(key: str | bytes, feature: bytes) -> bytes:
    """One map entry of Features (key, then the Feature)."""
    k = key.encode() if isinstance(key, str) else key
    return ld(1, k) + ld(2, feature)


def example(entries: Iterable[bytes]) -> bytes:
    """An Example of the given map entries (each from :func:`entry`)."""
    return ld(1, b"".join(ld(1, e) for e in entries))


def _f32(v: float) -> bytes:
    return struct.pack("<f", v)


# -- samples <-> reference messages ---------------------------------------------------------


def sample_values(s: Sample) -> dict[str, int | float | list[int]]:
    """Every field and feature of a sample by name (flags as 0/1)."""
    out: dict[str, int | float | list[int]] = {
        "sample_id": s.sample_id,
        "event_ts_ms": s.event_ts_ms,
        "emit_ts_ms": s.emit_ts_ms,
        "label": s.label,
        "is_correction": int(s.is_correction),
        "label_ts_ms": s.label_ts_ms,
    }
    out.update(s.features)
    return out


def reference_features(s: Sample, spec: ExampleSpec) -> dict[str, bytes]:
    """Each key's Feature bytes as the reference serializes them, in spec order."""
    kinds = {f.name: f.kind for f in spec.schema.features}
    out = {}
    for name, value in sample_values(s).items():
        feature = ref.Feature()
        if kinds.get(name) == "dense":
            feature.float_list.value.append(float(value))  # type: ignore[arg-type]
        elif kinds.get(name) == "multi_sparse":
            feature.int64_list.value.extend(value)  # type: ignore[arg-type]
        else:
            feature.int64_list.value.append(value)  # type: ignore[arg-type]
        out[spec.keys[name]] = feature.SerializeToString(deterministic=True)
    return out


def reference_record(s: Sample, spec: ExampleSpec) -> bytes:
    """The sample's Example as TensorFlow's message serializes it deterministically."""
    ex = ref.Example()
    for key, feature in reference_features(s, spec).items():
        ex.features.feature[key].ParseFromString(feature)
    return ex.SerializeToString(deterministic=True)


def expected_row(
    message: ref.Example, spec: ExampleSpec
) -> dict[str, int | float | list[int]] | None:
    """What the spec reads from a parsed Example (by name), or None if it breaks the spec: a
    plain check of the rules, independent of the codec."""
    feats = message.features.feature
    if set(feats) != set(spec.keys.values()):
        return None
    kinds = {f.name: f.kind for f in spec.schema.features}
    row: dict[str, int | float | list[int]] = {}
    for name, key in spec.keys.items():
        f = feats[key]
        which = f.WhichOneof("kind")
        kind = kinds.get(name, "flag" if name in ("label", "is_correction") else "sparse")
        if kind == "dense":
            if which != "float_list" or len(f.float_list.value) != 1:
                return None
            v = f.float_list.value[0]
            if not math.isfinite(v):
                return None
            row[name] = v
        elif which != "int64_list":
            return None
        elif kind == "multi_sparse":
            if len(f.int64_list.value) > spec.max_ids:
                return None
            row[name] = list(f.int64_list.value)
        else:
            if len(f.int64_list.value) != 1:
                return None
            v = f.int64_list.value[0]
            if kind == "flag" and v not in (0, 1):
                return None
            row[name] = v
    return row


# -- wire reading ---------------------------------------------------------------------------


@dataclass
class Scan:
    """What a record holds beyond its protobuf value."""

    duplicate_key: bool = False  # a key in two kept map entries
    many_lists: bool = False  # a kept entry whose Feature(s) hold more than one list


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def varint(self, pos: int) -> tuple[int, int]:
        v = shift = 0
        while True:
            b = self.data[pos]
            pos += 1
            v |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return v, pos

    def fields(self, pos: int, end: int) -> Iterable[tuple[int, int, int, int]]:
        """(field, wire type, start of value, end of value) of each field in [pos, end)."""
        while pos < end:
            t, pos = self.varint(pos)
            field, wt = t >> 3, t & 7
            start = pos
            if wt == 0:
                _, pos = self.varint(pos)
            elif wt == 1:
                pos += 8
            elif wt == 5:
                pos += 4
            elif wt == 2:
                n, start = self.varint(pos)
                pos = start + n
            elif wt == 3:
                depth = 1
                while depth:
                    t2, pos = self.varint(pos)
                    if t2 & 7 == 3:
                        depth += 1
                    elif t2 & 7 == 4:
                        depth -= 1
                    else:
                        pos = self._skip(pos, t2 & 7)
            yield field, wt, start, pos

    def _skip(self, pos: int, wt: int) -> int:
        if wt == 0:
            return self.varint(pos)[1]
        if wt == 2:
            n, pos = self.varint(pos)
            return pos + n
        return pos + (8 if wt == 1 else 4)


def scan(record: bytes) -> Scan:
    """Scan a record that the reference parser accepts (protobuf semantics: an entry holding
    a field other than key and value is dropped; the last key of an entry wins)."""
    r = _Reader(record)
    out = Scan()
    keys: set[bytes] = set()
    for field, wt, a, b in r.fields(0, len(record)):
        if (field, wt) != (1, 2):
            continue
        for f2, wt2, a2, b2 in r.fields(a, b):
            if (f2, wt2) != (1, 2):
                continue
            key = b""
            lists: set[int] = set()
            kept = True
            for f3, wt3, a3, b3 in r.fields(a2, b2):
                if (f3, wt3) == (1, 2):
                    key = record[a3:b3]
                elif (f3, wt3) == (2, 2):
                    for f4, wt4, _, _ in r.fields(a3, b3):
                        if wt4 == 2 and f4 in (1, 2, 3):
                            lists.add(f4)
                else:
                    kept = False
            if not kept:
                continue
            if key in keys:
                out.duplicate_key = True
            keys.add(key)
            if len(lists) > 1:
                out.many_lists = True
    return out
