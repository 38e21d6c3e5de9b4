"""Keyed partitioning of many keys at once.

:func:`~minutely.stream.base.partition_for` hashes one key in pure Python (a few microseconds);
:func:`partitions_for` gives the same answers for a whole batch, hashing keys of equal length
together with numpy's wrapping ``uint32`` arithmetic, so keyed appends of thousands of messages
do not spend most of their time hashing.

>>> from minutely.stream.base import partition_for
>>> keys = [f"imp-{i}".encode() for i in range(100)]
>>> partitions_for(keys, 8) == [partition_for(k, 8) for k in keys]
True
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from minutely.stream.base import partition_for

# Below this many keys of one length, the scalar hash is cheaper than setting up arrays.
_MIN_VECTOR = 16
_SEED = 0x9747B28C
_M = np.uint32(0x5BD1E995)


def partitions_for(keys: Sequence[bytes], partitions: int) -> list[int]:
    """``[partition_for(k, partitions) for k in keys]``, computed in bulk."""
    out = [0] * len(keys)
    by_length: dict[int, list[int]] = {}
    for i, key in enumerate(keys):
        by_length.setdefault(len(key), []).append(i)
    for length, idx in by_length.items():
        if len(idx) < _MIN_VECTOR:
            for i in idx:
                out[i] = partition_for(keys[i], partitions)
            continue
        rows = np.frombuffer(b"".join([keys[i] for i in idx]), dtype=np.uint8)
        hashes = _murmur2_rows(rows.reshape(len(idx), length))
        parts = (hashes & np.uint32(0x7FFFFFFF)) % np.uint32(partitions)
        for i, p in zip(idx, parts.tolist(), strict=True):
            out[i] = p
    return out


def _murmur2_rows(data: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint32]:
    """Kafka's murmur2 of each row of ``data`` (rows of one length), step for step as
    :func:`minutely.stream.base._murmur2`; uint32 array arithmetic wraps like Java's int."""
    count, length = data.shape
    h = np.full(count, (_SEED ^ length) & 0xFFFFFFFF, dtype=np.uint32)
    n4 = length // 4
    if n4:
        words = np.ascontiguousarray(data[:, : 4 * n4]).view("<u4")
        for j in range(n4):
            k = words[:, j] * _M
            k ^= k >> np.uint32(24)
            k *= _M
            h *= _M
            h ^= k
    tail = data[:, 4 * n4 :].astype(np.uint32)
    rest = length & 3
    if rest == 3:
        h ^= tail[:, 2] << np.uint32(16)
    if rest >= 2:
        h ^= tail[:, 1] << np.uint32(8)
    if rest >= 1:
        h ^= tail[:, 0]
        h *= _M
    h ^= h >> np.uint32(13)
    h *= _M
    h ^= h >> np.uint32(15)
    return h
