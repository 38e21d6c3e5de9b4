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
        (
            "delayed_feedback.py",
            ["--quick", "--impressions-per-day", "20000", "--days", "2", "--arch", "lr"],
            "joined_samples_per_s_median",
        ),
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


@pytest.mark.slow
@pytest.mark.integration
def test_pipeline_benchmark_prints_every_figure_on_both_backends() -> None:
    args = ["--impressions-per-day", "20000", "--days", "0.1", "--live-rate", "3000"]
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "pipeline.py"), *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=400,
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    for backend in ("sqlite", "kafka"):
        figures = result[backend]
        assert figures["join_events_per_s"] > 0
        assert figures["train_samples_per_s"] > 0
        assert figures["replay_speed"] > 0
        assert figures["round_trip"]["round_trip_ms_p50"] > 0
        assert figures["live"]["samples"] > 0
        assert figures["live"]["lag_wall_s_p99"] >= figures["live"]["lag_wall_s_p50"] > 0
    assert result["join_goal_met"] == (result["sqlite"]["join_events_per_s"] >= 100_000)
