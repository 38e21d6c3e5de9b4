"""Tracker and agents as real processes: a download killed halfway resumes, and a fleet fetches
a signed version from an S3 origin end to end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import s3fs
from fleet_helpers import (
    MODEL,
    AgentProcess,
    model_status,
    publish,
    tensors,
    wait_for,
)

from minutely.fleet.agent import chunk_layout
from minutely.registry import Registry, Signer
from s3_server import REGION, new_bucket, s3_storage_options

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_stopped_agent_exits_within_its_grace_when_the_origin_hangs(tmp_path: Path) -> None:
    origin = Registry(tmp_path / "origin", chunk_bytes=1024)
    manifest = publish(origin, tensors(64, seed=2))
    (name,) = manifest.files
    data = tmp_path / "origin" / MODEL / manifest.version / name
    data.unlink()
    os.mkfifo(data)  # opening it for a read blocks: an origin that stopped answering
    args = [
        *("--origin", str(tmp_path / "origin"), "--cache", str(tmp_path / "cache")),
        *("--local-registry", str(tmp_path / "local"), "--model", MODEL),
        *("--poll-interval", "0.05", "--stop-grace", "1"),
    ]
    agent = AgentProcess.start(tmp_path, "agent", args)
    try:
        wait_for(
            "a fetch to start",
            lambda: manifest.version in model_status(agent.status())["in_progress"],
            timeout_s=30,
        )
        t = time.monotonic()
        agent.proc.send_signal(signal.SIGTERM)
        agent.proc.wait(timeout=15)
        took = time.monotonic() - t
    finally:
        agent.stop()
    assert agent.proc.returncode == 0
    assert took < 10
    assert "transfers still running 1.0 s after the stop: exiting without them" in agent.tail()


def test_an_agent_killed_halfway_fetches_only_the_missing_chunks(tmp_path: Path) -> None:
    origin = Registry(tmp_path / "origin", chunk_bytes=1024)
    manifest = publish(origin, tensors(400, seed=1))  # about 100 KiB: about 100 chunks
    chunks = chunk_layout(manifest)
    size = sum(c.length for c in chunks)
    args = [
        *("--origin", str(tmp_path / "origin"), "--cache", str(tmp_path / "cache")),
        *("--local-registry", str(tmp_path / "local"), "--model", MODEL),
        *("--poll-interval", "0.05", "--max-transfers", "1"),
    ]
    # 40 kB/s: 2.5 s for the whole version, so the kill lands in the middle
    first = AgentProcess.start(tmp_path, "agent", [*args, "--max-bytes-per-s", "40000"])
    seen = 0
    try:

        def halfway() -> bool:
            nonlocal seen
            progress = model_status(first.status())["in_progress"].get(manifest.version)
            seen = 0 if progress is None else progress["held"]
            return seen >= len(chunks) // 3

        wait_for("a third of the chunks", halfway, timeout_s=30)
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(timeout=10)
    finally:
        first.stop()
    assert seen < len(chunks)
    assert Registry(tmp_path / "local").versions(MODEL) == []
    second = AgentProcess.start(tmp_path, "agent", args)
    try:
        wait_for(
            "the install",
            lambda: model_status(second.status())["installed"] == [manifest.version],
            timeout_s=30,
        )
        counters = model_status(second.status())["counters"]
    finally:
        second.stop()
    assert second.proc.returncode == 0
    resumed = counters["chunks_resumed"]
    assert seen <= resumed < len(chunks)
    assert counters["chunks_from_origin"] == len(chunks) - resumed
    # one transfer at a time in chunk order: the chunks on disk are the first ones
    assert counters["bytes_from_origin"] == size - sum(c.length for c in chunks[:resumed])
    local = Registry(tmp_path / "local")
    for name in manifest.files:
        assert (local.root / MODEL / manifest.version / name).read_bytes() == (
            origin.root / MODEL / manifest.version / name
        ).read_bytes()


def test_agents_fetch_a_signed_version_from_s3_through_peers(
    tmp_path: Path, s3_endpoint: str
) -> None:
    bucket = new_bucket(s3_endpoint, "fleet")
    url = f"s3://{bucket}/registry"
    signer = Signer.generate()
    public_key = tmp_path / "publisher.pub"
    public_key.write_bytes(signer.public_key_pem())
    port_file = tmp_path / "tracker.port"
    tracker = subprocess.Popen(
        [
            *(sys.executable, "-m", "minutely.fleet.tracker", "--port", "0"),
            *("--port-file", str(port_file), "--log-level", "warning"),
        ]
    )
    agents: list[AgentProcess] = []
    try:
        wait_for("the tracker", lambda: port_file.exists() and bool(port_file.read_text()))
        tracker_url = f"http://127.0.0.1:{int(port_file.read_text())}"
        options = [
            "key=x",
            "secret=x",
            f"client_kwargs.endpoint_url={s3_endpoint}",
            f"client_kwargs.region_name={REGION}",
        ]
        for i in range(3):
            name = f"agent{i}"
            agents.append(
                AgentProcess.start(
                    tmp_path,
                    name,
                    [
                        *("--origin", url),
                        *(a for o in options for a in ("--origin-option", o)),
                        *("--cache", str(tmp_path / name / "cache")),
                        *("--local-registry", str(tmp_path / name / "registry")),
                        *("--tracker", tracker_url, "--region", "eu-west-1", "--model", MODEL),
                        *("--public-key", str(public_key), "--poll-interval", "0.1"),
                        *("--max-transfers", "2", "--log-level", "warning"),
                    ],
                )
            )
        origin = Registry(
            url,
            storage_options=s3_storage_options(s3_endpoint),
            signer=signer,
            chunk_bytes=32 << 10,
        )
        # what the agents see while a publish is under way: a version's data without manifest
        s3 = s3fs.S3FileSystem(**s3_storage_options(s3_endpoint))
        s3.pipe_file(f"{bucket}/registry/{MODEL}/v00000001/weights.safetensors", b"partial")
        time.sleep(0.5)  # a few polls of every agent
        manifest = publish(origin, tensors(2048, seed=2))  # 512 KiB: 17 chunks
        assert manifest.version == "v00000001"
        size = sum(e.bytes for e in manifest.files.values())
        for a in agents:
            wait_for(
                "every agent to install the version",
                lambda a=a: model_status(a.status())["installed"] == [manifest.version],
                timeout_s=60,
            )
        statuses = [model_status(a.status()) for a in agents]
        swarm = httpx.get(f"{tracker_url}/v1/swarm/{MODEL}/{manifest.version}").json()
    finally:
        for a in agents:
            a.stop()
        tracker.send_signal(signal.SIGTERM)
        tracker.wait(timeout=20)
    assert [a.proc.returncode for a in agents] == [0, 0, 0]
    assert tracker.returncode == 0
    want = {
        name: origin.read_range(MODEL, manifest.version, name, 0, size) for name in manifest.files
    }
    for i in range(3):
        local = Registry(tmp_path / f"agent{i}" / "registry")
        for name in manifest.files:
            assert (local.root / MODEL / manifest.version / name).read_bytes() == want[name]
    from_origin = sum(s["counters"]["bytes_from_origin"] for s in statuses)
    assert size <= from_origin <= 1.5 * size
    assert sum(s["counters"]["chunks_from_peers"] for s in statuses) > 0
    assert sorted(swarm["peers"]) == ["agent0", "agent1", "agent2"]
    assert all(len(holders) == 3 for holders in swarm["holders"].values())
