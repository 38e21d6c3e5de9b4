"""The live-version monitor: quality anomalies, stalls, its checkpoint, and rollback events."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from minutely.config import MonitorConfig
from minutely.errors import CheckpointError, StorageError
from minutely.pipeline.monitor import (
    Anomaly,
    Monitor,
    RollbackEvent,
    append_event,
    read_events,
)

MIN = 60_000
CFG = MonitorConfig(
    windows=3,
    min_positives=50,
    max_auc_drop=0.03,
    pcoc_min=0.7,
    pcoc_max=1.4,
    stall_timeout_s=600.0,
)


def window(seed: int, n: int = 1_000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(x, p, y)``: a feature, the true probability (the warm-start version's prediction,
    calibrated, AUC about 0.8) and labels drawn from it."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, n)
    p = 1 / (1 + np.exp(-(-2.5 + 1.5 * x)))
    y = (rng.random(n) < p).astype(np.float64)
    return x, p, y


def good(x: np.ndarray, seed: int) -> np.ndarray:
    """A live version about as good as the warm-start one."""
    noise = np.random.default_rng(seed + 10_000).normal(0, 0.1, x.size)
    return 1 / (1 + np.exp(-(-2.5 + 1.5 * x + noise)))


def flipped(x: np.ndarray) -> np.ndarray:
    """A live version that learned flipped labels: the same scores, ranked the other way."""
    return 1 / (1 + np.exp(-(-2.5 - 1.5 * x)))


def observe_clean(mon: Monitor, k: int, *, start: int = 0, live: str = "v00000005") -> None:
    for i in range(start, start + k):
        x, p, y = window(i)
        assert mon.observe((i + 1) * MIN, good(x, i), p, y, live, "v00000001", now_ms=i) is None


def test_clean_windows_show_no_anomaly_and_are_recorded() -> None:
    mon = Monitor(CFG)
    observe_clean(mon, 8)
    assert mon.pooled_windows == 3
    assert len(mon.history) == 8
    h = mon.history[-1]
    _, p, y = window(7)
    assert (h.window_end_ms, h.n, h.positives) == (8 * MIN, 1_000, int(y.sum()))
    assert (h.live_version, h.warm_version, h.observed_ms) == ("v00000005", "v00000001", 7)
    assert h.warm_auc is not None
    assert h.live_auc is not None
    assert abs(h.live_auc - h.warm_auc) < 0.03
    assert h.warm_pcoc == pytest.approx(float(p.sum() / y.sum()), rel=1e-6)


def test_a_burst_of_flipped_labels_is_an_auc_drop_naming_the_numbers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="minutely.monitor")
    mon = Monitor(CFG)
    observe_clean(mon, 2)
    x, p, y = window(2)
    anomaly = mon.observe(3 * MIN, flipped(x), p, y, "v00000006", "v00000001", now_ms=3)
    assert anomaly is not None
    assert anomaly.kind == "auc_drop"
    ev = anomaly.evidence
    assert ev["live_auc"] < ev["warm_auc"] - 0.03
    assert (ev["first_window_end_ms"], ev["last_window_end_ms"], ev["windows"]) == (
        MIN,
        3 * MIN,
        3,
    )
    assert (ev["live_version"], ev["warm_version"]) == ("v00000006", "v00000001")
    assert ev["pooled_live_versions"] == ["v00000005", "v00000006"]
    assert ev["n"] == 3_000
    assert ev["positives"] == sum(int(window(i)[2].sum()) for i in range(3))
    assert ev["max_auc_drop"] == 0.03
    json.dumps(ev, allow_nan=False)  # evidence is plain JSON
    [record] = caplog.records
    assert "v00000006" in record.getMessage()
    assert f"live_auc={ev['live_auc']}" in record.getMessage()


def test_live_predictions_scaled_by_two_are_a_pcoc_anomaly() -> None:
    mon = Monitor(CFG)
    x, p, y = window(0)
    anomaly = mon.observe(MIN, np.minimum(2 * good(x, 0), 1.0), p, y, "v2", "v1", now_ms=0)
    assert anomaly is not None
    assert anomaly.kind == "pcoc"
    assert anomaly.evidence["live_pcoc"] > 1.4
    assert anomaly.evidence["warm_pcoc"] == pytest.approx(float(p.sum() / y.sum()), rel=1e-6)
    assert (anomaly.evidence["pcoc_min"], anomaly.evidence["pcoc_max"]) == (0.7, 1.4)
    low = Monitor(CFG).observe(MIN, 0.5 * good(x, 0), p, y, "v2", "v1", now_ms=0)
    assert low is not None
    assert low.kind == "pcoc"
    assert low.evidence["live_pcoc"] < 0.7


def test_nothing_is_judged_until_the_pool_holds_min_positives() -> None:
    mon = Monitor(MonitorConfig(windows=10, min_positives=50))
    pooled = 0
    judged = False
    for i in range(10):
        x, p, y = window(i, n=120)
        pooled += int(y.sum())
        anomaly = mon.observe((i + 1) * MIN, flipped(x), p, y, "v2", "v1", now_ms=i)
        if pooled < 50:
            assert anomaly is None, (i, pooled)
        else:
            assert anomaly is not None
            assert anomaly.evidence["positives"] == pooled
            judged = True
            break
    assert judged


def test_never_an_anomaly_while_the_live_version_is_the_warm_start_version() -> None:
    mon = Monitor(CFG)
    for i in range(5):
        x, p, y = window(i)
        assert mon.observe((i + 1) * MIN, flipped(x), p, y, "v1", "v1", now_ms=i) is None
    assert mon.pooled_windows == 0  # nothing to compare: not pooled either
    assert len(mon.history) == 5


def test_a_new_warm_start_version_empties_the_pool() -> None:
    mon = Monitor(CFG)
    observe_clean(mon, 2)
    assert mon.pooled_windows == 2
    x, p, y = window(2)
    assert mon.observe(3 * MIN, good(x, 2), p, y, "v00000009", "v00000008", now_ms=2) is None
    assert mon.pooled_windows == 1


def test_bad_windows_leave_the_pool_after_windows_clean_ones() -> None:
    mon = Monitor(CFG)
    x, p, y = window(0)
    assert mon.observe(MIN, flipped(x), p, y, "v2", "v1", now_ms=0) is not None
    results = []
    for i in range(1, 4):
        x, p, y = window(i)
        results.append(mon.observe((i + 1) * MIN, good(x, i), p, y, "v3", "v1", now_ms=i))
    assert results[-1] is None  # the flipped window is out of the last three
    assert mon.pooled_windows == 3


def test_reset_forgets_the_pooled_windows() -> None:
    mon = Monitor(CFG)
    x, p, y = window(0)
    assert mon.observe(MIN, flipped(x), p, y, "v2", "v1", now_ms=0) is not None
    mon.reset(now_ms=5)
    assert mon.pooled_windows == 0
    assert len(mon.history) == 1
    # A small window alone is below min_positives: not judged, although it is as bad.
    x, p, y = window(1, n=100)
    assert int(y.sum()) < 50
    assert mon.observe(2 * MIN, flipped(x), p, y, "v2", "v1", now_ms=6) is None


def test_a_stall_is_reported_after_the_timeout_and_not_before() -> None:
    mon = Monitor(CFG, started_ms=1_000_000)
    assert mon.check_stall(1_000_000 + 599_999) is None
    stall = mon.check_stall(1_000_000 + 600_000)
    assert stall is not None
    assert stall.kind == "stall"
    assert stall.evidence == {
        "silent_s": 600.0,
        "stall_timeout_s": 600.0,
        "last_observed_ms": 1_000_000,
        "last_window_end_ms": None,
    }
    assert mon.check_stall(1_000_000 + 900_000) is None  # once per silence
    _, p, y = window(0)
    mon.observe(MIN, p, p, y, "v1", "v1", now_ms=2_000_000)
    assert mon.check_stall(2_000_000 + 599_000) is None
    again = mon.check_stall(2_000_000 + 601_000)
    assert again is not None
    assert again.evidence["last_window_end_ms"] == MIN
    mon.reset(3_000_000)
    assert mon.check_stall(3_000_000 + 599_000) is None
    assert mon.check_stall(3_000_000 + 600_000) is not None


def test_no_stall_without_a_start_or_a_window() -> None:
    assert Monitor(CFG).check_stall(10**12) is None


def test_progress_reports_lag_throughput_and_age() -> None:
    mon = Monitor(CFG, started_ms=0)
    _, p, y = window(0)
    mon.observe(10 * MIN, p, p, y, "v1", "v1", now_ms=11 * MIN)
    prog = mon.progress(
        12 * MIN, last_window_end_ms=10 * MIN, live_version_created_ms=5 * MIN, samples_per_s=250.0
    )
    assert prog.to_dict() == {
        "lag_s": 120.0,
        "samples_per_s": 250.0,
        "live_version_age_s": 420.0,
        "since_last_window_s": 60.0,
    }
    assert (
        Monitor(CFG)
        .progress(0, last_window_end_ms=0, live_version_created_ms=0, samples_per_s=0.0)
        .since_last_window_s
        is None
    )
    with pytest.raises(
        ValueError, match=r"samples_per_s: expected a finite number >= 0, got -1\.0"
    ):
        mon.progress(0, last_window_end_ms=0, live_version_created_ms=0, samples_per_s=-1.0)


def test_state_round_trips_through_json_and_judges_the_same() -> None:
    mon = Monitor(CFG, started_ms=0)
    observe_clean(mon, 4)
    restored = Monitor.from_dict(CFG, json.loads(json.dumps(mon.to_dict())))
    assert restored.to_dict() == mon.to_dict()
    assert list(restored.history) == list(mon.history)
    x, p, y = window(4)
    a = mon.observe(5 * MIN, flipped(x), p, y, "v7", "v00000001", now_ms=9)
    b = restored.observe(5 * MIN, flipped(x), p, y, "v7", "v00000001", now_ms=9)
    assert a is not None
    assert a == b
    assert restored.check_stall(9 + 600_000) == mon.check_stall(9 + 600_000)


def test_the_checkpoint_holds_only_the_pooled_windows() -> None:
    mon = Monitor(CFG, history=5)
    observe_clean(mon, 20)
    d = mon.to_dict()
    assert len(d["pool"]) == 3
    assert len(d["history"]) == 5
    # 1,000 rows a window: 4 + 4 + 1 bytes a row, base64.
    assert len(json.dumps(d)) < 3 * 9_000 * 4 / 3 + 5_000


def test_a_smaller_windows_setting_keeps_the_newest_windows() -> None:
    mon = Monitor(CFG)
    observe_clean(mon, 3)
    fewer = Monitor.from_dict(MonitorConfig(windows=1), mon.to_dict())
    assert fewer.pooled_windows == 1
    assert fewer.to_dict()["pool"] == mon.to_dict()["pool"][-1:]


def test_a_window_must_come_after_the_last_one_also_after_a_restore() -> None:
    mon = Monitor(CFG)
    observe_clean(mon, 1)
    restored = Monitor.from_dict(CFG, mon.to_dict())
    _, p, y = window(1)
    with pytest.raises(ValueError, match=r"window_end_ms: expected > 60000 \(the previous"):
        restored.observe(MIN, p, p, y, "v2", "v1", now_ms=0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            (MIN, [0.1, 0.2], [0.1, 0.2, 0.3], [0, 1, 1], "v2", "v1"),
            "live_preds: expected predictions and labels of one length, got 2 and 3",
        ),
        (
            (MIN, [0.1, 0.2], [0.1], [0, 1], "v2", "v1"),
            "warm_preds: expected predictions and labels of one length, got 1 and 2",
        ),
        (
            (MIN, [0.1, 1.5], [0.1, 0.2], [0, 1], "v2", "v1"),
            r"live_preds: expected predictions in \[0, 1\], got \[1.5\]",
        ),
        (
            (MIN, [0.1, 0.2], [0.1, -0.2], [0, 1], "v2", "v1"),
            r"warm_preds: expected predictions in \[0, 1\], got \[-0.2\]",
        ),
        (
            (MIN, [0.1, 0.2], [0.1, 0.2], [0, 3], "v2", "v1"),
            r"live_preds: expected labels 0 or 1, got \[3.0\]",
        ),
        (
            (MIN, [0.1, 0.2], [0.1, 0.2], [0, 1], "", "v1"),
            "live_version: expected a version, got ''",
        ),
        (
            (MIN, [0.1, 0.2], [0.1, 0.2], [0, 1], "v2", None),
            "warm_version: expected a version, got None",
        ),
        (
            (60.5, [0.1, 0.2], [0.1, 0.2], [0, 1], "v2", "v1"),
            "window_end_ms: expected an int, got 60.5",
        ),
    ],
)
def test_bad_observations_are_refused_naming_what_was_expected(
    args: tuple[object, ...], message: str
) -> None:
    mon = Monitor(CFG)
    with pytest.raises(ValueError, match=message):
        mon.observe(*args, now_ms=0)  # type: ignore[arg-type]
    assert len(mon.history) == 0


def test_a_history_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="history: expected >= 1, got 0"):
        Monitor(CFG, history=0)


def test_a_damaged_state_is_named() -> None:
    mon = Monitor(CFG)
    observe_clean(mon, 2)
    good_state = mon.to_dict()
    with pytest.raises(CheckpointError, match=r"expected fields \['pool'\]"):
        Monitor.from_dict(CFG, {k: v for k, v in good_state.items() if k != "pool"})
    with pytest.raises(CheckpointError, match="monitor state: expected a dict, got list"):
        Monitor.from_dict(CFG, [])  # type: ignore[arg-type]
    bad = json.loads(json.dumps(good_state))
    bad["pool"][1]["live"] = "not base64!"
    with pytest.raises(CheckpointError, match=r"pool\[1\]\.live: expected base64 <f4"):
        Monitor.from_dict(CFG, bad)
    bad = json.loads(json.dumps(good_state))
    bad["pool"][0]["labels"] = bad["pool"][0]["labels"][:8]
    with pytest.raises(CheckpointError, match=r"pool\[0\]: expected arrays of one length"):
        Monitor.from_dict(CFG, bad)
    bad = json.loads(json.dumps(good_state))
    bad["last_observed_ms"] = "soon"
    with pytest.raises(CheckpointError, match="last_observed_ms: expected int, got 'soon'"):
        Monitor.from_dict(CFG, bad)
    bad = json.loads(json.dumps(good_state))
    del bad["pool"][0]["warm"]
    with pytest.raises(CheckpointError, match="expected the fields to_dict writes"):
        Monitor.from_dict(CFG, bad)
    bad = json.loads(json.dumps(good_state))
    bad["history"][0]["extra"] = 1
    with pytest.raises(CheckpointError, match="expected the fields to_dict writes"):
        Monitor.from_dict(CFG, bad)


def test_anomaly_describe_lists_the_evidence() -> None:
    a = Anomaly("pcoc", {"live_pcoc": 1.9, "live_version": "v2"})
    assert a.describe() == "pcoc: live_pcoc=1.9, live_version=v2"


# -- rollback events ----------------------------------------------------------------------------


def event(i: int) -> RollbackEvent:
    return RollbackEvent(
        model="ctr",
        at_ms=1_000 * i,
        from_version=f"v{i + 1:08d}",
        to_version="v00000001",
        kind="auc_drop",
        evidence={"live_auc": 0.61, "warm_auc": 0.7, "windows": 3},
    )


def test_events_are_appended_as_json_lines_and_read_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="minutely.monitor")
    path = tmp_path / "events.jsonl"
    assert read_events(path) == []
    append_event(path, event(1))
    append_event(path, event(2))
    assert read_events(path) == [event(1), event(2)]
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    assert json.loads(lines[0])["from_version"] == "v00000002"
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.WARNING]
    assert "ctr: rolled back from v00000002 to v00000001 at 1000 (auc_drop)" in (
        caplog.records[0].getMessage()
    )


def test_an_unfinished_last_line_is_ignored_then_cut(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    append_event(path, event(1))
    with open(path, "ab") as f:
        f.write(b'{"model": "ctr", "at_')  # a crash in the middle of an append
    assert read_events(path) == [event(1)]
    append_event(path, event(2))
    assert read_events(path) == [event(1), event(2)]
    only_torn = tmp_path / "torn.jsonl"
    only_torn.write_bytes(b'{"model"')
    append_event(only_torn, event(3))
    assert read_events(only_torn) == [event(3)]


def test_a_line_that_is_no_event_is_named(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    append_event(path, event(1))
    with open(path, "a") as f:
        f.write('{"model": "ctr"}\n')
    with pytest.raises(ValueError, match=r"events.jsonl:2: expected a rollback event"):
        read_events(path)
    path.write_text("[1, 2]\n")
    with pytest.raises(
        ValueError, match=r"events.jsonl:1: expected a rollback event .*a JSON list"
    ):
        read_events(path)
    path.write_text(event(1).to_json().replace("auc_drop", "boredom") + "\n")
    with pytest.raises(ValueError, match=r":1: expected a rollback event .*kind 'boredom'"):
        read_events(path)


def test_an_event_file_that_cannot_be_written_is_named(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.mkdir()  # a folder in the way
    with pytest.raises(StorageError, match=r"events\.jsonl: expected to append a rollback event"):
        append_event(path, event(1))


def test_a_drop_or_a_pcoc_within_the_pools_noise_is_no_anomaly() -> None:
    rng = np.random.default_rng(3)
    n = 3_000
    y = (rng.random(n) < 0.03).astype(np.float64)  # about 90 positives
    warm = np.clip(0.03 + 0.02 * (y - 0.03) + rng.normal(0, 0.01, n), 1e-4, 1.0)
    # Slightly worse ranking (AUC down about 0.04) and 45% over-predicting: both within
    # two standard errors of ~90 positives, both beyond the plain thresholds.
    live = np.clip(warm + rng.normal(0, 0.006, n), 1e-4, 1.0) * 1.45
    plain = MonitorConfig(windows=1, min_positives=50, max_auc_drop=0.03, confidence_z=0.0)
    noisy = MonitorConfig(windows=1, min_positives=50, max_auc_drop=0.03, confidence_z=2.0)
    strict = Monitor(plain).observe(60_000, live, warm, y, "v2", "v1", now_ms=0)
    assert strict is not None
    assert Monitor(noisy).observe(60_000, live, warm, y, "v2", "v1", now_ms=0) is None
    # A gross miscalibration stands out of the noise.
    gross = Monitor(noisy).observe(60_000, warm * 3.0, warm, y, "v2", "v1", now_ms=0)
    assert gross is not None
    assert gross.kind == "pcoc"
    low, high = gross.evidence["pcoc_band_with_noise"]
    assert low < 0.7 < 1.4 < high < gross.evidence["live_pcoc"]
