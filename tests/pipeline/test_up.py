"""``minutely up``: the whole topology as children, live status lines, a clean stop on Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from services_helpers import SETTINGS, settings_config, wait_for

from minutely.pipeline.services import read_statuses

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SERVICES = {"simulate", "join-0", "join-1", "train-ctr", "train-cvr", "serve"}


def start_up(run: Path) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "minutely.cli", "up", "--run-dir", str(run), "--joiners", "2"]
    argv += ["--days", "0.1", "--rate", "2000"]
    for item in SETTINGS:
        argv += ["--set", item]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def pids_of(run: Path) -> list[int]:
    out = subprocess.run(["pgrep", "-f", str(run)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split() if int(p) != os.getpid()]


def test_up_runs_every_service_shows_status_and_stops_them_all_on_ctrl_c(tmp_path: Path) -> None:
    run = tmp_path / "run"
    up = start_up(run)
    try:

        def trained() -> bool:
            st = read_statuses(run).get("train-ctr", {})
            return bool(st.get("windows")) and bool(st.get("last_export"))

        wait_for(trained, 120, "the ctr trainer to train and export")
        assert set(read_statuses(run)) >= SERVICES - {"serve"}
        up.send_signal(signal.SIGINT)
        out, _ = up.communicate(timeout=60)
    finally:
        if up.poll() is None:
            up.kill()
            up.communicate()
    assert up.returncode == 0, out[-3000:]
    lines = out.splitlines()
    assert next(line for line in lines if line.startswith("minutely up:")).startswith(
        "minutely up: 6 services"
    )
    for name in SERVICES:
        assert any(line.startswith(name) and "running" in line for line in lines), name
    assert any("partitions=" in line and "lag=" in line for line in lines)
    assert any(line.startswith("serve") and "url=http://127.0.0.1:" in line for line in lines)
    assert pids_of(run) == []  # every child stopped
    final = read_statuses(run)
    assert all(final[n].get("stopped") for n in SERVICES - {"serve"}), final
    joined = sum(final[n]["events"] for n in ("join-0", "join-1"))
    assert joined > 0
    assert json.loads((run / "checkpoints" / "simulate.json").read_text())["produced"] > 0


def test_children_die_with_a_killed_up(tmp_path: Path) -> None:
    run = tmp_path / "run"
    up = start_up(run)
    try:
        wait_for(lambda: len(read_statuses(run)) >= 4, 120, "the services to start")
        assert len(pids_of(run)) >= 6
        up.kill()
        up.wait(10)
        deadline = time.monotonic() + 15
        while pids_of(run) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert pids_of(run) == []
    finally:
        if up.poll() is None:
            up.kill()
        up.communicate()


def test_a_train_status_line_shows_the_versions_lag_and_rollbacks() -> None:
    from minutely.pipeline.up import status_line

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    st = {
        "windows": 12,
        "last_export": "v00000007",
        "live_version": "v00000007",
        "warm_version": "v00000001",
        "lag_s": 4.5,
        "samples_per_s": 1200.0,
        "live_version_age_s": 300.0,
        "rollbacks": 1,
        "exports_refused": 2,
        "dead_letters": 0,
    }
    line = status_line("train-ctr", st, proc)
    assert line.startswith("train-ctr      exited 0")
    for part in (
        "live_version=v00000007",
        "warm_version=v00000001",
        "lag_s=4.5",
        "samples_per_s=1200.0",
        "live_version_age_s=300.0",
        "rollbacks=1",
        "exports_refused=2",
    ):
        assert part in line


def test_up_with_servers_shares_versions_through_the_tracker_and_announcements(
    tmp_path: Path,
) -> None:
    import httpx

    from minutely.pipeline.origin import registry_location
    from minutely.registry import Registry

    run = tmp_path / "run"
    argv = [sys.executable, "-m", "minutely.cli", "up", "--run-dir", str(run), "--joiners", "1"]
    argv += ["--days", "0.1", "--rate", "500", "--servers", "2"]
    # the agents poll the origin every 5 minutes: what reaches them sooner came by announcement
    for item in [*SETTINGS, "fleet.poll_interval_s=300", "registry.chunk_kib=64"]:
        argv += ["--set", item]
    up = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        registry = Registry(registry_location(settings_config(), run))

        def urls() -> list[str]:
            out = []
            for name in ("serve-0", "serve-1"):
                f = run / f"{name}.port"
                if f.exists() and f.read_text().strip():
                    out.append(f"http://127.0.0.1:{f.read_text().strip()}")
            return out

        def live_everywhere(version: str) -> bool:
            try:
                got = {httpx.get(f"{u}/v1/models/ctr").json()["version"] for u in urls()}
            except httpx.HTTPError:
                return False
            # the trainer goes on publishing: the same version on both, this one or newer
            return len(urls()) == 2 and len(got) == 1 and None not in got and min(got) >= version

        wait_for(lambda: len(registry.versions("ctr")) >= 3, 180, "three ctr versions")
        newest = registry.serving_version("ctr")
        assert newest is not None
        wait_for(lambda: live_everywhere(newest), 30, f"both servers to serve {newest}")
        agents = []
        for name in ("serve-0", "serve-1"):
            port = (run / "fleet" / name / "agent.port").read_text().strip()
            agents.append(httpx.get(f"http://127.0.0.1:{port}/v1/status").json()["counters"])
        assert sum(a["chunks_from_peers"] for a in agents) > 0  # they shared chunks
        up.send_signal(signal.SIGINT)
        out, _ = up.communicate(timeout=90)
    finally:
        if up.poll() is None:
            up.kill()
            up.communicate()
    assert up.returncode == 0, out[-3000:]
    heads = [line for line in out.splitlines() if line.startswith("minutely up:")]
    assert heads[0].startswith("minutely up: 7 services")  # a tracker and 2 servers
    assert pids_of(run) == []
