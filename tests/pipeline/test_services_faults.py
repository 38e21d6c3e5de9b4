"""The services as processes: SIGKILL any of them at random moments and restart it; what is
trained, the dead letters and the served versions come out as in an uninterrupted run."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from services_helpers import SETTINGS, Topology, outcome, reference, settings_config, wait_for

from minutely.stream import open_log

pytestmark = [pytest.mark.integration, pytest.mark.slow]

VICTIMS = ["simulate", "join-0", "join-1", "train-ctr"]


def test_sigkill_at_random_moments_loses_and_repeats_nothing(tmp_path: Path) -> None:
    cfg = settings_config()
    ref = reference(cfg, tmp_path / "ref")
    assert ref.samples > 1_000
    assert sum(ref.dead_letters.values()) > 10

    run = tmp_path / "run"
    run.mkdir()
    common = ["--run-dir", str(run)]
    for item in SETTINGS:
        common += ["--set", item]
    topo = Topology(run, common)
    assert (
        subprocess.run(  # what an operator does first: the key pair the run signs with
            [sys.executable, "-m", "minutely.cli", "keys", "--out", str(run / "keys")], check=False
        ).returncode
        == 0
    )
    for name in ["serve", *VICTIMS]:
        topo.start(name)
    rng = random.Random(11)
    kills = 0
    try:
        while kills < 12:
            time.sleep(rng.uniform(0.3, 1.5))
            alive = [n for n in VICTIMS if topo.procs[n].poll() is None]  # simulate ends
            if not alive:
                break
            victim = rng.choice(alive)
            topo.kill(victim)
            kills += 1
            topo.start(victim)

        def finished() -> bool:
            st = topo.statuses()
            train = st.get("train-ctr", {})
            return (
                train.get("position_ms") == ref.next_end_ms and topo.procs["simulate"].poll() == 0
            )

        wait_for(finished, 240, "the trainer to reach the reference's last window", topo)
    finally:
        codes = topo.stop()
    assert kills >= 10
    assert all(topo.starts[n] >= 2 for n in VICTIMS), topo.starts  # each was killed mid-run
    assert all(code == 0 for name, code in codes.items() if name != "simulate"), codes

    log = open_log(cfg.stream, run)
    got = outcome(log, run, cfg, ref.next_end_ms)
    log.close()
    assert got.trained == ref.trained
    assert got.dead_letters == ref.dead_letters
    server = topo.output("serve")
    assert "will retry" not in server, server[-2000:]
    assert "poll failed" not in server, server[-2000:]
