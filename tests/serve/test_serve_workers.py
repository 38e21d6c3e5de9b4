"""Several worker processes on one port: swaps under load, summed metrics, admin, stop, restart."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from minutely.config import ModelConfig
from minutely.data import instances_to_tensors
from minutely.model import CtrModel, build_model
from minutely.model.artifact import model_config_doc
from minutely.registry import Manifest, Registry
from minutely.schema import default_schema
from minutely.serve.codec import ARROW_STREAM, encode_arrow

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCHEMA = default_schema()
CFG = ModelConfig(arch="deepfm", buckets=512, embedding_dim=4, hidden=(8,))
BATCH = [
    {
        f.name: ([i, i + 1] if f.kind == "multi_sparse" else (i * 7919 + 13) % 1000)
        for f in SCHEMA.features
    }
    for i in range(16)
]
COLUMNS = {f.name: [inst[f.name] for inst in BATCH] for f in SCHEMA.features}
TOKEN = "admin-token"
BODIES = [
    (msgspec.json.encode({"instances": BATCH}), "application/json"),
    (msgspec.json.encode({"columns": COLUMNS}), "application/json"),
    (encode_arrow(COLUMNS, SCHEMA), ARROW_STREAM),
]


def publish(reg: Registry, seed: int) -> tuple[Manifest, list[float]]:
    torch.manual_seed(seed)
    model: CtrModel = build_model(CFG, SCHEMA)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    manifest = reg.publish(
        "ctr",
        model.flat_state_dict(),
        created_ms=seed,
        arch=CFG.arch,
        model_config=model_config_doc(CFG),
        schema=SCHEMA,
        metrics={},
        samples_seen=seed,
    )
    return manifest, model.predict(instances_to_tensors(BATCH, SCHEMA, CFG.buckets)).tolist()


@dataclasses.dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def workers(self) -> list[int]:
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [int(p) for p in path.read_text().split()]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def wait_until(what: str, cond: Any, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    if sys.platform != "linux":
        pytest.skip("reads worker processes from /proc")
    reg_dir = tmp_path / "registry"
    reg_dir.mkdir()
    port_file = tmp_path / "server.port"
    token_file = tmp_path / "admin.token"
    token_file.write_text(f"{TOKEN}\n")
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "minutely.serve", "--registry", str(reg_dir)),
                *("--model", "ctr", "--host", "127.0.0.1", "--port", "0"),
                *("--port-file", str(port_file), "--poll-interval", "0.02"),
                *("--workers", "2", "--batch-max-rows", "256", "--batch-max-wait-ms", "1"),
                *("--admin-token-file", str(token_file)),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while not (port_file.exists() and port_file.read_text().strip()):
            assert proc.poll() is None, f"server exited at start:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"server did not start:\n{log.read_text()}"
            time.sleep(0.05)
        yield Server(proc, f"http://127.0.0.1:{int(port_file.read_text())}", log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    raise AssertionError(f"no sample {name} {labels} in:\n{text}")


def test_workers_swap_under_load_without_a_failed_request(tmp_path: Path, server: Server) -> None:
    reg = Registry(tmp_path / "registry")
    workers = server.workers()
    assert len(workers) == 2
    expected: dict[str, list[float]] = {}
    stop = threading.Event()
    seen: list[list[tuple[int, str | None, list[float] | None]]] = [[] for _ in range(6)]

    def fire(k: int) -> None:
        body, media = BODIES[k % len(BODIES)]
        with httpx.Client(base_url=server.url, timeout=30) as c:
            while not stop.is_set():
                r = c.post("/v1/models/ctr:predict", content=body, headers={"content-type": media})
                doc = r.json()
                seen[k].append((r.status_code, doc.get("version"), doc.get("predictions")))

    def answered(version: str) -> bool:
        return all(any(version == s[1] for s in out[-3:]) for out in seen)

    with httpx.Client(base_url=server.url, timeout=30) as control:
        m, preds = publish(reg, seed=1)
        expected[m.version] = preds
        # each worker loads on its own: wait until both did (a worker answers 503 before)
        wait_until(
            "both workers on v00000001",
            lambda: (
                metric(control.get("/metrics").text, "minutely_serve_swaps_total", model="ctr") == 2
            ),
        )
        threads = [threading.Thread(target=fire, args=(k,)) for k in range(len(seen))]
        for t in threads:
            t.start()
        try:
            wait_until(m.version, lambda: answered("v00000001"))
            for seed in (2, 3, 4):
                m, preds = publish(reg, seed)
                expected[m.version] = preds
                # every client (whichever worker it talks to) gets the new version
                wait_until(m.version, lambda v=m.version: answered(v))
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        # each worker loaded every version: the scrape sums both workers' swaps
        wait_until(
            "both workers on v00000004",
            lambda: (
                metric(control.get("/metrics").text, "minutely_serve_swaps_total", model="ctr") == 8
            ),
        )
        text = control.get("/metrics").text

    responses = [s for out in seen for s in out]
    assert len(responses) > 30
    assert [s for s in responses if s[0] != 200] == []
    assert {v for _, v, _ in responses} == set(expected)
    for _, version, predictions in responses:  # the version named is the one that answered
        assert version is not None
        assert predictions == pytest.approx(expected[version], abs=1e-5)
    for out in seen:  # a connection stays on one worker: its versions never go back
        versions = [v or "" for _, v, _ in out]
        assert versions == sorted(versions)
    assert metric(text, "minutely_serve_requests_total", model="ctr", code="200") >= len(responses)
    assert metric(text, "minutely_serve_live_version", model="ctr") == 4
    assert metric(text, "minutely_serve_refusals_total", model="ctr") == 0

    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(60) == 0, server.log.read_text()
    wait_until("the workers to stop", lambda: not any(alive(p) for p in workers), 10)
    log = server.log.read_text()
    assert "2 workers listening" in log
    assert log.count("now serving v00000004") == 2


def test_admin_pins_reach_every_worker_and_killed_processes_are_handled(
    tmp_path: Path, server: Server
) -> None:
    reg = Registry(tmp_path / "registry")
    for seed in (1, 2):
        publish(reg, seed)
    auth = {"Authorization": f"Bearer {TOKEN}"}

    def versions_answered(n: int = 8) -> set[str]:
        out = set()
        for _ in range(n):  # new connections: the kernel spreads them over the workers
            with httpx.Client(base_url=server.url, timeout=30) as c:
                r = c.post("/v1/models/ctr:predict", content=BODIES[0][0])
                out.add(r.json()["version"] if r.status_code == 200 else f"HTTP {r.status_code}")
        return out

    with httpx.Client(base_url=server.url, timeout=30) as control:
        wait_until("v00000002 everywhere", lambda: versions_answered() == {"v00000002"})
        r = control.post("/v1/admin/models/ctr/pin", json={"version": "v00000001"})
        assert r.status_code == 401
        assert reg.pinned("ctr") is None
        r = control.post("/v1/admin/models/ctr/pin", json={"version": "v00000001"}, headers=auth)
        assert r.status_code == 200, r.text
        wait_until("v00000001 everywhere", lambda: versions_answered() == {"v00000001"})

        victim = server.workers()[0]
        os.kill(victim, signal.SIGKILL)
        wait_until(
            "a replacement worker",
            lambda: len(server.workers()) == 2 and victim not in server.workers(),
        )
        wait_until(
            "the replacement to serve",
            lambda: (
                metric(control.get("/metrics").text, "minutely_serve_swaps_total", model="ctr") >= 1
            ),
        )
        assert versions_answered(12) == {"v00000001"}
    assert "exited with -9" in server.log.read_text()
    # a parent killed outright takes its workers with it (they get SIGTERM from the kernel)
    workers = server.workers()
    server.proc.kill()
    server.proc.wait(10)
    wait_until("the workers to die with the parent", lambda: not any(map(alive, workers)), 30)
