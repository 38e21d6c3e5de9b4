"""The real server process under concurrent load while new versions are published."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from minutely.config import ModelConfig
from minutely.data import instances_to_tensors
from minutely.model import CtrModel, build_model
from minutely.model.artifact import model_config_doc
from minutely.registry import Manifest, Registry
from minutely.schema import default_schema

SCHEMA = default_schema()
CFG = ModelConfig(arch="deepfm", buckets=512, embedding_dim=4, hidden=(8,))
BATCH = [
    {
        f.name: ([i, i + 1] if f.kind == "multi_sparse" else (i * 7919 + 13) % 1000)
        for f in SCHEMA.features
    }
    for i in range(32)
]


def publish(reg: Registry, seed: int) -> tuple[Manifest, list[float]]:
    """A new version with distinct weights, and what it must answer for ``BATCH``."""
    torch.manual_seed(seed)
    model: CtrModel = build_model(CFG, SCHEMA)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    manifest = reg.publish(
        "ctr",
        model.state_dict(),
        created_ms=seed,
        arch=CFG.arch,
        model_config=model_config_doc(CFG),
        schema=SCHEMA,
        metrics={"auc": 0.5},
        samples_seen=seed,
    )
    return manifest, model.predict(instances_to_tensors(BATCH, SCHEMA, CFG.buckets)).tolist()


@dataclasses.dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    reg_dir = tmp_path / "registry"
    port_file = tmp_path / "server.port"
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "minutely.serve", "--registry", str(reg_dir)),
                *("--model", "ctr", "--host", "127.0.0.1", "--port", "0"),
                *("--port-file", str(port_file), "--poll-interval", "0.02"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            assert proc.poll() is None, f"server exited at start:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"server did not start:\n{log.read_text()}"
            time.sleep(0.05)
        yield Server(proc, f"http://127.0.0.1:{int(port_file.read_text())}", log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_until(what: str, cond: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.mark.integration
def test_concurrent_requests_never_fail_while_versions_roll(tmp_path: Path, server: Server) -> None:
    reg = Registry(tmp_path / "registry")
    expected: dict[str, list[float]] = {}
    with httpx.Client(base_url=server.url, timeout=30) as control:
        # Started before the first version exists: not ready, and predict answers 503.
        assert control.get("/healthz").status_code == 503
        r = control.post("/v1/models/ctr:predict", json={"instances": BATCH})
        assert r.status_code == 503

        stop = threading.Event()
        seen: list[list[tuple[int, str | None, list[float] | None]]] = [[] for _ in range(4)]

        def fire(out: list[tuple[int, str | None, list[float] | None]]) -> None:
            with httpx.Client(base_url=server.url, timeout=30) as c:
                while not stop.is_set():
                    r = c.post("/v1/models/ctr:predict", json={"instances": BATCH})
                    doc = r.json()
                    out.append((r.status_code, doc.get("version"), doc.get("predictions")))

        def answered(version: str) -> bool:
            return any(version == s[1] for out in seen for s in out[-5:])

        m, preds = publish(reg, seed=1)
        expected[m.version] = preds
        wait_until("the first version", lambda: control.get("/healthz").status_code == 200)
        workers = [threading.Thread(target=fire, args=(out,)) for out in seen]
        for w in workers:
            w.start()
        try:
            wait_until(m.version, lambda: answered("v00000001"))
            for seed in (2, 3, 4):
                m, preds = publish(reg, seed)
                expected[m.version] = preds
                # Each version goes live and answers traffic before the next is published.
                wait_until(m.version, lambda v=m.version: answered(v))
        finally:
            stop.set()
            for w in workers:
                w.join(30)
        meta = control.get("/v1/models/ctr").json()

    responses = [s for out in seen for s in out]
    assert len(responses) > 20
    assert [s for s in responses if s[0] != 200] == []
    for out in seen:  # a client never goes back to an older version
        versions = [v for _, v, _ in out]
        assert versions == sorted(versions, key=lambda v: v or "")
    assert {v for _, v, _ in responses} == set(expected)
    for _, version, predictions in responses:  # the version named is the one that answered
        assert version is not None
        assert predictions == pytest.approx(expected[version], abs=1e-5)
    assert (meta["version"], meta["swaps"], meta["refused"]) == ("v00000004", 4, [])

    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0, server.log.read_text()
    assert "now serving v00000004" in server.log.read_text()
