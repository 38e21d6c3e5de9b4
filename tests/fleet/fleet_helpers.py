"""Shared pieces of the fleet tests: an origin with signed versions, trackers and agents served
on threads of the test process, and agent processes (fixtures in conftest.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

from minutely.fleet.agent import Agent, AgentSettings
from minutely.fleet.tracker import Tracker, create_app
from minutely.fleet.web import BackgroundServer
from minutely.registry import Manifest, Registry, Signer
from minutely.schema import default_schema

MODEL = "ctr"
CHUNK_BYTES = 16 << 10


def tensors(rows: int, seed: int) -> dict[str, torch.Tensor]:
    """A table of ``rows`` x 64 float32 (256 bytes a row) and a small bias."""
    g = torch.Generator().manual_seed(seed)
    return {"emb": torch.randn(rows, 64, generator=g), "bias": torch.randn(3, generator=g)}


def publish(reg: Registry, weights: dict[str, torch.Tensor], **kw: Any) -> Manifest:
    return reg.publish(
        MODEL,
        weights,
        created_ms=1_000,
        arch="lr",
        model_config={"arch": "lr"},
        schema=default_schema(),
        metrics={"auc": 0.7},
        samples_seen=10,
        **kw,
    )


def version_bytes(reg: Registry, version: str, manifest: Manifest) -> dict[str, bytes]:
    """Every file of a version of a registry folder, read whole."""
    return {name: (reg.root / MODEL / version / name).read_bytes() for name in manifest.files}


@dataclass
class Origin:
    root: Path
    signer: Signer
    public_key: Path
    registry: Registry


@dataclass
class InProcessAgent:
    agent: Agent
    server: BackgroundServer
    settings: AgentSettings

    @property
    def local(self) -> Registry:
        return self.agent.local

    def counters(self) -> dict[str, int]:
        counters: dict[str, int] = self.agent.status()["counters"]
        return counters


@dataclass
class Fleet:
    """Trackers and agents on threads of the test process, stopped at the end of the test."""

    tmp: Path
    agents: list[InProcessAgent] = field(default_factory=list)
    servers: list[BackgroundServer] = field(default_factory=list)

    def tracker(self, **kw: float) -> tuple[Tracker, str]:
        tracker = Tracker(**kw)
        server = BackgroundServer(create_app(tracker)).start()
        self.servers.append(server)
        return tracker, server.url

    def agent(self, origin: str, *, name: str, **kw: Any) -> InProcessAgent:
        settings = AgentSettings(
            origin=origin,
            cache=self.tmp / name / "cache",
            local_registry=self.tmp / name / "registry",
            models=(MODEL,),
            peer_id=name,
            **kw,
        )
        agent = Agent(settings)
        server = BackgroundServer(agent.app).start()
        agent.start(server.url, background=False)
        handle = InProcessAgent(agent, server, settings)
        self.agents.append(handle)
        return handle

    def close(self) -> None:
        for a in self.agents:
            a.server.stop()
            a.agent.close()
        for s in self.servers:
            s.stop()


def wait_for(what: str, check: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.02)


@dataclass
class AgentProcess:
    """``python -m minutely.fleet.agent`` as a child process."""

    proc: subprocess.Popen[bytes]
    port_file: Path
    log: Path

    @classmethod
    def start(cls, tmp: Path, name: str, args: list[str]) -> AgentProcess:
        port_file = tmp / f"{name}.port"
        port_file.unlink(missing_ok=True)
        log = tmp / f"{name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [
                    *(sys.executable, "-m", "minutely.fleet.agent", "--host", "127.0.0.1"),
                    *("--port", "0", "--port-file", str(port_file), "--peer-id", name),
                    *args,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        handle = cls(proc, port_file, log)
        wait_for(f"{name} to listen", handle._listening)
        return handle

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.tail()}")
        return self.port_file.exists() and bool(self.port_file.read_text().strip())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{int(self.port_file.read_text())}"

    def status(self) -> dict[str, Any]:
        doc: dict[str, Any] = httpx.get(f"{self.url}/v1/status", timeout=10).json()
        return doc

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def model_status(doc: dict[str, Any]) -> dict[str, Any]:
    status: dict[str, Any] = doc["models"][MODEL]
    return status


def dumps(doc: object) -> str:
    return json.dumps(doc, indent=1, sort_keys=True)
