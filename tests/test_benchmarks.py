"""Each benchmark runs and ends with one JSON object (tiny sizes: this checks shape, not speed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "args", "key"),
    [
        ("sim.py", ["--impressions-per-day", "5000"], "events_per_s"),
        ("join.py", ["--impressions", "5000", "--repeats", "1"], "events_per_s"),
    ],
)
def test_benchmark_prints_json_last(script: str, args: list[str], key: str) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=240,
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result[key] > 0
