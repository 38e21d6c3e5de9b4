"""Samples as TensorFlow tf.train.Example records: a bulk codec, and TFRecord framing.

An :class:`ExampleSpec` maps every column of a sample batch (:func:`~minutely.data.arrow.
arrow_schema`) onto an Example key: the fixed fields (``sample_id``, ``event_ts_ms``,
``emit_ts_ms``, ``label``, ``is_correction``, ``label_ts_ms``) and the sparse features are an
``int64_list`` of one value (``label`` and ``is_correction`` 0 or 1), a ``multi_sparse`` feature
an ``int64_list`` of 0 to ``max_ids`` ids, a ``dense`` feature a ``float_list`` of one finite
float32. Keys default to the names; ``ExampleSpec.build`` takes overrides.

:func:`record_batch_to_examples` writes, byte for byte, what protobuf's deterministic
serialization gives (packed lists, keys in the order Python's protobuf writes map keys: by
their bytes, and of two keys where one begins the other the longer first), and
:func:`examples_to_record_batch` reads any valid encoding: packed or not, keys in any order,
unknown fields skipped. A record that is not a valid Example (the bytes Python's protobuf parser
refuses), or that breaks the spec, is refused with its reason and the others go on. Beyond what
protobuf itself checks, a key given twice and a Feature holding more than one list are refused
(protobuf would keep the last silently); a map entry holding a field other than its key and value
is dropped, as Python's protobuf (upb) drops it. Both directions run in numba kernels
(:mod:`minutely.data._example_kernels`, compiled on first use and cached next to the module) over
one buffer for the whole batch: no Python work per value.

:func:`encode_tfrecords` and :func:`split_tfrecords` are TensorFlow's TFRecord framing (length,
masked crc32c of the length, data, masked crc32c of the data).

>>> from minutely.data.arrow import samples_to_record_batch
>>> from minutely.data.samples import Sample
>>> from minutely.schema import default_schema
>>> schema = default_schema()
>>> spec = ExampleSpec.build(schema, {"label": "clicked"})
>>> feats = {f.name: ([1, 2] if f.kind == "multi_sparse" else 1) for f in schema.features}
>>> rb = samples_to_record_batch([Sample(7, 1_000, 61_000, 1, False, 5_000, feats)], schema)
>>> records = record_batch_to_examples(rb, spec)
>>> out = examples_to_record_batch([*records, b"\\x0a\\x00"], spec)
>>> out.batch.equals(rb), out.rows.tolist(), out.bad
(True, [0], [(1, "missing key 'sample_id' (field sample_id)")])
>>> split_tfrecords(encode_tfrecords(records)) == (records, [])
True
"""

from __future__ import annotations

import functools
import importlib
import itertools
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import crc32c
import numpy as np
import numpy.typing as npt
import pyarrow as pa

from minutely.config import FrozenMap
from minutely.data.arrow import _FIXED_COLUMNS, arrow_schema, check_record_batch
from minutely.errors import CodecError, ConfigError
from minutely.schema import Schema

__all__ = [
    "DEFAULT_MAX_IDS",
    "DecodedExamples",
    "ExampleSpec",
    "encode_tfrecords",
    "examples_to_record_batch",
    "record_batch_to_examples",
    "split_tfrecords",
]

DEFAULT_MAX_IDS = 1024

_FIXED_NAMES: tuple[str, ...] = tuple(name for name, _ in _FIXED_COLUMNS)
_FLAG_NAMES = frozenset({"label", "is_correction"})
# The kernels' slot kinds (minutely.data._example_kernels), repeated here so that building a
# spec does not import numba.
_KIND_INT, _KIND_FLAG, _KIND_MULTI, _KIND_DENSE = 0, 1, 2, 3
_FEATURE_KINDS = {"sparse": _KIND_INT, "multi_sparse": _KIND_MULTI, "dense": _KIND_DENSE}
_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_U64 = 0xFFFFFFFFFFFFFFFF


@functools.cache
def _kernels() -> ModuleType:
    """The numba kernels, imported (and compiled or loaded from the cache) on first use."""
    return importlib.import_module("minutely.data._example_kernels")


@dataclass(frozen=True)
class _Tables:
    """A spec as the kernels take it; slots are the batch's columns in arrow_schema order."""

    names: tuple[str, ...]
    keys: tuple[str, ...]
    skind: npt.NDArray[np.int64]  # slot kind (_KIND_*)
    scol: npt.NDArray[np.int64]  # the slot's row in its kind's output array
    n_int: int
    n_multi: int
    n_dense: int
    table: npt.NDArray[np.int64]  # open-addressing hash table of the keys -> slot (-1 empty)
    kbytes: npt.NDArray[np.uint8]  # the keys' UTF-8 bytes, slot after slot
    koff: npt.NDArray[np.int64]  # slot s's key is kbytes[koff[s]:koff[s + 1]]
    follow: npt.NDArray[np.int64]  # the slot after s in sorted key order (cyclic); [K]: first
    okind: npt.NDArray[np.int64]  # slot kinds in the order the keys are written
    ocol: npt.NDArray[np.int64]
    plen: npt.NDArray[np.int64]  # per sorted key: len of its entry prefix 0A len key 12
    prefix: npt.NDArray[np.uint8]
    poff: npt.NDArray[np.int64]


def _varint(v: int) -> bytes:
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def _key_hash(key: bytes) -> int:
    """FNV-1a, 64 bit, as the kernels compute it."""
    h = _FNV_OFFSET
    for b in key:
        h = ((h ^ b) * _FNV_PRIME) & _U64
    return h


def _slot_names(schema: Schema) -> tuple[str, ...]:
    arrow_schema(schema)  # SchemaError for a feature named like a fixed field
    return _FIXED_NAMES + tuple(f.name for f in schema.features)


def _checked_keys(
    schema: Schema, overrides: Mapping[str, str], max_ids: int, where: str
) -> dict[str, str]:
    """Every name's key (overrides applied), checked; ConfigError naming the field otherwise."""
    names = _slot_names(schema)
    if type(max_ids) is not int or max_ids < 1:
        raise ConfigError(f"{where}.max_ids", "int >= 1", max_ids)
    full = {name: name for name in names}
    for name, key in overrides.items():
        if name not in full:
            raise ConfigError(
                f"{where}.keys.{name}",
                f"the name of a sample field or feature ({', '.join(names)})",
                name,
            )
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{where}.keys.{name}", "a non-empty string", key)
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError(f"{where}.keys.{name}", "a key that encodes as UTF-8", key) from None
        full[name] = key
    owner: dict[str, str] = {}
    for name in names:
        key = full[name]
        if key in owner:
            culprit, other = (name, owner[key]) if name in overrides else (owner[key], name)
            raise ConfigError(
                f"{where}.keys.{culprit}",
                f"a key no other name has ({other!r} has {key!r} too)",
                key,
            )
        owner[key] = name
    return full


@dataclass(frozen=True)
class ExampleSpec:
    """How Example records map onto a schema's samples.

    ``keys`` maps every fixed field and feature name to its Example key (all of them, in
    arrow_schema order); ``max_ids`` is the most ids one multi_sparse feature may carry in one
    sample. Build one with :meth:`build`.
    """

    schema: Schema
    keys: Mapping[str, str]
    max_ids: int

    def __post_init__(self) -> None:
        names = _slot_names(self.schema)
        given = dict(self.keys)
        if set(given) != set(names):
            missing = [n for n in names if n not in given]
            extra = sorted(repr(n) for n in given if n not in set(names))
            raise ConfigError(
                "ExampleSpec.keys",
                f"a key for every sample field and feature, no more (missing {missing}, "
                f"extra [{', '.join(extra)}])",
                given,
            )
        checked = _checked_keys(self.schema, given, self.max_ids, "ExampleSpec")
        object.__setattr__(self, "keys", FrozenMap(checked))

    @classmethod
    def build(
        cls,
        schema: Schema,
        keys: Mapping[str, str] | None = None,
        max_ids: int = DEFAULT_MAX_IDS,
        *,
        where: str = "samples",
    ) -> ExampleSpec:
        """A spec for ``schema``; ``keys`` holds overrides (name -> Example key), and names not
        given keep their own name as key.

        Raises :class:`~minutely.errors.ConfigError` naming ``<where>.keys.<name>`` for a name
        that is neither a fixed field nor a feature, an empty key, or a key two names share, and
        ``<where>.max_ids`` for ``max_ids`` < 1.
        """
        return cls(schema, _checked_keys(schema, keys or {}, max_ids, where), max_ids)

    @functools.cached_property
    def _tables(self) -> _Tables:
        return _build_tables(self)


def _build_tables(spec: ExampleSpec) -> _Tables:
    names = _slot_names(spec.schema)
    kinds = [_KIND_FLAG if n in _FLAG_NAMES else _KIND_INT for n in _FIXED_NAMES]
    kinds += [_FEATURE_KINDS[f.kind] for f in spec.schema.features]
    counters = {_KIND_INT: 0, _KIND_MULTI: 0, _KIND_DENSE: 0}
    cols = []
    for kind in kinds:
        group = _KIND_INT if kind == _KIND_FLAG else kind  # flags are int64 rows too
        cols.append(counters[group])
        counters[group] += 1
    keys = tuple(spec.keys[n] for n in names)
    encoded = [k.encode("utf-8") for k in keys]
    size = 16
    while size < 4 * len(encoded):
        size *= 2
    table = np.full(size, -1, dtype=np.int64)
    for slot, key in enumerate(encoded):
        i = _key_hash(key) & (size - 1)
        while table[i] >= 0:
            i = (i + 1) & (size - 1)
        table[i] = slot
    # Python protobuf (upb) orders map keys bytewise, and of two keys where one is a prefix of
    # the other the longer first (a terminator above every byte value does that).
    order = sorted(range(len(names)), key=lambda s: (*encoded[s], 256))
    prefixes = [b"\x0a" + _varint(len(encoded[s])) + encoded[s] + b"\x12" for s in order]
    follow = [0] * (len(order) + 1)
    for here, after in zip(order, order[1:] + order[:1], strict=True):
        follow[here] = after
    follow[len(order)] = order[0]
    return _Tables(
        names=names,
        keys=keys,
        skind=np.array(kinds, dtype=np.int64),
        scol=np.array(cols, dtype=np.int64),
        n_int=counters[_KIND_INT],
        n_multi=counters[_KIND_MULTI],
        n_dense=counters[_KIND_DENSE],
        table=table,
        kbytes=np.array(bytearray(b"".join(encoded)), dtype=np.uint8),
        koff=np.cumsum([0, *map(len, encoded)], dtype=np.int64),
        follow=np.array(follow, dtype=np.int64),
        okind=np.array([kinds[s] for s in order], dtype=np.int64),
        ocol=np.array([cols[s] for s in order], dtype=np.int64),
        plen=np.array([len(p) for p in prefixes], dtype=np.int64),
        prefix=np.array(bytearray(b"".join(prefixes)), dtype=np.uint8),
        poff=np.cumsum([0, *map(len, prefixes)], dtype=np.int64),
    )


# -- encoding ---------------------------------------------------------------------------------


def record_batch_to_examples(rb: pa.RecordBatch, spec: ExampleSpec) -> list[bytes]:
    """One serialized Example per row of a sample batch (columns as ``arrow_schema(spec.schema)``).

    Lists are packed and keys sorted as Python's protobuf sorts map keys (by their bytes; of two
    keys where one begins the other, the longer first): byte for byte what its
    ``SerializeToString(deterministic=True)`` gives. Raises :class:`~minutely.errors.CodecError`
    for a batch whose columns do not match the schema, or a value the decoder would refuse (a
    label or is_correction other than 0 or 1, a dense value that is not finite, more than
    ``max_ids`` ids).
    """
    if not isinstance(rb, pa.RecordBatch):
        raise CodecError(f"examples: expected a pyarrow.RecordBatch, got {type(rb).__name__}")
    check_record_batch(rb, spec.schema, where="examples: record batch")
    n = rb.num_rows
    if n == 0:
        return []
    t = spec._tables
    ints = np.empty((t.n_int, n), dtype=np.int64)
    dense = np.empty((t.n_dense, n), dtype=np.uint32)
    moffs = np.empty((t.n_multi, n + 1), dtype=np.int64)
    parts: list[npt.NDArray[np.int64]] = []
    base = 0
    for slot, name in enumerate(t.names):
        col = rb.column(name)
        kind = int(t.skind[slot])
        c = int(t.scol[slot])
        if kind == _KIND_INT:
            ints[c] = col.to_numpy()
        elif kind == _KIND_FLAG:
            flags = col.to_numpy(zero_copy_only=False).astype(np.int64)
            _refuse_rows(rb, name, (flags != 0) & (flags != 1), flags, "0 or 1")
            ints[c] = flags
        elif kind == _KIND_DENSE:
            floats = col.to_numpy()
            _refuse_rows(rb, name, ~np.isfinite(floats), floats, "a finite float32")
            dense[c] = floats.view(np.uint32)
        else:
            offsets = col.offsets.to_numpy().astype(np.int64)
            lengths = np.diff(offsets)
            _refuse_rows(
                rb, name, lengths > spec.max_ids, lengths, f"at most max_ids {spec.max_ids} ids"
            )
            # .values ignores a sliced array's offset: take the part the rows cover.
            parts.append(col.values.to_numpy()[offsets[0] : offsets[-1]])
            moffs[c] = offsets - offsets[0] + base
            base += int(offsets[-1] - offsets[0])
    mvals = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    k = _kernels()
    features_size = np.empty(n, dtype=np.int64)
    sizes = np.empty(n, dtype=np.int64)
    msize = np.empty((t.n_multi, n), dtype=np.int64)
    k.encode_sizes(ints, mvals, moffs, t.okind, t.ocol, t.plen, features_size, sizes, msize)
    offsets_out = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets_out[1:])
    out = np.empty(int(offsets_out[-1]), dtype=np.uint8)
    k.encode_write(
        ints,
        dense,
        mvals,
        moffs,
        t.okind,
        t.ocol,
        t.plen,
        t.prefix,
        t.poff,
        features_size,
        msize,
        offsets_out,
        out,
    )
    data = out.tobytes()
    bounds = offsets_out.tolist()
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def _refuse_rows(
    rb: pa.RecordBatch,
    name: str,
    bad: npt.NDArray[np.bool_],
    values: npt.NDArray[Any],
    expected: str,
) -> None:
    """CodecError naming the first row where ``bad`` holds."""
    if not bad.any():
        return
    i = int(np.argmax(bad))
    sid = rb.column("sample_id")[i].as_py()
    raise CodecError(
        f"examples: row {i} (sample_id {sid}): column {name!r} expected {expected}, "
        f"got {values[i].item()!r}"
    )


# -- decoding ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodedExamples:
    """What :func:`examples_to_record_batch` made of a sequence of records.

    ``batch`` holds the good records in input order (``arrow_schema(schema)``, with the schema's
    fingerprint; 0 rows if none), ``rows`` the index in the input of each of its rows, and
    ``bad`` the index and reason of each refused record.
    """

    batch: pa.RecordBatch
    rows: npt.NDArray[np.int64]
    bad: list[tuple[int, str]]


def examples_to_record_batch(records: Sequence[bytes], spec: ExampleSpec) -> DecodedExamples:
    """Decode serialized Examples in bulk into a sample batch.

    The records are joined into one buffer with offsets; a numba kernel parses the protobuf wire
    format and writes straight into the column arrays. A record that is not a valid Example or
    breaks the spec is refused with its reason (in :attr:`DecodedExamples.bad`); the others go
    on. Raises :class:`~minutely.errors.CodecError` only when ``records`` is not a sequence of
    bytes.
    """
    if isinstance(records, bytes | bytearray | memoryview | str):
        raise CodecError(
            f"examples: expected a sequence of records (bytes), got one {type(records).__name__}"
        )
    try:
        joined = b"".join(records)
    except TypeError:
        i, got = next(
            (i, r)
            for i, r in enumerate(records)
            if not isinstance(r, bytes | bytearray | memoryview)
        )
        raise CodecError(
            f"examples: expected a sequence of bytes, got {type(got).__name__} at index {i}"
        ) from None
    n = len(records)
    starts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, records), dtype=np.int64, count=n), out=starts[1:])
    if starts[-1] != len(joined):
        raise CodecError(
            f"examples: expected records of bytes, got {len(joined)} bytes in all where their "
            f"lengths add up to {starts[-1]}"
        )
    t = spec._tables
    k = _kernels()
    buf = np.frombuffer(joined, dtype=np.uint8)
    int_out = np.empty((t.n_int, n), dtype=np.int64)
    dense_out = np.empty((t.n_dense, n), dtype=np.uint32)
    # Every value takes at least one byte of the buffer: room for any list column.
    mvals = np.empty((t.n_multi, len(joined)), dtype=np.int64)
    moffs = np.empty((t.n_multi, n + 1), dtype=np.int64)
    err = np.empty((n, 4), dtype=np.int64)
    good = int(
        k.decode_examples(
            buf,
            starts,
            t.table,
            t.kbytes,
            t.koff,
            t.follow,
            t.skind,
            t.scol,
            spec.max_ids,
            int_out,
            dense_out,
            mvals,
            moffs,
            err,
        )
    )
    arrays: list[pa.Array] = []
    for slot in range(len(t.names)):
        kind = int(t.skind[slot])
        c = int(t.scol[slot])
        if kind == _KIND_INT:
            arrays.append(pa.array(int_out[c, :good]))
        elif kind == _KIND_FLAG:
            flag_type = np.bool_ if t.names[slot] == "is_correction" else np.int8
            arrays.append(pa.array(int_out[c, :good].astype(flag_type)))
        elif kind == _KIND_DENSE:
            arrays.append(pa.array(dense_out[c, :good].view(np.float32)))
        else:
            offsets = moffs[c, : good + 1]
            used = int(offsets[-1])
            values = mvals[c, :used]
            if used * 2 < mvals.shape[1]:  # release the rest of the room
                values = values.copy()
            arrays.append(
                pa.ListArray.from_arrays(
                    pa.array(offsets.astype(np.int32)), pa.array(values), type=_LIST_INT64
                )
            )
    batch = pa.RecordBatch.from_arrays(arrays, schema=arrow_schema(spec.schema))
    codes = err[:, 0]
    rows = np.flatnonzero(codes == 0).astype(np.int64)
    bad = [
        (i, _reason(err[i], int(starts[i]), records[i], t, spec.max_ids))
        for i in np.flatnonzero(codes != 0).tolist()
    ]
    return DecodedExamples(batch, rows, bad)


_LIST_INT64 = pa.list_(pa.int64())


def _reason(e: npt.NDArray[np.int64], start: int, record: bytes, t: _Tables, max_ids: int) -> str:
    """The reason for a refused record, from the kernel's (code, a, b, c)."""
    code, a, b, c = (int(x) for x in e)
    problem = _code_names()[code]
    if problem in _WIRE_PROBLEMS:
        text = _WIRE_PROBLEMS[problem].format(
            at=a - start, b=b, c=c, b_end=b - start, c_end=c - start, bits=8 * b
        )
        return f"not a valid Example: {text}"
    if problem == "S_UNKNOWN_KEY":  # (key position, key length)
        key = bytes(record[a - start : a - start + b]).decode("utf-8", errors="replace")
        return f"unknown key {key!r}"
    slot = a
    what = "field" if slot < len(_FIXED_NAMES) else "feature"
    key_of = f"key {t.keys[slot]!r} ({what} {t.names[slot]})"
    expected = _EXPECTED[int(t.skind[slot])]
    if problem == "S_DUPLICATE_KEY":
        return f"duplicate {key_of}: a second entry at byte {b - start}"
    if problem == "S_MISSING_KEY":
        if b < 0:
            return f"missing {key_of}"
        return (
            f"missing {key_of}; its entry at byte {b - start} holds a field other than key and "
            "value, and protobuf drops such an entry"
        )
    if problem == "S_NO_LIST":
        return f"{key_of}: expected {expected}, got a Feature with no list"
    if problem == "S_MANY_LISTS":
        lists = " and ".join(v for bit, v in _LIST_NAMES.items() if b & bit)
        return f"{key_of}: expected {expected}, got a Feature with more than one list ({lists})"
    if problem == "S_WRONG_LIST":
        return f"{key_of}: expected {expected}, got a {_LIST_NAMES[b]}"
    if problem == "S_COUNT":
        return f"{key_of}: expected {expected}, got {b} values"
    if problem == "S_FLAG":
        return f"{key_of}: expected 0 or 1, got {b}"
    if problem == "S_TOO_MANY_IDS":
        return f"{key_of}: too many ids: {b} > max_ids {max_ids}"
    value = np.array([b], dtype=np.uint32).view(np.float32)[0]  # S_NOT_FINITE
    return f"{key_of}: expected a finite float32, got {value}"


@functools.cache
def _code_names() -> dict[int, str]:
    """The kernels' error codes by value -> name (W_*: wire format, S_*: spec)."""
    k = _kernels()
    return {getattr(k, n): n for n in dir(k) if n.startswith(("W_", "S_"))}


_LIST_NAMES = {1: "bytes_list", 2: "float_list", 4: "int64_list"}
_EXPECTED = {
    _KIND_INT: "an int64_list of one value",
    _KIND_FLAG: "an int64_list of one value",
    _KIND_MULTI: "an int64_list",
    _KIND_DENSE: "a float_list of one value",
}
# What is wrong with the wire format: ``at`` is the byte in the record, ``b_end`` and ``c_end``
# the ends of ``b`` and ``c`` in the record.
_WIRE_PROBLEMS = {
    "W_TRUNCATED_VARINT": "a varint at byte {at} is cut off by the end of its message (byte "
    "{b_end})",
    "W_LONG_VARINT": "a varint at byte {at} is longer than 10 bytes",
    "W_BAD_TAG": "a tag at byte {at} is longer than 5 bytes or 32 bits",
    "W_FIELD_ZERO": "a tag at byte {at} has field number 0",
    "W_WIRE_TYPE": "a tag at byte {at} (field {c}) has wire type {b}, which does not exist",
    "W_END_GROUP": "an end-group tag at byte {at} (field {b}) closes no group",
    "W_GROUP_MISMATCH": "an end-group tag at byte {at} (field {b}) does not close the open "
    "group (field {c})",
    "W_OPEN_GROUP": "a group at byte {at} (field {b}) is not closed before the end of its "
    "message (byte {c_end})",
    "W_PAST_END": "a length of {b} at byte {at} runs past the end of its message (byte {c_end})",
    "W_LONG_LENGTH": "a length at byte {at} is longer than 5 bytes",
    "W_TRUNCATED_FIXED": "a fixed{bits} value at byte {at} is cut off by the end of its message "
    "(byte {c_end})",
    "W_PACKED_FLOATS": "a packed float list at byte {at} has a length of {b}, not a multiple of 4",
    "W_DEPTH": "groups at byte {at} nest deeper than protobuf's limit of 100",
    "W_UTF8": "a key at byte {at} is not valid UTF-8",
}


# -- TFRecord framing -------------------------------------------------------------------------

_LENGTH = struct.Struct("<Q")
_HEADER = struct.Struct("<QI")  # length, masked crc of the length
_CRC = struct.Struct("<I")
_CRC_MASK_DELTA = 0xA282EAD8
_U32 = 0xFFFFFFFF


def _masked_crc(data: bytes | bytearray | memoryview) -> int:
    """TFRecord's masked crc32c: the crc rotated right by 15 bits plus a constant."""
    crc: int = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _CRC_MASK_DELTA) & _U32


def encode_tfrecords(records: Sequence[bytes]) -> bytes:
    """TFRecord framing of ``records``: per record its length (uint64 LE), the masked crc32c of
    the length, the data and the masked crc32c of the data; byte for byte what TensorFlow's
    TFRecordWriter writes."""
    if isinstance(records, bytes | bytearray | memoryview | str):
        raise CodecError(
            f"tfrecord: expected a sequence of records (bytes), got one {type(records).__name__}"
        )
    parts: list[bytes | bytearray | memoryview] = []
    for i, record in enumerate(records):
        if not isinstance(record, bytes | bytearray | memoryview):
            raise CodecError(
                f"tfrecord: expected a sequence of bytes, got {type(record).__name__} at index {i}"
            )
        length = _LENGTH.pack(memoryview(record).nbytes)
        parts += (length, _CRC.pack(_masked_crc(length)), record, _CRC.pack(_masked_crc(record)))
    return b"".join(parts)


def split_tfrecords(data: bytes) -> tuple[list[bytes], list[tuple[int, str]]]:
    """The records of a TFRecord-framed message, and (record index, reason) for each that cannot
    be read.

    A data crc mismatch refuses that record only (the framing goes on); a length crc mismatch or
    a truncated frame refuses the rest of the message as one entry, at the index of the first
    record that cannot be read, since the framing is lost.
    """
    if not isinstance(data, bytes):
        try:
            data = memoryview(data).tobytes()
        except TypeError:
            raise CodecError(f"tfrecord: expected bytes, got {type(data).__name__}") from None
    crc = crc32c.crc32c
    header = _HEADER.unpack_from
    data_crc = _CRC.unpack_from
    total = len(data)
    records: list[bytes] = []
    bad: list[tuple[int, str]] = []
    pos = 0
    index = 0
    while pos < total:
        left = total - pos
        if left < 12:
            bad.append(
                (
                    index,
                    f"record {index} at byte {pos}: a truncated header ({left} bytes, a header "
                    "takes 12); the framing is lost",
                )
            )
            break
        length, length_crc = header(data, pos)
        c = crc(data[pos : pos + 8])
        if (((c >> 15) | (c << 17)) + _CRC_MASK_DELTA) & _U32 != length_crc:
            bad.append(
                (
                    index,
                    f"record {index} at byte {pos}: the length's crc does not match; the framing "
                    f"is lost, and the rest of the message ({left} bytes) with it",
                )
            )
            break
        if length > left - 16:
            bad.append(
                (
                    index,
                    f"record {index} at byte {pos}: a truncated frame (length {length}, "
                    f"{left - 12} bytes after the header, the data and its crc take "
                    f"{length + 4}); the framing is lost",
                )
            )
            break
        stop = pos + 12 + length
        body = data[pos + 12 : stop]
        c = crc(body)
        if (((c >> 15) | (c << 17)) + _CRC_MASK_DELTA) & _U32 != data_crc(data, stop)[0]:
            bad.append((index, f"record {index} at byte {pos}: the data's crc does not match"))
        else:
            records.append(body)
        pos = stop + 4
        index += 1
    return records, bad
