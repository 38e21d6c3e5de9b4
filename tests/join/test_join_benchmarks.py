"""The join's state benchmarks run and end with one JSON object (shape, not speed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def last_json(script: str, *args: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=240,
    ).stdout
    result: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    return result


@pytest.mark.slow
def test_the_store_benchmark_compares_both_stores_on_the_same_work() -> None:
    result = last_json("join_state.py", "--quick", "--repeats", "1")
    for store in ("sqlite", "rocksdb"):
        figures = result[store]
        assert isinstance(figures, dict)
        assert figures["ops_per_s"] > 0
        assert figures["bytes_on_disk"] > 0
    assert isinstance(result["rocksdb_over_sqlite_ops"], float)
    assert result["rocksdb_over_sqlite_ops"] > 0


@pytest.mark.slow
def test_the_join_benchmark_runs_with_its_state_on_disk() -> None:
    args = ("--impressions", "5000", "--repeats", "1")
    on_disk = last_json("join.py", *args, "--store-every", "2000")
    in_memory = last_json("join.py", *args)
    assert on_disk["store_every"] == 2000
    assert on_disk["events_per_s"] > 0
    assert on_disk["emitted"] == in_memory["emitted"]  # the same samples either way
