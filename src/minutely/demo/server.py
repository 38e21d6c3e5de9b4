"""A real inference-server process, started and stopped by the replay."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import msgspec

from minutely.errors import ServeError
from minutely.procs import spawn_child


class ServerProcess:
    """``python -m minutely.serve`` in a child process, with an HTTP client to it.

    The child is started by :func:`~minutely.procs.spawn_child`: it stops when this process
    dies, however it dies, and a Ctrl-C reaches only this process (which then closes it).
    """

    def __init__(
        self,
        registry_dir: Path,
        models: list[str],
        run_dir: Path,
        poll_interval_s: float,
        host: str = "127.0.0.1",
        port: int = 0,
        start_timeout_s: float = 60.0,
        public_key: Path | None = None,
    ) -> None:
        self._port_file = run_dir / "server.port"
        self._port_file.unlink(missing_ok=True)
        self._log_path = run_dir / "server.log"
        cmd = [sys.executable, "-m", "minutely.serve", "--registry", str(registry_dir)]
        for m in models:
            cmd += ["--model", m]
        cmd += ["--host", host, "--port", str(port), "--port-file", str(self._port_file)]
        cmd += ["--poll-interval", str(poll_interval_s)]
        if public_key is not None:
            cmd += ["--public-key", str(public_key)]
        self._log = self._log_path.open("wb")
        # Dies with this process even when it is SIGKILLed (no close() runs then).
        self._proc = spawn_child(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + start_timeout_s
        while not (self._port_file.exists() and self._port_file.read_text().strip()):
            if self._proc.poll() is not None:
                self.close()
                raise ServeError(
                    f"inference server exited with code {self._proc.returncode} at start; "
                    f"see {self._log_path}"
                )
            if time.monotonic() > deadline:
                self.close()
                raise ServeError(f"inference server did not start in {start_timeout_s} s")
            time.sleep(0.05)
        self.url = f"http://{host}:{int(self._port_file.read_text())}"
        self.client = httpx.Client(base_url=self.url, timeout=60.0)
        self._enc = msgspec.json.Encoder()

    def status(self, model: str) -> dict[str, Any]:
        try:
            r = self.client.get(f"/v1/models/{model}")
        except httpx.HTTPError as exc:
            raise ServeError(
                f"inference server at {self.url} did not answer ({exc}); see {self._log_path}"
            ) from exc
        if r.status_code != 200:
            return {}
        out: dict[str, Any] = r.json()
        return out

    def wait_for_version(self, model: str, version: str, timeout_s: float = 60.0) -> None:
        """Block until the server answers with ``version`` (it polls the registry)."""
        deadline = time.monotonic() + timeout_s
        while (status := self.status(model)).get("version") != version:
            for refusal in status.get("refused", []):
                if refusal.get("version") == version:
                    raise ServeError(
                        f"inference server refused {model} {version}: {refusal.get('reason')}"
                    )
            if time.monotonic() > deadline:
                raise ServeError(
                    f"inference server did not load {model} {version} in {timeout_s} s "
                    f"(serving {self.status(model).get('version')!r})"
                )
            time.sleep(0.01)

    def predict(self, model: str, instances: list[dict[str, Any]]) -> tuple[str, list[float]]:
        body = self._enc.encode({"instances": instances})
        try:
            r = self.client.post(
                f"/v1/models/{model}:predict",
                content=body,
                headers={"content-type": "application/json"},
            )
        except httpx.HTTPError as exc:
            raise ServeError(
                f"inference server at {self.url} did not answer ({exc}); see {self._log_path}"
            ) from exc
        if r.status_code != 200:
            raise ServeError(f"predict failed with HTTP {r.status_code}: {r.text[:300]}")
        doc = r.json()
        return str(doc["version"]), [float(p) for p in doc["predictions"]]

    def close(self) -> None:
        if hasattr(self, "client"):
            self.client.close()
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._log.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
