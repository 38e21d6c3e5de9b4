"""The delayed-feedback experiment (benchmarks/delayed_feedback.py) on a small simulated run.

Four simulated days of 300k impressions (about 9k clicks a day), a one-day label window, two
warm-up days, the criteo delay preset. What is asserted held for every seed tried (five market
seeds, three model seeds), by the margins below.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "delayed_feedback.py"


def run(*args: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=280,
    ).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


@pytest.fixture(scope="module")
def small_run() -> dict[str, Any]:
    return run(
        "--days",
        "4",
        "--warmup-days",
        "2",
        "--label-window-days",
        "1",
        "--impressions-per-day",
        "300000",
        "--strategies",
        "oracle,wait_bce,wait_pu,fnw,fnc,no_correction",
    )


@pytest.mark.slow
def test_known_labels_beat_every_label_the_join_can_know(small_run: dict[str, Any]) -> None:
    s = small_run["strategies"]
    for name in ("wait_bce", "fnw", "fnc", "no_correction"):
        assert s["oracle"]["logloss"] < s[name]["logloss"], name
    assert s["no_correction"]["ri_logloss"] == 0.0
    assert s["oracle"]["ri_logloss"] == 1.0


@pytest.mark.slow
def test_a_waiting_window_without_corrections_underestimates(small_run: dict[str, Any]) -> None:
    """About a third of the conversions within a day come after the one-hour wait."""
    s = small_run["strategies"]
    assert s["wait_bce"]["pcoc"] < 0.9
    assert s["wait_bce"]["trained_corrections"] == 0
    assert s["wait_bce"]["trained_positives"] < s["no_correction"]["trained_positives"]


@pytest.mark.slow
def test_pu_corrections_lift_the_waiting_windows_underestimate(small_run: dict[str, Any]) -> None:
    """The same waiting window with the late conversions as corrections: every correction is a
    sample the window had trained as a negative, and the pu loss undoes that negative, so the
    estimate no longer sits at the share of conversions that came within the hour."""
    s = small_run["strategies"]
    pu, bce = s["wait_pu"], s["wait_bce"]
    assert pu["trained_corrections"] > 0
    assert pu["trained_positives"] == bce["trained_positives"] + pu["trained_corrections"]
    assert pu["trained_samples"] == bce["trained_samples"] + pu["trained_corrections"]
    assert pu["pcoc"] > bce["pcoc"] + 0.2


@pytest.mark.slow
def test_fnw_and_fnc_raise_the_estimate_of_duplicates_taken_as_plain_positives(
    small_run: dict[str, Any],
) -> None:
    """On the emit-at-once stream, plain BCE learns q / (1 + q); fnw and fnc undo that."""
    s = small_run["strategies"]
    for name in ("fnw", "fnc"):
        assert s[name]["pcoc"] > s["no_correction"]["pcoc"], name
        assert s[name]["trained_samples"] == s["no_correction"]["trained_samples"], name
    assert s["no_correction"]["trained_positives"] == s["no_correction"]["trained_corrections"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--strategies", "oracle,bogus"],
            "--strategies: expected names among ['oracle', 'wait_bce', 'wait_pu', 'fnw', 'fnc', "
            "'no_correction', 'no_feedback'], got ['oracle', 'bogus']",
        ),
        (["--warmup-days", "3"], "--warmup-days: expected in [0, --days 3), got 3"),
        (
            ["--wait-min", "1440"],
            "--wait-min: expected >= 0 and shorter than --label-window-days 1, got 1440",
        ),
        (["--window-min", "0"], "--window-min: expected >= 1, got 0"),
    ],
)
def test_bad_arguments_are_refused_by_name(args: list[str], message: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert message in proc.stderr


def test_a_data_file_without_a_good_line_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "log.txt"
    path.write_text("junk\n", encoding="ascii")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--data", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert f"--data: no well-formed line in {path}" in proc.stderr
