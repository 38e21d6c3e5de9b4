"""The demo end to end on a small market: a real server process, real artifacts."""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from minutely.cli import main
from minutely.clock import MS_PER_DAY
from minutely.config import Config, load_config
from minutely.demo.replay import (
    eventual_click_labels,
    eventual_conversion_labels,
    impression_features,
)
from minutely.demo.run import demo_models, run_demo
from minutely.errors import ConfigError, StorageError
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

    # pCTR: every impression of the day, scored by the live version and the day model
    online, day = ctr["strategies"]["online"], ctr["strategies"]["day_only"]
    assert online["n"] == day["n"] == ctr["requests"] == 12_000
    # every 30 event-time minutes over a day, each one served before the next window
    assert online["versions_served"] >= 40
    assert day["versions_served"] == 1
    assert 0.5 < online["auc"] < 1.0
    assert len(list((tmp_path / "registry" / "ctr").glob("v*"))) <= 4  # kept 3 + the base

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
    assert table.count("day model only") == table.count("online ") == 4  # two labels each
    # the replay rule: each request answered by the newest version created before it arrived
    for res in (ctr, cvr):
        served = res["served"]
        assert len(served) == res["strategies"]["online"]["versions_served"]
        assert sum(v["requests"] for v in served) == res["requests"]
        for prev, nxt in itertools.pairwise(served):
            assert prev["created_ms"] <= prev["first_request_ms"]
            assert prev["last_request_ms"] < nxt["created_ms"] <= nxt["first_request_ms"]


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

    resumed = run_demo(cfg, run_dir=run, progress=False, echo=lambda _: None, resume=True)
    # both models: scores, labels, versions served, hourly figures, counts (compared as JSON:
    # an hour without a conversion has an AUC of NaN, which equals nothing)
    assert list(resumed["models"]) == ["ctr", "cvr"]
    assert json.dumps(resumed["models"], sort_keys=True) == json.dumps(
        ref["models"], sort_keys=True
    )
    assert resumed["pipeline"] == ref["pipeline"]
    assert ref["models"]["cvr"]["strategies"]["online"]["versions_served"] >= 2
    with pytest.raises(StorageError, match=r"got a finished one \(results\.json\)"):
        run_demo(cfg, run_dir=run, progress=False, resume=True)
