"""The feature snapshot benchmark runs and ends with one JSON object (tiny sizes: shape only)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_features_benchmark_prints_its_figures_last() -> None:
    args = ["--impressions", "12000", "--batch", "4000", "--write-batch", "3000"]
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "features.py"), *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=240,
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["impressions"] == 12_000
    for key in (
        "write_rows_per_s",
        "lookup_cold_ids_per_s",
        "lookup_cold_ids_per_s_overall",
        "lookup_warm_ids_per_s",
        "lookup_fresh_ids_per_s",
        "found_dicts_per_s",
        "join_time_share",
    ):
        assert result[key] > 0, key
    assert result["buckets_read"] >= 1
