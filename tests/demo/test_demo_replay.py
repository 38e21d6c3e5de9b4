"""The demo end to end on a small market: a real server process, real artifacts."""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from minutely.cli import main
from minutely.clock import MS_PER_DAY, MS_PER_HOUR
from minutely.config import Config, load_config
from minutely.demo.replay import (
    eventual_click_labels,
    eventual_conversion_labels,
    impression_features,
)
from minutely.demo.run import demo_models, run_demo
from minutely.errors import CheckpointError, ConfigError, StorageError
from minutely.registry import Registry
from minutely.sim import CLICK, IMP_ID_STRIDE, IMPRESSION, Market

SMALL_NET = {"buckets": 4096, "embedding_dim": 4, "hidden": [16], "loss": "pu"}
TINY = {
    # a high conversion rate, so a tiny day has enough converted clicks to rank
    "sim": {
        "impressions_per_day": 12_000,
        "users": 2_000,
        "campaigns_per_hour": 4,
        "base_cvr": 0.3,
    },
    "stream": {"partitions": 2},
    "models": [
        {"name": "ctr", **SMALL_NET},
        {
            "name": "cvr",
            "label": "conversion",
            "attribution_window_s": 3_600,
            "correction_horizon_s": 7 * 86_400,
            **SMALL_NET,
        },
    ],
    "train": {"window_s": 900, "batch_size": 256},
    "export": {"every_min": 30, "min_samples": 20, "keep_versions": 3},
    "demo": {"corrupt_every": 500, "score_batch": 500},
}


STRATEGIES = ("day_only", "hourly", "online")
SCORE_KEYS = ("imp_ids", "ts_ms", *STRATEGIES, "versions")


def saved_scores(run_dir: Path, model: str) -> dict[str, np.ndarray]:
    """Every request the run scored for ``model`` (its ``scores/*.npz``, in window order)."""
    files = sorted((run_dir / "scores").glob("*.npz"), key=lambda f: int(f.stem))
    parts: dict[str, list[np.ndarray]] = {k: [] for k in SCORE_KEYS}
    for f in files:
        with np.load(f) as z:
            for k in SCORE_KEYS:
                parts[k].append(z[f"{model}.{k}"])
    return {k: np.concatenate(v) for k, v in parts.items()}


def day_two_clicks(cfg: Config) -> np.ndarray:
    """The impression ids of every click of the replayed day, in time order."""
    market = Market(cfg.sim)
    start = market.day_start_ms(cfg.demo.days - 1)
    batch = market.events_between(start, start + MS_PER_DAY)
    return batch.imp_id[batch.kind == CLICK]


@pytest.mark.integration
@pytest.mark.slow
def test_demo_trains_and_reports_both_models_end_to_end(tmp_path: Path) -> None:
    cfg = load_config(None, TINY)
    lines: list[str] = []
    results = run_demo(cfg, run_dir=tmp_path, progress=False, echo=lines.append)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert (tmp_path / "auc_per_hour.png").stat().st_size > 10_000
    assert list(results["models"]) == ["ctr", "cvr"]
    ctr, cvr = results["models"]["ctr"], results["models"]["cvr"]

    # both models: the three strategies on every request, finite figures
    for res in (ctr, cvr):
        assert list(res["strategies"]) == list(STRATEGIES)
        assert list(res["final_label"]["strategies"]) == list(STRATEGIES)
        for r in (*res["strategies"].values(), *res["final_label"]["strategies"].values()):
            assert r["n"] == res["requests"]
            assert all(math.isfinite(r[k]) for k in ("auc", "logloss", "pcoc")), r
        assert [h["hour"] for h in res["hourly"]] == list(range(24))
        # the day model is the cut's version at the start of day 2, and served first
        start = cfg.sim.start_ms + MS_PER_DAY
        assert res["day_model"]["created_ms"] == start
        assert res["served"][0]["version"] == res["day_model"]["version"]
        assert res["strategies"]["hourly"]["versions_served"] == 24  # one model per hour

    # pCTR: every impression of the day, scored by the live version and the day model
    online, day = ctr["strategies"]["online"], ctr["strategies"]["day_only"]
    assert online["n"] == day["n"] == ctr["requests"] == 12_000
    # every 30 event-time minutes over a day, each one served before the next window
    assert online["versions_served"] >= 40
    assert day["versions_served"] == 1
    assert 0.5 < online["auc"] < 1.0
    # kept: the 3 newest (the cut at the end of the day) and what they need: their bases and
    # the versions their deltas apply to
    registry = Registry(tmp_path / "registry")
    kept = registry.versions("ctr")
    manifests = [registry.manifest("ctr", v) for v in kept]
    needed = {m.base for m in manifests} | {m.delta_of for m in manifests}
    assert set(kept) <= set(kept[-3:]) | needed
    assert any(m.delta_of is not None for m in manifests)  # online versions ship as deltas

    # the hourly model is the day model until the end of the first hour, then moves
    for name in ("ctr", "cvr"):
        req = saved_scores(tmp_path, name)
        hour = (req["ts_ms"] - start) // MS_PER_HOUR
        first = hour == 0
        assert first.sum() > 0
        np.testing.assert_allclose(req["hourly"][first], req["day_only"][first], rtol=1e-6)
        later = ~first
        moved = ~np.isclose(req["hourly"][later], req["day_only"][later], rtol=1e-4)
        assert moved.mean() > 0.9, (name, moved.mean())
        for h in np.unique(hour[later]).tolist():
            assert moved[hour[later] == h].any(), (name, h)
        # and it is not the online model either
        assert not np.allclose(req["hourly"][later], req["online"][later], rtol=1e-4)
    assert ctr["hourly"][0]["hourly_auc"] == ctr["hourly"][0]["day_only_auc"]

    # the gate's and the monitor's counts
    for res in (ctr, cvr):
        gate, monitor = res["gate"], res["monitor"]
        assert gate["exported"] == res["versions_exported"]
        assert (gate["last_refusal"] is None) == (gate["refused"] == 0)
        assert monitor["rollbacks"] == len(monitor["events"])

    # pCVR: every click of the day, scored when it arrived, judged on conversions within an
    # hour of the click
    clicks = day_two_clicks(cfg)
    online, day = cvr["strategies"]["online"], cvr["strategies"]["day_only"]
    assert online["n"] == day["n"] == cvr["requests"] == len(clicks) > 200
    assert 0 < online["positives"] == day["positives"] < online["n"]
    for r in (online, day):
        assert all(math.isfinite(r[k]) for k in ("auc", "logloss", "pcoc")), r
    assert cvr["day_model"]["train_samples"] > 200
    assert cvr["samples_trained_online"] > 200
    assert cvr["versions_exported"] >= 3
    assert online["versions_served"] >= 2
    assert "3600 s of the click" in cvr["judged_on"]
    assert "600 s of the impression" in ctr["judged_on"]
    # the final label also counts what the correction horizon brings: for pCVR (an hour's
    # window, 7 days' horizon) many more conversions
    final = cvr["final_label"]
    assert "608400 s of the click" in final["judged_on"]
    for key in ("day_only", "online"):
        assert final["strategies"][key]["n"] == cvr["requests"]
        assert final["strategies"][key]["positives"] > cvr["strategies"][key]["positives"]
        assert math.isfinite(final["strategies"][key]["auc"])
    assert "4200 s of the impression" in ctr["final_label"]["judged_on"]

    pipe = results["pipeline"]
    assert pipe["dead_letters"] == pipe["malformed_injected"] > 0
    assert pipe["samples"]["cvr"] > 0
    assert pipe["versions_exported"] == {
        "ctr": ctr["versions_exported"],
        "cvr": cvr["versions_exported"],
    }
    table = "\n".join(lines)
    for label in ("day model only", "hourly ", "online "):
        assert table.count(f"ctr     {label}") == table.count(f"cvr     {label}") == 2, label
    assert f"ctr: exports {ctr['gate']['exported']} (warm starts included)" in table
    # a few clicks a window: the pCVR model often has too few new samples to export
    assert cvr["gate"]["skipped"] > 0
    assert f"skipped by the policy {cvr['gate']['skipped']}; rollbacks 0" in table
    # the replay rule: each request answered by the newest version created before it arrived
    for res in (ctr, cvr):
        served = res["served"]
        assert len(served) == res["strategies"]["online"]["versions_served"]
        assert sum(v["requests"] for v in served) == res["requests"]
        for prev, nxt in itertools.pairwise(served):
            assert prev["created_ms"] <= prev["first_request_ms"]
            assert prev["last_request_ms"] < nxt["created_ms"] <= nxt["first_request_ms"]


@pytest.mark.integration
@pytest.mark.slow
def test_a_label_shift_is_rolled_back_and_served_from_the_next_window(tmp_path: Path) -> None:
    cfg = load_config(None, TINY)
    start = cfg.sim.start_ms + MS_PER_DAY
    burst = (start + 6 * MS_PER_HOUR, start + 8 * MS_PER_HOUR)
    window_ms = cfg.train.window_s * 1000

    def flip(model: str, end_ms: int, table: pa.Table) -> pa.Table:
        """Two hours of pCTR samples with every label flipped: the live version's PCOC on
        them leaves the monitor's band."""
        if model != "ctr" or not burst[0] < end_ms <= burst[1]:
            return table
        i = table.schema.get_field_index("label")
        labels = table["label"].to_numpy(zero_copy_only=False).astype(bool)
        return table.set_column(i, table.schema.field(i), pa.array(~labels, table["label"].type))

    lines: list[str] = []
    results = run_demo(cfg, run_dir=tmp_path, progress=False, echo=lines.append, transform=flip)
    ctr, cvr = results["models"]["ctr"], results["models"]["cvr"]
    events = ctr["monitor"]["events"]
    assert ctr["monitor"]["rollbacks"] == len(events) >= 1
    first = events[0]
    assert first["kind"] in ("auc_drop", "pcoc")
    assert not 0.7 <= first["evidence"]["live_pcoc"] <= 1.4
    assert burst[0] < first["at_ms"] <= burst[0] + 2 * window_ms
    for event in events:
        assert event["to_version"] == ctr["day_model"]["version"] != event["from_version"]
        assert burst[0] < event["at_ms"] <= burst[1] + 2 * window_ms
        # the version rolled back from answered until then; the server answered the next
        # window's requests with the version rolled back to
        before = [s for s in ctr["served"] if s["last_request_ms"] < event["at_ms"]]
        assert before[-1]["version"] == event["from_version"]
        after = next(s for s in ctr["served"] if s["first_request_ms"] >= event["at_ms"])
        assert after["version"] == event["to_version"]
        assert after["first_request_ms"] < event["at_ms"] + window_ms
    assert cvr["monitor"] == {"rollbacks": 0, "events": []}
    table = "\n".join(lines)
    assert (
        f"ctr: rolled back from {first['from_version']} to {first['to_version']} at "
        f"{first['at_ms']} ({first['kind']})" in table
    )
    assert f"refused by the gate {ctr['gate']['refused']}" in table
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["models"]["ctr"]["monitor"]["events"] == events


def test_a_demo_naming_an_unknown_model_fails_naming_the_field(
    capsys: pytest.CaptureFixture[str],
) -> None:
    message = "config field 'demo.models': expected names of models among ['ctr', 'cvr'], got 'ads'"
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, {"demo": {"models": ["ctr", "ads"]}})
    assert main(["demo", "--set", 'demo.models=["ads"]', "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"'demo\.models': expected one or more distinct model"):
        load_config(None, {"demo": {"models": ["cvr", "cvr"]}})
    assert load_config(None).demo.models is None  # every model
    assert demo_models(load_config(None)) == ["ctr", "cvr"]
    assert demo_models(load_config(None, {"demo": {"models": ["cvr"]}})) == ["cvr"]


def test_cli_reports_bad_config_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--set", "train.batch_size=0"]) == 2
    err = capsys.readouterr().err
    assert "config field 'train.batch_size': expected int >= 1, got 0" in err
    assert main(["demo", "--set", "nonsense"]) == 2
    assert "expected section.field=value" in capsys.readouterr().err


def test_eventual_labels_use_the_attribution_window() -> None:
    imp_ids = np.array([10, 11, 12, 13])
    imp_ts = np.array([0, 0, 0, 0])
    click_ids = np.array([11, 12, 99])
    click_ts = np.array([500, 1_500, 10])
    labels = eventual_click_labels(imp_ids, imp_ts, click_ids, click_ts, 1_000, imp_ids)
    assert labels.tolist() == [0.0, 1.0, 0.0, 0.0]


def test_eventual_conversion_labels_count_from_the_click() -> None:
    conv_ids = np.array([21, 22, 23, 99])
    conv_ts = np.array([5_000, 9_500, 3_000, 0])
    clicked = np.array([20, 21, 22, 23])
    click_ts = np.array([1_000, 1_000, 1_000, 2_500])
    labels = eventual_conversion_labels(conv_ids, conv_ts, 5_000, clicked, click_ts)
    # 20 never converted; 21 after 4 s; 22 after 8.5 s (too late); 23 0.5 s after its click
    assert labels.tolist() == [0.0, 1.0, 0.0, 1.0]
    assert (
        eventual_conversion_labels(conv_ids[:0], conv_ts[:0], 5_000, clicked, click_ts).sum() == 0
    )


def test_clicked_impressions_are_scored_with_the_features_they_were_served_with() -> None:
    market = Market(load_config(None, TINY).sim)
    start = market.day_start_ms(1)
    batch = market.events_between(start - 1_800_000, start + 1_800_000)  # across two days
    imps = batch.imp_id[batch.kind == IMPRESSION]
    served = dict(zip(imps.tolist(), batch.feature_dicts(), strict=True))
    clicked = batch.imp_id[(batch.kind == CLICK) & np.isin(batch.imp_id, imps)]
    assert len(set((clicked // IMP_ID_STRIDE).tolist())) == 2
    assert impression_features(market, clicked) == [served[i] for i in clicked.tolist()]
    with pytest.raises(
        ValueError, match=r"expected ids of impressions the market served, got 12000"
    ):
        impression_features(market, np.array([int(clicked[0]), 12_000]))
    with pytest.raises(ValueError, match="got -5"):
        impression_features(market, np.array([-5]))


def test_demo_needs_windows_that_tile_a_day(tmp_path: Path) -> None:
    cfg = load_config(None, {"train": {"window_s": 7}})
    with pytest.raises(ConfigError, match=r"'train\.window_s': expected a divisor of 86400"):
        run_demo(cfg, run_dir=tmp_path, progress=False)


@pytest.mark.parametrize(
    ("name", "what"), [("registry", "registry"), ("checkpoints", "checkpoint")]
)
def test_a_file_where_a_run_subfolder_goes_fails_at_start_naming_it(
    tmp_path: Path, name: str, what: str
) -> None:
    (tmp_path / name).write_text("")
    cfg = load_config(None, TINY)
    with pytest.raises(
        StorageError,
        match=rf"^{what} folder {tmp_path / name}: expected a writable folder, got a file in the "
        r"way",
    ):
        run_demo(cfg, run_dir=tmp_path, progress=False)
    assert not (tmp_path / "results.json").exists()


TINY_TOML = """
[sim]
impressions_per_day = 12000
users = 2000
campaigns_per_hour = 4
base_cvr = 0.3
[stream]
partitions = 2
[[models]]
name = "ctr"
buckets = 4096
embedding_dim = 4
hidden = [16]
loss = "pu"
[[models]]
name = "cvr"
label = "conversion"
attribution_window_s = 3600
correction_horizon_s = 604800
buckets = 4096
embedding_dim = 4
hidden = [16]
loss = "pu"
[train]
window_s = 900
batch_size = 256
checkpoint_every_windows = 4
[export]
every_min = 30
min_samples = 20
keep_versions = 3
[demo]
corrupt_every = 500
score_batch = 500
"""


@pytest.mark.integration
@pytest.mark.slow
def test_a_killed_demo_is_refused_then_resumed_to_the_same_results(tmp_path: Path) -> None:
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time

    conf = tmp_path / "tiny.toml"
    conf.write_text(TINY_TOML)
    cfg = load_config(conf)
    ref = run_demo(cfg, run_dir=tmp_path / "ref", progress=False, echo=lambda _: None)

    run = tmp_path / "crash"
    argv = [sys.executable, "-m", "minutely.cli", "demo", "--config", str(conf)]
    proc = subprocess.Popen(
        [*argv, "--run-dir", str(run), "--no-progress"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while len(list((run / "scores").glob("*.npz"))) < 30:
            assert proc.poll() is None, "the demo ended before it could be killed"
            assert time.monotonic() < deadline, "the demo did not reach its online day"
            time.sleep(0.1)
        server_pid = int(
            subprocess.run(
                ["pgrep", "-f", f"minutely.serve --registry {run / 'registry'}"],
                capture_output=True,
                text=True,
            ).stdout.split()[0]
        )
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{server_pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{server_pid}").exists(), "the server outlived the killed demo"

    again = subprocess.run([*argv, "--run-dir", str(run)], capture_output=True, text=True)
    assert again.returncode == 2
    assert f"run folder {run}: expected a new folder, got one that holds a run" in again.stderr
    assert "pass --resume to continue it" in again.stderr

    # a resume past the cut finds the day models in day_models.json, or refuses
    lost = tmp_path / "lost-day-models"
    shutil.copytree(run, lost)
    (lost / "day_models.json").unlink()
    with pytest.raises(
        CheckpointError,
        match=rf"resume: {lost / 'day_models.json'}: expected the day model of 'ctr', got none",
    ):
        run_demo(cfg, run_dir=lost, progress=False, echo=lambda _: None, resume=True)

    resumed = run_demo(cfg, run_dir=run, progress=False, echo=lambda _: None, resume=True)
    # both models: scores, labels, versions served, hourly figures, counts (compared as JSON:
    # an hour without a conversion has an AUC of NaN, which equals nothing)
    assert list(resumed["models"]) == ["ctr", "cvr"]
    assert json.dumps(resumed["models"], sort_keys=True) == json.dumps(
        ref["models"], sort_keys=True
    )
    assert resumed["pipeline"] == ref["pipeline"]
    # every request's scores, the three strategies and the version that answered
    for name in ("ctr", "cvr"):
        assert list(resumed["models"][name]["strategies"]) == list(STRATEGIES)
        a, b = saved_scores(run, name), saved_scores(tmp_path / "ref", name)
        for key in SCORE_KEYS:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name} {key}")
    assert ref["models"]["cvr"]["strategies"]["online"]["versions_served"] >= 2
    with pytest.raises(StorageError, match=r"got a finished one \(results\.json\)"):
        run_demo(cfg, run_dir=run, progress=False, resume=True)
