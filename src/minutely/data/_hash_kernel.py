"""The numba kernel of :func:`minutely.data.hashing.hash_ids`: splitmix64 of ``id XOR salt``,
modulo the bucket count, in one pass over the ids (numpy's version takes ten; see
``benchmarks/ingest.py``, ``kernels``)."""

from __future__ import annotations

import numba
import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)


@numba.njit(cache=True, nogil=True)
def hash_into(ids, salt, buckets, out):  # type: ignore[no-untyped-def]
    """``out[i] = splitmix64(ids[i] ^ salt) % buckets`` (int64 ids taken as their bits)."""
    b = np.uint64(buckets)
    s = np.uint64(salt)
    for i in range(ids.shape[0]):
        z = np.uint64(ids[i]) ^ s
        z += _GOLDEN
        z ^= z >> _S30
        z *= _MIX1
        z ^= z >> _S27
        z *= _MIX2
        z ^= z >> _S31
        out[i] = np.int64(z % b)
