"""Hashing raw ids into embedding buckets.

Raw ids (user ids, ad ids, ...) are unbounded and new ones appear every minute, so they are
hashed into a fixed number of buckets instead of looked up in a vocabulary. Each feature has its
own salt, so two ids that share a bucket in one feature almost surely do not in another: the
collisions of independent features are independent. The mixer is the splitmix64 finaliser, a
bijection on 64 bits, so distinct ids only meet through the final modulo.

The result depends on nothing but the id, the feature name and the bucket count: the same id
lands in the same bucket in every process, on every machine, in training and in serving.

>>> import numpy as np
>>> salt = feature_salt("ad_id")
>>> b = hash_ids(np.array([1, 2, 3, 1], dtype=np.int64), salt, buckets=1000)
>>> bool(b[0] == b[3]), bool(((b >= 0) & (b < 1000)).all())
(True, True)
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from typing import cast

import numpy as np
import numpy.typing as npt

from minutely.errors import ConfigError, SchemaError

_MASK64 = (1 << 64) - 1


@functools.lru_cache(maxsize=1024)
def feature_salt(name: str) -> int:
    """A 64-bit salt derived from a feature name, identical in every process.

    Built on blake2b rather than ``hash()``, which Python randomises per process.

    >>> feature_salt("user_id") == feature_salt("user_id") != feature_salt("ad_id")
    True
    """
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8, person=b"minutely.salt").digest()
    return int.from_bytes(digest, "little")


def hash_ids(ids: npt.NDArray[np.integer], salt: int, buckets: int) -> npt.NDArray[np.int64]:
    """Map integer ids into ``[0, buckets)``: splitmix64 of ``id XOR salt``, modulo ``buckets``.

    One compiled pass over the ids (numba) with wrapping uint64 arithmetic; negative ids are
    taken as their two's complement bits. ``salt`` is taken modulo 2**64. Returns a new int64
    array of the same shape.

    >>> import numpy as np
    >>> hash_ids(np.array([7, 7, -7]), salt=0, buckets=10).tolist()
    [7, 7, 2]
    """
    if isinstance(buckets, bool) or not isinstance(buckets, int) or not 1 <= buckets < 2**63:
        raise ConfigError("buckets", "an int in [1, 2**63)", buckets)
    arr = np.asarray(ids)
    if not np.issubdtype(arr.dtype, np.integer):
        raise SchemaError(f"hash_ids: expected an integer id array, got dtype {arr.dtype}")
    flat = np.ascontiguousarray(arr.reshape(-1)).astype(np.int64, copy=False)  # keeps the bits
    out = np.empty(flat.shape, dtype=np.int64)
    if flat.size:
        _kernel()(flat, np.uint64(salt & _MASK64), np.uint64(buckets), out)
    return out.reshape(arr.shape)


@functools.cache
def _kernel() -> Callable[..., None]:
    """The numba kernel (compiled, or loaded from its cache, on first use)."""
    from minutely.data._hash_kernel import hash_into

    return cast(Callable[..., None], hash_into)
