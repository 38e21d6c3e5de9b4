from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest

from minutely.data import feature_salt, hash_ids, hashing
from minutely.errors import ConfigError, SchemaError

PINNED_SALT = 11183424247439727018
PINNED_BUCKETS = [711344, 652812, 961247, 758225]
_M = (1 << 64) - 1


def _splitmix64_reference(x: int, salt: int, buckets: int) -> int:
    """The textbook scalar splitmix64 finaliser, as an oracle for the vectorised version."""
    z = ((x & _M) ^ (salt & _M)) + 0x9E3779B97F4A7C15 & _M
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & _M
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _M
    return (z ^ (z >> 31)) % buckets


def _chi_square(counts: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic against a uniform distribution, and its degrees of freedom."""
    expected = counts.sum() / counts.size
    return float(((counts - expected) ** 2 / expected).sum()), counts.size - 1


def _below_six_sigma(stat: float, dof: int) -> bool:
    # A chi-square with k degrees of freedom has mean k and variance 2k.
    return stat < dof + 6 * math.sqrt(2 * dof)


@pytest.mark.parametrize("buckets", [1, 2, 7, 1000, 1 << 20, 2**63 - 1])
def test_buckets_are_in_range_with_input_shape_and_int64(buckets: int) -> None:
    ids = np.array([[0, 1, -1], [2**63 - 1, -(2**63), 12345]], dtype=np.int64)
    out = hash_ids(ids, feature_salt("ad_id"), buckets)
    assert out.dtype == np.int64
    assert out.shape == ids.shape
    assert ((out >= 0) & (out < buckets)).all()


def test_same_id_same_bucket_and_input_untouched() -> None:
    ids = np.arange(-50, 50, dtype=np.int64)
    ids.setflags(write=False)  # e.g. a zero-copy view of an Arrow buffer
    first = hash_ids(ids, feature_salt("user_id"), 997)
    again = hash_ids(ids.copy(), feature_salt("user_id"), 997)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(ids, np.arange(-50, 50))
    dup = hash_ids(np.array([17, 99, 17], dtype=np.int64), 5, 1 << 30)
    assert dup[0] == dup[2] != dup[1]


def test_pinned_values_detect_any_change_to_the_hash() -> None:
    # Models trained with one hash are meaningless under another: these values must never move.
    assert feature_salt("user_id") == PINNED_SALT
    out = hash_ids(np.array([0, 1, -1, 2**62], dtype=np.int64), feature_salt("ad_id"), 1_000_003)
    assert out.tolist() == PINNED_BUCKETS


def test_matches_the_scalar_reference() -> None:
    rng = np.random.default_rng(0)
    ids = rng.integers(-(2**63), 2**63 - 1, size=200, dtype=np.int64, endpoint=True)
    salt = feature_salt("campaign_id")
    for buckets in (1, 3, 1 << 20, 2**63 - 1):
        expected = [_splitmix64_reference(int(i), salt, buckets) for i in ids]
        assert hash_ids(ids, salt, buckets).tolist() == expected


def test_salt_is_taken_modulo_2_64() -> None:
    ids = np.arange(100, dtype=np.int64)
    np.testing.assert_array_equal(hash_ids(ids, 3, 1000), hash_ids(ids, 3 + 2**64, 1000))
    np.testing.assert_array_equal(hash_ids(ids, -1, 1000), hash_ids(ids, 2**64 - 1, 1000))


def test_other_integer_dtypes_hash_like_int64() -> None:
    ids = np.array([0, 5, 70_000], dtype=np.int64)
    expected = hash_ids(ids, 9, 4096)
    np.testing.assert_array_equal(hash_ids(ids.astype(np.int32), 9, 4096), expected)
    np.testing.assert_array_equal(hash_ids(ids.astype(np.uint64), 9, 4096), expected)


def test_stable_across_processes() -> None:
    # Load hashing.py on its own: the child then needs numpy only, not the whole package (torch).
    code = (
        "import importlib.util, sys\n"
        "import numpy as np\n"
        f"spec = importlib.util.spec_from_file_location('h', {hashing.__file__!r})\n"
        "h = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(h)\n"
        "feature_salt, hash_ids = h.feature_salt, h.hash_ids\n"
        "ids = np.arange(-500, 500, dtype=np.int64) * 7919\n"
        "print(feature_salt('ad_id'), hash_ids(ids, feature_salt('ad_id'), 10007).tolist())\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    ).stdout
    ids = np.arange(-500, 500, dtype=np.int64) * 7919
    here = f"{feature_salt('ad_id')} {hash_ids(ids, feature_salt('ad_id'), 10007).tolist()}\n"
    assert out == here


@pytest.mark.parametrize("buckets", [1000, 1024])
def test_sequential_ids_spread_uniformly(buckets: int) -> None:
    # Sequential ids and a power-of-two bucket count expose a mixer with weak low bits.
    out = hash_ids(np.arange(200_000, dtype=np.int64), feature_salt("ad_id"), buckets)
    stat, dof = _chi_square(np.bincount(out, minlength=buckets))
    assert _below_six_sigma(stat, dof), (stat, dof)


def test_strided_ids_spread_uniformly() -> None:
    ids = np.arange(100_000, dtype=np.int64) << 20  # ids that differ only in high bits
    stat, dof = _chi_square(np.bincount(hash_ids(ids, 0, 512), minlength=512))
    assert _below_six_sigma(stat, dof), (stat, dof)


def test_features_collide_independently() -> None:
    buckets = 64
    ids = np.arange(409_600, dtype=np.int64)
    a = hash_ids(ids, feature_salt("user_id"), buckets)
    b = hash_ids(ids, feature_salt("ad_id"), buckets)
    # If a's and b's buckets were dependent, the joint table would be far from uniform.
    joint = np.bincount(a * buckets + b, minlength=buckets * buckets)
    stat, dof = _chi_square(joint)
    assert _below_six_sigma(stat, dof), (stat, dof)
    assert abs(float((a == b).mean()) - 1 / buckets) < 0.002


def test_feature_salts_differ_per_name() -> None:
    names = ["user_id", "ad_id", "campaign_id", "advertiser_id", "category", "slot", "device"]
    salts = {feature_salt(n) for n in names}
    assert len(salts) == len(names)
    assert all(0 <= s < 2**64 for s in salts)


@pytest.mark.parametrize("buckets", [0, -3, 2**63, True, 10.0])
def test_rejects_bad_bucket_counts(buckets: object) -> None:
    with pytest.raises(
        ConfigError, match=r"config field 'buckets': expected an int in \[1, 2\*\*63\)"
    ):
        hash_ids(np.arange(3), 0, buckets)  # type: ignore[arg-type]


def test_rejects_non_integer_ids() -> None:
    with pytest.raises(
        SchemaError, match="hash_ids: expected an integer id array, got dtype float64"
    ):
        hash_ids(np.array([1.0, 2.0]), 0, 10)
