"""Numba kernels of the tf.train.Example codec: the protobuf wire format, many records per call.

:mod:`minutely.data.example` is the typed API: it prepares the spec's tables and the column
arrays, calls one kernel per batch, and words the reasons of refused records from the codes
written here.

Decoding follows Python protobuf's parser (upb) record by record: the same bytes are accepted or
refused as a wire-format error, with stricter rules on top (a key given twice, a Feature holding
more than one list, values that break the spec). A map entry holding a field other than its key
and value is dropped, as upb drops it. Integers are int64 throughout: a varint wraps into int64
as protobuf's int64 does, and numba's integer arithmetic wraps.

Nesting levels count from the Example (0): Features 1, a map entry 2, a Feature 3, a list 4;
groups of unknown fields may nest until level plus groups exceeds 100 (upb's default limit).

Speed: the decoder is one function; the small functions it calls per field (tag, length) call
nothing that takes an array, and per value nothing is called at all. In numba, a function that
passes arrays on to another call pays reference counting on every call, which at one call per
value took most of the time. Constants passed to a function go through ``np.int64`` so that numba
compiles it once, not once per literal value.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import numba
import numpy as np
import numpy.typing as npt

_F = TypeVar("_F", bound=Callable[..., Any])

I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]
U32 = npt.NDArray[np.uint32]


def _inner(fn: _F) -> _F:
    """Compile in nopython mode when a caller is compiled; its code is cached inside theirs."""
    return cast(_F, numba.njit(nogil=True)(fn))


def _entry_point(fn: _F) -> _F:
    """Compile in nopython mode on first call, cached next to this module, releasing the GIL."""
    return cast(_F, numba.njit(cache=True, nogil=True)(fn))


# Slot kinds (a slot is a fixed field or a feature, in arrow_schema order).
KIND_INT = 0  # int64 scalar: an int64_list of one value
KIND_FLAG = 1  # label / is_correction: an int64_list of one value, 0 or 1
KIND_MULTI = 2  # multi_sparse: an int64_list of 0..max_ids values
KIND_DENSE = 3  # dense: a float_list of one finite float32

# Feature list bits.
LIST_BYTES = 1
LIST_FLOAT = 2
LIST_INT64 = 4

# Tags (field number << 3 | wire type) the decoder looks for.
TAG_1_LEN = 0x0A  # Example.features, Features.feature, entry key, BytesList, packed values
TAG_2_LEN = 0x12  # entry value, Feature.float_list
TAG_3_LEN = 0x1A  # Feature.int64_list
TAG_1_VARINT = 0x08  # one unpacked int64 value
TAG_1_FIXED32 = 0x0D  # one unpacked float value

# Error codes: err[i] = (code, a, b, c). A wire-format error stops the record and replaces a
# semantic error found earlier in it. Positions and ends are absolute offsets in the buffer.
W_TRUNCATED_VARINT = 1  # (pos, message end)
W_LONG_VARINT = 2  # (pos)
W_BAD_TAG = 3  # (pos)
W_FIELD_ZERO = 4  # (pos)
W_WIRE_TYPE = 5  # (pos, wire type, field)
W_END_GROUP = 6  # (pos, field)
W_GROUP_MISMATCH = 7  # (pos, field, open group's field)
W_OPEN_GROUP = 8  # (pos, field, message end)
W_PAST_END = 9  # (pos, length, message end)
W_LONG_LENGTH = 10  # (pos)
W_TRUNCATED_FIXED = 11  # (pos, width in bytes, message end)
W_PACKED_FLOATS = 12  # (pos, length)
W_DEPTH = 13  # (pos)
W_UTF8 = 14  # (pos)
S_UNKNOWN_KEY = 20  # (key pos, key length)
S_DUPLICATE_KEY = 21  # (slot, entry pos)
S_MISSING_KEY = 22  # (slot, pos of a dropped entry for it, or -1)
S_NO_LIST = 23  # (slot)
S_MANY_LISTS = 24  # (slot, list bits)
S_WRONG_LIST = 25  # (slot, list bit)
S_COUNT = 26  # (slot, number of values)
S_FLAG = 27  # (slot, value)
S_TOO_MANY_IDS = 28  # (slot, number of ids)
S_NOT_FINITE = 29  # (slot, float32 bits)

MAX_DEPTH = 100
FNV_OFFSET = -3750763034362895579  # 0xCBF29CE484222325 as int64
FNV_PRIME = 1099511628211


# -- decoding: wire primitives (leaves: they call nothing that takes an array) ----------------


@_inner
def _wire_error(d: I64, code: int, a: int, b: int, c: int) -> int:
    """Write a wire-format error into ``d``; return ``-code`` (a failed position)."""
    d[0] = code
    d[1] = a
    d[2] = b
    d[3] = c
    return -code


@_inner
def _varint(buf: U8, pos: int, end: int, d: I64) -> tuple[int, int]:
    """(value, next position), or (0, negative) with the error in ``d``."""
    start = pos
    result = 0
    shift = 0
    while pos < end:
        b = np.int64(buf[pos])
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift == 70:
            d[0] = W_LONG_VARINT
            d[1] = start
            return 0, -W_LONG_VARINT
    d[0] = W_TRUNCATED_VARINT
    d[1] = start
    d[2] = end
    return 0, -W_TRUNCATED_VARINT


@_inner
def _tag(buf: U8, pos: int, end: int, d: I64) -> tuple[int, int]:
    """(tag, next position): a varint of at most 5 bytes and 32 bits, field number not 0."""
    start = pos
    if pos < end and buf[pos] < 0x80:  # a one-byte tag
        tag = np.int64(buf[pos])
        if tag >= 8:
            return tag, pos + 1
    result = 0
    shift = 0
    while pos < end:
        b = np.int64(buf[pos])
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            if result > 0xFFFFFFFF:
                d[0] = W_BAD_TAG
                d[1] = start
                return 0, -W_BAD_TAG
            if result < 8:
                d[0] = W_FIELD_ZERO
                d[1] = start
                return 0, -W_FIELD_ZERO
            return result, pos
        shift += 7
        if shift == 35:
            d[0] = W_BAD_TAG
            d[1] = start
            return 0, -W_BAD_TAG
    d[0] = W_TRUNCATED_VARINT
    d[1] = start
    d[2] = end
    return 0, -W_TRUNCATED_VARINT


@_inner
def _length(buf: U8, pos: int, end: int, d: I64) -> tuple[int, int]:
    """(length, position of the payload): a varint of at most 5 bytes, within ``end``."""
    start = pos
    result = 0
    shift = 0
    while pos < end:
        b = np.int64(buf[pos])
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            if result > end - pos:
                d[0] = W_PAST_END
                d[1] = start
                d[2] = result
                d[3] = end
                return 0, -W_PAST_END
            return result, pos
        shift += 7
        if shift == 35:
            d[0] = W_LONG_LENGTH
            d[1] = start
            return 0, -W_LONG_LENGTH
    d[0] = W_TRUNCATED_VARINT
    d[1] = start
    d[2] = end
    return 0, -W_TRUNCATED_VARINT


@_inner
def _skip_plain(buf: U8, pos: int, end: int, at: int, tag: int, d: I64) -> int:
    """Skip the value of a field that is not a group; the next position, or negative."""
    wt = tag & 7
    if wt == 0:
        _, pos = _varint(buf, pos, end, d)
        return pos
    if wt == 2:
        n, pos = _length(buf, pos, end, d)
        if pos < 0:
            return pos
        return pos + n
    if wt == 1 or wt == 5:
        width = 8 if wt == 1 else 4
        if end - pos < width:
            return _wire_error(d, np.int64(W_TRUNCATED_FIXED), pos, width, end)
        return pos + width
    if wt == 4:
        return _wire_error(d, np.int64(W_END_GROUP), at, tag >> 3, np.int64(0))
    return _wire_error(d, np.int64(W_WIRE_TYPE), at, wt, tag >> 3)


@_inner
def _skip(buf: U8, pos: int, end: int, at: int, tag: int, level: int, stack: I64, d: I64) -> int:
    """Skip an unknown field (a group with all it holds) at nesting ``level``."""
    if tag & 7 != 3:
        return _skip_plain(buf, pos, end, at, tag, d)
    if level + 1 > MAX_DEPTH:
        return _wire_error(d, np.int64(W_DEPTH), at, np.int64(0), np.int64(0))
    stack[0] = tag >> 3
    depth = 1
    while pos < end:
        tag_at = pos
        t, pos = _tag(buf, pos, end, d)
        if pos < 0:
            return pos
        wt = t & 7
        if wt == 4:
            if t >> 3 != stack[depth - 1]:
                return _wire_error(d, np.int64(W_GROUP_MISMATCH), tag_at, t >> 3, stack[depth - 1])
            depth -= 1
            if depth == 0:
                return pos
        elif wt == 3:
            if level + depth + 1 > MAX_DEPTH:
                return _wire_error(d, np.int64(W_DEPTH), tag_at, np.int64(0), np.int64(0))
            stack[depth] = t >> 3
            depth += 1
        else:
            pos = _skip_plain(buf, pos, end, tag_at, t, d)
            if pos < 0:
                return pos
    return _wire_error(d, np.int64(W_OPEN_GROUP), at, tag >> 3, end)


@_inner
def _utf8_ok(buf: U8, pos: int, end: int) -> bool:
    """Whether ``buf[pos:end]`` is valid UTF-8 (no overlong forms, surrogates or > U+10FFFF)."""
    while pos < end:
        b = buf[pos]
        if b < 0x80:
            pos += 1
            continue
        lo = 0x80
        hi = 0xBF
        if 0xC2 <= b <= 0xDF:
            n = 1
        elif b == 0xE0:
            n = 2
            lo = 0xA0
        elif b == 0xED:
            n = 2
            hi = 0x9F
        elif 0xE1 <= b <= 0xEF:
            n = 2
        elif b == 0xF0:
            n = 3
            lo = 0x90
        elif b == 0xF4:
            n = 3
            hi = 0x8F
        elif 0xF1 <= b <= 0xF3:
            n = 3
        else:
            return False
        if end - pos <= n:
            return False
        c = buf[pos + 1]
        if c < lo or c > hi:
            return False
        for j in range(2, n + 1):
            c = buf[pos + j]
            if c < 0x80 or c > 0xBF:
                return False
        pos += n + 1
    return True


@_inner
def _f32_bits(buf: U8, pos: int) -> int:
    return (
        np.int64(buf[pos])
        | (np.int64(buf[pos + 1]) << 8)
        | (np.int64(buf[pos + 2]) << 16)
        | (np.int64(buf[pos + 3]) << 24)
    )


# -- decoding ---------------------------------------------------------------------------------


@_entry_point
def decode_examples(
    buf: U8,
    starts: I64,
    table: I64,
    kbytes: U8,
    koff: I64,
    follow: I64,
    skind: I64,
    scol: I64,
    max_ids: int,
    int_out: I64,
    dense_out: U32,
    mvals: I64,
    moffs: I64,
    err: I64,
) -> int:
    """Decode the records ``buf[starts[i]:starts[i + 1]]`` into the column arrays.

    Good records fill rows 0, 1, ... of ``int_out`` and ``dense_out`` (by slot column) and the
    lists ``mvals[m, moffs[m, r]:moffs[m, r + 1]]``; ``err[i]`` is zero for a good record and
    holds the code and details of its problem otherwise (a wire-format error, else the first
    spec violation). Returns the number of good rows.
    """
    n_records = starts.shape[0] - 1
    n_slots = skind.shape[0]
    n_multi = mvals.shape[0]
    seen = np.zeros(n_slots, np.int64)
    dropped = np.zeros(n_slots, np.int64)
    cnt = np.zeros(n_slots, np.int64)
    mcur = np.zeros(n_multi, np.int64)
    mstart = np.zeros(n_multi, np.int64)
    stack = np.zeros(MAX_DEPTH + 1, np.int64)
    d = np.zeros(4, np.int64)
    mask = table.shape[0] - 1
    for m in range(n_multi):
        moffs[m, 0] = 0
    row = 0
    for i in range(n_records):
        for s in range(n_slots):
            seen[s] = 0
            dropped[s] = -1
            cnt[s] = 0
        for m in range(n_multi):
            mstart[m] = mcur[m]
        previous = n_slots  # follow[n_slots] is the first key in sorted order
        sem = 0  # the first spec violation: code and details
        sa = 0
        sb = 0
        pos = starts[i]
        end0 = starts[i + 1]
        # Example (level 0); pos < 0 after a wire-format error ends every loop.
        while 0 <= pos < end0:
            at = pos
            tag, pos = _tag(buf, pos, end0, d)
            if pos < 0:
                break
            if tag != TAG_1_LEN:
                pos = _skip(buf, pos, end0, at, tag, np.int64(0), stack, d)
                continue
            n, pos = _length(buf, pos, end0, d)
            if pos < 0:
                break
            end1 = pos + n
            # Features (level 1)
            while 0 <= pos < end1:
                at = pos
                tag, pos = _tag(buf, pos, end1, d)
                if pos < 0:
                    break
                if tag != TAG_1_LEN:
                    pos = _skip(buf, pos, end1, at, tag, np.int64(1), stack, d)
                    continue
                n, pos = _length(buf, pos, end1, d)
                if pos < 0:
                    break
                entry = pos
                end2 = pos + n
                # Map entry (level 2), first pass: its own fields. The last key wins, every
                # key must be UTF-8, and any other field makes upb drop the entry.
                key_at = np.int64(-1)  # (passed on: np.int64, not a literal)
                key_pos = pos  # no key field: the empty key, as in protobuf
                key_len = 0
                unknown = False
                while 0 <= pos < end2:
                    at = pos
                    tag, pos = _tag(buf, pos, end2, d)
                    if pos < 0:
                        break
                    if tag in (TAG_1_LEN, TAG_2_LEN):
                        n, pos = _length(buf, pos, end2, d)
                        if pos < 0:
                            break
                        if tag == TAG_1_LEN:
                            if key_at >= 0 and not _utf8_ok(buf, key_pos, key_pos + key_len):
                                pos = _wire_error(
                                    d, np.int64(W_UTF8), key_at, np.int64(0), np.int64(0)
                                )
                                break
                            key_at = at
                            key_pos = pos
                            key_len = n
                        pos += n
                    else:
                        unknown = True
                        pos = _skip(buf, pos, end2, at, tag, np.int64(2), stack, d)
                if pos < 0:
                    break
                # The key's slot: first the key that follows the previous one in sorted order
                # (the order protobuf writes), else open addressing on FNV-1a.
                slot = -1
                guess = follow[previous]
                a = koff[guess]
                if koff[guess + 1] - a == key_len:
                    j = 0
                    while j < key_len and buf[key_pos + j] == kbytes[a + j]:
                        j += 1
                    if j == key_len:
                        slot = guess
                if slot < 0 and key_len > 0:
                    h = FNV_OFFSET
                    for j in range(key_pos, key_pos + key_len):
                        h = (h ^ np.int64(buf[j])) * FNV_PRIME
                    probe = h & mask
                    while table[probe] >= 0:
                        s = table[probe]
                        a = koff[s]
                        if koff[s + 1] - a == key_len:
                            j = 0
                            while j < key_len and buf[key_pos + j] == kbytes[a + j]:
                                j += 1
                            if j == key_len:
                                slot = s
                                break
                        probe = (probe + 1) & mask
                if slot >= 0:
                    previous = slot
                elif key_at >= 0 and not _utf8_ok(buf, key_pos, key_pos + key_len):
                    pos = _wire_error(d, np.int64(W_UTF8), key_at, np.int64(0), np.int64(0))
                    break
                target = -1
                if unknown:
                    if slot >= 0 and dropped[slot] < 0:
                        dropped[slot] = entry
                elif slot < 0:
                    if sem == 0:
                        sem = S_UNKNOWN_KEY
                        sa = key_pos
                        sb = key_len
                elif seen[slot]:
                    if sem == 0:
                        sem = S_DUPLICATE_KEY
                        sa = slot
                        sb = entry
                else:
                    seen[slot] = 1
                    target = slot
                kind = skind[target] if target >= 0 else -1
                col = scol[target] if target >= 0 else -1
                store_int = target >= 0 and kind != KIND_DENSE
                store_float = target >= 0 and kind == KIND_DENSE
                # Second pass: the Feature values (several merge, as in protobuf). The entry's
                # own fields were checked by the first pass.
                kinds = 0
                pos = entry
                while 0 <= pos < end2:
                    at = pos
                    tag, pos = _tag(buf, pos, end2, d)
                    if tag == TAG_1_LEN:
                        n, pos = _length(buf, pos, end2, d)
                        pos += n
                        continue
                    if tag != TAG_2_LEN:
                        pos = _skip(buf, pos, end2, at, tag, np.int64(2), stack, d)
                        continue
                    n, pos = _length(buf, pos, end2, d)
                    end3 = pos + n
                    # Feature (level 3)
                    while 0 <= pos < end3:
                        at = pos
                        tag, pos = _tag(buf, pos, end3, d)
                        if pos < 0:
                            break
                        if tag != TAG_1_LEN and tag != TAG_2_LEN and tag != TAG_3_LEN:
                            pos = _skip(buf, pos, end3, at, tag, np.int64(3), stack, d)
                            continue
                        n, pos = _length(buf, pos, end3, d)
                        if pos < 0:
                            break
                        end4 = pos + n
                        # A list (level 4)
                        if tag == TAG_3_LEN:
                            kinds |= LIST_INT64
                            while 0 <= pos < end4:
                                at = pos
                                tag, pos = _tag(buf, pos, end4, d)
                                if pos < 0:
                                    break
                                if tag == TAG_1_LEN:  # packed
                                    n, pos = _length(buf, pos, end4, d)
                                    end5 = pos + n
                                    many = True
                                elif tag == TAG_1_VARINT:  # one value
                                    if pos == end4:
                                        pos = _wire_error(
                                            d, np.int64(W_TRUNCATED_VARINT), pos, end4, np.int64(0)
                                        )
                                        break
                                    end5 = end4
                                    many = False
                                else:
                                    pos = _skip(buf, pos, end4, at, tag, np.int64(4), stack, d)
                                    continue
                                # The values, varints written out: a call per value (with
                                # its arrays) costs more than decoding it.
                                write = store_int and sem == 0
                                count = cnt[target] if store_int else 0
                                cur = mcur[col] if write and kind == KIND_MULTI else 0
                                while 0 <= pos < end5:
                                    b = np.int64(buf[pos])
                                    if b < 0x80:
                                        v = b
                                        pos += 1
                                    elif pos + 1 < end5 and buf[pos + 1] < 0x80:
                                        v = (b & 0x7F) | (np.int64(buf[pos + 1]) << 7)
                                        pos += 2
                                    elif pos + 2 < end5 and buf[pos + 2] < 0x80:
                                        v = (
                                            (b & 0x7F)
                                            | ((np.int64(buf[pos + 1]) & 0x7F) << 7)
                                            | (np.int64(buf[pos + 2]) << 14)
                                        )
                                        pos += 3
                                    else:
                                        v = 0
                                        shift = 0
                                        value_at = pos
                                        while pos < end5:
                                            b = np.int64(buf[pos])
                                            pos += 1
                                            v |= (b & 0x7F) << shift
                                            if b < 0x80:
                                                break
                                            shift += 7
                                            if shift == 70:
                                                break
                                        if b >= 0x80:
                                            code = (
                                                W_LONG_VARINT if shift == 70 else W_TRUNCATED_VARINT
                                            )
                                            pos = _wire_error(d, code, value_at, end5, np.int64(0))
                                            break
                                    if write:
                                        if kind == KIND_MULTI:
                                            mvals[col, cur] = v
                                            cur += 1
                                        elif count == 0:
                                            int_out[col, row] = v
                                    count += 1
                                    if not many:
                                        break
                                if store_int:
                                    cnt[target] = count
                                if write and kind == KIND_MULTI:
                                    mcur[col] = cur
                        elif tag == TAG_2_LEN:
                            kinds |= LIST_FLOAT
                            while 0 <= pos < end4:
                                at = pos
                                tag, pos = _tag(buf, pos, end4, d)
                                if pos < 0:
                                    break
                                if tag == TAG_1_LEN:  # packed
                                    len_at = pos
                                    n, pos = _length(buf, pos, end4, d)
                                    if pos < 0:
                                        break
                                    if n % 4 != 0:
                                        pos = _wire_error(
                                            d, np.int64(W_PACKED_FLOATS), len_at, n, np.int64(0)
                                        )
                                        break
                                    end5 = pos + n
                                elif tag == TAG_1_FIXED32:  # one value
                                    if end4 - pos < 4:
                                        pos = _wire_error(
                                            d, np.int64(W_TRUNCATED_FIXED), pos, np.int64(4), end4
                                        )
                                        break
                                    end5 = pos + 4
                                else:
                                    pos = _skip(buf, pos, end4, at, tag, np.int64(4), stack, d)
                                    continue
                                while pos < end5:
                                    if store_float:
                                        c = cnt[target]
                                        cnt[target] = c + 1
                                        if sem == 0 and c == 0:
                                            dense_out[col, row] = _f32_bits(buf, pos)
                                    pos += 4
                        else:
                            kinds |= LIST_BYTES
                            while 0 <= pos < end4:
                                at = pos
                                tag, pos = _tag(buf, pos, end4, d)
                                if pos < 0:
                                    break
                                pos = _skip(buf, pos, end4, at, tag, np.int64(4), stack, d)
                if pos < 0:
                    break
                if target < 0 or sem != 0:
                    continue
                # The spec's rules for this key's values.
                want = LIST_FLOAT if kind == KIND_DENSE else LIST_INT64
                count = cnt[target]
                sa = target
                if kinds == 0:
                    sem = S_NO_LIST
                elif kinds & (kinds - 1):
                    sem = S_MANY_LISTS
                    sb = kinds
                elif kinds != want:
                    sem = S_WRONG_LIST
                    sb = kinds
                elif kind == KIND_MULTI:
                    if count > max_ids:
                        sem = S_TOO_MANY_IDS
                        sb = count
                elif count != 1:
                    sem = S_COUNT
                    sb = count
                elif kind == KIND_FLAG:
                    v = int_out[col, row]
                    if v != 0 and v != 1:
                        sem = S_FLAG
                        sb = v
                elif kind == KIND_DENSE:
                    bits = np.int64(dense_out[col, row])
                    if (bits >> 23) & 0xFF == 0xFF:
                        sem = S_NOT_FINITE
                        sb = bits
        if pos < 0:
            err[i, 0] = d[0]
            err[i, 1] = d[1]
            err[i, 2] = d[2]
            err[i, 3] = d[3]
        else:
            if sem == 0:
                for s in range(n_slots):
                    if seen[s] == 0:
                        sem = S_MISSING_KEY
                        sa = s
                        sb = dropped[s]
                        break
            err[i, 0] = sem
            err[i, 1] = sa
            err[i, 2] = sb
            err[i, 3] = 0
        if err[i, 0] == 0:
            for m in range(n_multi):
                moffs[m, row + 1] = mcur[m]
            row += 1
        else:
            for m in range(n_multi):
                mcur[m] = mstart[m]
    return row


# -- encoding ---------------------------------------------------------------------------------


@_inner
def _vsize(v: int) -> int:
    """Bytes of ``v`` as a protobuf int64 varint."""
    if v < 0:
        return 10
    if v < 1 << 7:
        return 1
    if v < 1 << 14:
        return 2
    if v < 1 << 21:
        return 3
    if v < 1 << 28:
        return 4
    n = 5
    v >>= 35
    while v > 0:
        v >>= 7
        n += 1
    return n


@_inner
def _put_varint(out: U8, pos: int, v: int) -> int:
    if v < 0:  # ten bytes: the low 63 bits, then the sign bit alone
        for _ in range(9):
            out[pos] = (v & 0x7F) | 0x80
            v >>= 7
            pos += 1
        out[pos] = 1
        return pos + 1
    if v < 1 << 7:
        out[pos] = v
        return pos + 1
    if v < 1 << 14:
        out[pos] = (v & 0x7F) | 0x80
        out[pos + 1] = v >> 7
        return pos + 2
    while v >= 0x80:
        out[pos] = (v & 0x7F) | 0x80
        v >>= 7
        pos += 1
    out[pos] = v
    return pos + 1


@_inner
def _feature_size(kind: int, c: int, r: int, ints: I64, mvals: I64, moffs: I64, msize: I64) -> int:
    """Bytes of one Feature message (``msize`` holds each list's packed payload size)."""
    if kind == KIND_DENSE:
        return 8
    if kind == KIND_MULTI:
        a = moffs[c, r]
        b = moffs[c, r + 1]
        if a == b:
            return 2
        payload = msize[c, r]
        inner = 1 + _vsize(payload) + payload
        return 1 + _vsize(inner) + inner
    return 4 + _vsize(ints[c, r])


@_entry_point
def encode_sizes(
    ints: I64,
    mvals: I64,
    moffs: I64,
    okind: I64,
    ocol: I64,
    plen: I64,
    features_size: I64,
    sizes: I64,
    msize: I64,
) -> None:
    """Per row: the Features size and the record size; per list: its packed payload size."""
    n_rows = sizes.shape[0]
    for c in range(moffs.shape[0]):
        for r in range(n_rows):
            total = 0
            for j in range(moffs[c, r], moffs[c, r + 1]):
                total += _vsize(mvals[j])
            msize[c, r] = total
    for r in range(n_rows):
        fs = 0
        for p in range(okind.shape[0]):
            f = _feature_size(okind[p], ocol[p], r, ints, mvals, moffs, msize)
            entry = plen[p] + _vsize(f) + f
            fs += 1 + _vsize(entry) + entry
        features_size[r] = fs
        sizes[r] = 1 + _vsize(fs) + fs


@_entry_point
def encode_write(
    ints: I64,
    dense: U32,
    mvals: I64,
    moffs: I64,
    okind: I64,
    ocol: I64,
    plen: I64,
    prefix: U8,
    poff: I64,
    features_size: I64,
    msize: I64,
    offsets: I64,
    out: U8,
) -> None:
    """Write every record at ``offsets[r]``: keys in ``okind`` order, each entry
    0x0A len (0x0A klen key 0x12, the spec's ``prefix``) len Feature."""
    for r in range(offsets.shape[0] - 1):
        pos = offsets[r]
        out[pos] = 0x0A
        pos = _put_varint(out, pos + 1, features_size[r])
        for p in range(okind.shape[0]):
            kind = okind[p]
            c = ocol[p]
            f = _feature_size(kind, c, r, ints, mvals, moffs, msize)
            entry = plen[p] + _vsize(f) + f
            out[pos] = 0x0A
            pos = _put_varint(out, pos + 1, entry)
            for j in range(poff[p], poff[p + 1]):
                out[pos] = prefix[j]
                pos += 1
            pos = _put_varint(out, pos, f)
            if kind == KIND_DENSE:
                bits = np.int64(dense[c, r])
                out[pos] = 0x12
                out[pos + 1] = 6
                out[pos + 2] = 0x0A
                out[pos + 3] = 4
                out[pos + 4] = bits & 0xFF
                out[pos + 5] = (bits >> 8) & 0xFF
                out[pos + 6] = (bits >> 16) & 0xFF
                out[pos + 7] = (bits >> 24) & 0xFF
                pos += 8
            elif kind == KIND_MULTI:
                out[pos] = 0x1A
                a = moffs[c, r]
                b = moffs[c, r + 1]
                if a == b:
                    out[pos + 1] = 0
                    pos += 2
                else:
                    payload = msize[c, r]
                    pos = _put_varint(out, pos + 1, 1 + _vsize(payload) + payload)
                    out[pos] = 0x0A
                    pos = _put_varint(out, pos + 1, payload)
                    for j in range(a, b):
                        pos = _put_varint(out, pos, mvals[j])
            else:
                v = ints[c, r]
                s = _vsize(v)
                out[pos] = 0x1A
                out[pos + 1] = 2 + s
                out[pos + 2] = 0x0A
                out[pos + 3] = s
                pos = _put_varint(out, pos + 4, v)
