"""The demo end to end on a small market: a real server process, real artifacts."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from minutely.cli import main
from minutely.config import load_config
from minutely.demo.replay import eventual_click_labels
from minutely.demo.run import run_demo
from minutely.errors import ConfigError, StorageError

TINY = {
    "sim": {"impressions_per_day": 12_000, "users": 2_000, "campaigns_per_hour": 4},
    "stream": {"partitions": 2},
    "models": [{"name": "ctr", "buckets": 4096, "embedding_dim": 4, "hidden": [16]}],
    "train": {"window_s": 900, "batch_size": 256},
    "export": {"every_min": 30, "min_samples": 20, "keep_versions": 3},
    "demo": {"corrupt_every": 500, "score_batch": 500},
}


@pytest.mark.integration
@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    cfg = load_config(None, TINY)
    lines: list[str] = []
    results = run_demo(cfg, run_dir=tmp_path, progress=False, echo=lines.append)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert (tmp_path / "auc_per_hour.png").stat().st_size > 10_000
    online = results["strategies"]["online"]
    day = results["strategies"]["day_only"]
    assert online["n"] == day["n"] == results["impressions_scored"] > 10_000
    # every 30 event-time minutes over a day, each one served before the next window
    assert online["versions_served"] >= 40
    assert day["versions_served"] == 1
    assert 0.5 < online["auc"] < 1.0
    pipe = results["pipeline"]
    assert pipe["dead_letters"] == pipe["malformed_injected"] > 0
    assert len(list((tmp_path / "registry" / "ctr").glob("v*"))) <= 4  # kept 3 + the base
    assert any("day model only" in line for line in lines)
    # the replay rule: each request answered by the newest version created before it arrived
    served = results["served"]
    assert len(served) == online["versions_served"]
    assert sum(v["requests"] for v in served) == results["impressions_scored"]
    for prev, nxt in itertools.pairwise(served):
        assert prev["created_ms"] <= prev["first_request_ms"]
        assert prev["last_request_ms"] < nxt["created_ms"] <= nxt["first_request_ms"]


def test_demo_refuses_a_conversion_model(tmp_path: Path) -> None:
    cfg = load_config(None, {"demo": {"model": "cvr"}})
    with pytest.raises(ConfigError, match=r"'demo\.model': expected a model whose label is"):
        run_demo(cfg, run_dir=tmp_path, progress=False)


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
[stream]
partitions = 2
[[models]]
name = "ctr"
buckets = 4096
embedding_dim = 4
hidden = [16]
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
    assert resumed["strategies"] == ref["strategies"]
    assert resumed["served"] == ref["served"]
    assert resumed["pipeline"] == ref["pipeline"]
    assert resumed["hourly"] == ref["hourly"]
    with pytest.raises(StorageError, match=r"got a finished one \(results\.json\)"):
        run_demo(cfg, run_dir=run, progress=False, resume=True)
