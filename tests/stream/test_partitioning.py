"""Keyed partitioning matches Kafka's default partitioner, so a key lands on the same partition
whichever backend or producer wrote it."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minutely.stream import partition_for, partitions_for

# Utils.murmur2 results as Java ints, pinned by Apache Kafka's UtilsTest.testMurmur2 (plus the
# empty key). Kafka's default partitioner sends a key to toPositive(murmur2(key)) % partitions,
# where toPositive clears the sign bit.
KAFKA_MURMUR2 = {
    b"": 275646681,
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


@pytest.mark.parametrize(("key", "murmur2"), KAFKA_MURMUR2.items())
def test_partition_matches_kafkas_default_partitioner(key: bytes, murmur2: int) -> None:
    for n in (1, 2, 3, 4, 7, 16, 1024):
        assert partition_for(key, n) == (murmur2 & 0x7FFFFFFF) % n


def test_pinned_partitions() -> None:
    # Spelled out from the table above: toPositive(-973932308) = 1173551340, and so on.
    assert partition_for(b"21", 3) == 1173551340 % 3 == 0
    assert partition_for(b"a-little-bit-long-string", 3) == 2
    assert partition_for(b"abc", 4) == 479470107 % 4 == 3


def test_partition_is_stable_and_in_range() -> None:
    keys = [f"user-{i}".encode() for i in range(200)]
    first = [partition_for(k, 6) for k in keys]
    assert first == [partition_for(k, 6) for k in keys]
    assert set(first) <= set(range(6))


def test_keys_spread_evenly() -> None:
    n, keys = 8, 16_000
    counts = Counter(partition_for(f"imp-{i}".encode(), n) for i in range(keys))
    assert sorted(counts) == list(range(n))
    assert max(counts.values()) < 1.1 * keys / n
    assert min(counts.values()) > 0.9 * keys / n


@settings(max_examples=60, deadline=None)
@given(
    length=st.integers(0, 23),
    seeds=st.lists(st.binary(min_size=23, max_size=23), min_size=8, max_size=40),
    extra=st.lists(st.binary(max_size=12), max_size=10),
    n=st.integers(1, 1024),
)
def test_bulk_partitioning_matches_one_key_at_a_time(
    length: int, seeds: list[bytes], extra: list[bytes], n: int
) -> None:
    # Many keys of one length take the vectorised path; the few others the scalar one.
    keys = [s[:length] for s in seeds] * 2 + extra
    assert partitions_for(keys, n) == [partition_for(k, n) for k in keys]


def test_bulk_partitioning_matches_kafka_vectors() -> None:
    keys = [k for k in KAFKA_MURMUR2 for _ in range(20)]
    expected = [(KAFKA_MURMUR2[k] & 0x7FFFFFFF) % 5 for k in keys]
    assert partitions_for(keys, 5) == expected
    assert partitions_for([], 5) == []
