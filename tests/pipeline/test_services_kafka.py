"""The services on a Kafka broker: killed and restarted, and the broker itself restarted
mid-stream; what is trained and the dead letters come out as in an uninterrupted run on the
embedded log (the outputs do not depend on the backend)."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
from services_helpers import SETTINGS, Topology, outcome, reference, settings_config, wait_for

from kafka_broker import KafkaBroker
from minutely.stream import open_log

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# The test broker never expires a group member killed without leaving (see the group
# conformance suite), so the join is not among the victims here; the SQLite fault test kills it.
VICTIMS = ["simulate", "train-ctr"]


def test_services_survive_kills_and_a_broker_restart(tmp_path: Path) -> None:
    ref = reference(settings_config(), tmp_path / "ref")
    assert ref.samples > 1_000
    broker = KafkaBroker(tmp_path / "broker")
    broker.start()
    kafka = [
        "--kafka",
        broker.bootstrap,
        "--set",
        "stream.session_timeout_s=6.0",
        "--set",
        "stream.request_timeout_s=5.0",
    ]
    run = tmp_path / "run"
    run.mkdir()
    common = ["--run-dir", str(run)]
    for item in SETTINGS:
        common += ["--set", item]
    topo = Topology(run, [*common, *kafka])
    try:
        for name in ["join-0", *VICTIMS]:
            topo.start(name)
        rng = random.Random(3)
        wait_for(lambda: "join-0" in topo.statuses(), 60, "the join to start", topo)
        for i in range(4):
            time.sleep(rng.uniform(0.5, 2.0))
            alive = [n for n in VICTIMS if topo.procs[n].poll() is None]
            if alive:
                victim = rng.choice(alive)
                topo.kill(victim)
                topo.start(victim)
            if i == 1:
                broker.stop()  # mid-stream: every service loses the log for a while
                time.sleep(3)
                broker.start()

        def finished() -> bool:
            train = topo.statuses().get("train-ctr", {})
            done = topo.procs["simulate"].poll() == 0
            return done and train.get("position_ms") == ref.next_end_ms

        wait_for(finished, 240, "the trainer to reach the reference's last window", topo)
        codes = topo.stop()
        assert all(code == 0 for name, code in codes.items() if name != "simulate"), codes
        cfg = settings_config(
            ['stream.backend="kafka"', f'stream.bootstrap_servers="{broker.bootstrap}"']
        )
        log = open_log(cfg.stream, run)
        try:
            got = outcome(log, run, cfg, ref.next_end_ms)
        finally:
            log.close()
    finally:
        topo.stop()
        broker.stop()
    assert got.trained == ref.trained
    assert got.dead_letters == ref.dead_letters
    # the outage was real: a service saw the broker go, and came back (which one notices within
    # the 3 s depends on what each was doing at the time)
    outputs = {name: topo.output(name) for name in ("join-0", "train-ctr", "simulate")}
    assert any("the log failed" in out for out in outputs.values()), sorted(outputs)
