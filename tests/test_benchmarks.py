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
        ("train.py", ["--quick"], "large_trainer_over_plain"),
        ("ingest.py", ["--samples", "4096", "--rounds", "1", "--backends", "sqlite"], "samples"),
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


@pytest.mark.slow
@pytest.mark.integration
def test_strategies_benchmark_scores_every_request_of_every_strategy() -> None:
    impressions, scored_days = 3_000, 2
    args = ["--quick", "--impressions-per-day", str(impressions), "--window-s", "1800"]
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "strategies.py"), *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=400,
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    strategies = result["strategies"]
    assert list(strategies) == [
        "day_only",
        "hourly",
        "online",
        "online_no_distill",
        "online_no_frozen",
        "oracle",
    ]
    for per_model in strategies.values():
        # pCTR: every impression of the scored days; pCVR: the same clicks for every strategy
        assert per_model["ctr"]["n"] == impressions * scored_days
        assert per_model["cvr"]["n"] == strategies["day_only"]["cvr"]["n"] > 0
        assert len(per_model["ctr"]["daily_auc"]) == scored_days
    # one batch version a day, one an hour; online versions come on top of the daily ones
    assert strategies["day_only"]["ctr"]["versions_served"] == scored_days
    assert strategies["hourly"]["ctr"]["versions_served"] == 24 * scored_days
    assert strategies["online"]["ctr"]["versions_served"] > scored_days
    for name, ri_auc in result["ri_auc"].items():
        for model, value in ri_auc.items():
            auc = {s: strategies[s][model]["auc"] for s in (name, "day_only", "oracle")}
            gap = auc["oracle"] - auc["day_only"]
            if gap == 0:
                assert value is None
            else:
                assert value == pytest.approx((auc[name] - auc["day_only"]) / gap, abs=1e-3)
    for model in ("ctr", "cvr"):
        ri_online = result["ri_auc"]["online"][model]
        met = result["goals"][f"ri_auc_{model}_ge_0.9"]
        assert met == (None if ri_online is None else ri_online >= 0.9)
    regime = result["regime"]
    for per_model in regime["strategies"].values():
        ctr = per_model["ctr"]
        assert ctr["b"]["hours"] == [regime["regime_switch_hour"], regime["regime_end_hour"]]
        assert ctr["a_before"]["n"] + ctr["b"]["n"] + ctr["a_return"]["n"] == impressions
        assert len(ctr["hourly_auc"]) == 24


@pytest.mark.slow
@pytest.mark.integration
def test_serving_benchmark_measures_swaps_without_failures() -> None:
    args = ["--duration", "1", "--rounds", "1", "--rate", "50", "--candidates", "10"]
    args += ["--swap-every-s", "1", "--scenarios", "best_swaps"]
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "serving.py"), *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    figures = result["scenarios"]["best_swaps"]
    assert figures["ok"] == figures["sent"] == 50
    assert figures["failed"] == result["failed_during_swaps"] == 0
    assert figures["p99_ms"] >= figures["p50_ms"] > 0
    assert figures["published"] >= 1
    assert figures["server_cpu_ms_per_request"] > 0
    assert result["server_exit_codes"] == {"best": 0}


@pytest.mark.slow
@pytest.mark.integration
def test_distribution_benchmark_measures_peer_origin_and_delta_modes() -> None:
    args = ["--agents", "2", "--mib", "2", "--chunk-mib", "0.25", "--poll-interval", "0.1"]
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "distribution.py"), *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=240,
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["agents"] == 2
    for mode in ("single", "peer", "delta", "origin_only"):
        assert result[mode]["seconds_all"] >= result[mode]["seconds_first"] > 0
        assert result[mode]["refusals"] == result[mode]["peers_dropped"] == 0
    assert result["single"]["origin_copies"] == 1.0
    assert result["origin_only"]["origin_copies"] == 2.0  # each agent read one copy
    assert result["origin_only"]["chunks_from_peers"] == 0
    assert result["peer"]["chunks_from_peers"] > 0
    assert result["delta"]["is_delta"]
    assert result["delta_over_full_bytes"] == round(
        result["delta"]["delta_bytes"] / result["model_bytes"], 5
    )
    goals = result["goals"]
    assert goals["origin_copies_per_region_le_1_5"] == (result["peer"]["origin_copies"] <= 1.5)
    assert goals["all_live_within_3x_single"] == (
        result["peer"]["seconds_all"] <= 3 * result["single"]["seconds_all"]
    )
