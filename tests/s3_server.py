"""A real S3 endpoint for the tests: moto's standalone server (``moto_server``) on a free port.

:class:`S3Server` starts the ``moto_server`` script installed beside the running Python, waits
until its port accepts connections, and stops it by PID (SIGTERM, then SIGKILL). It keeps its
buckets in memory: a restart starts empty. :func:`session_s3` is the one server a test session
shares, started on first use; tests make a bucket of their own (:func:`new_bucket`).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0
REGION = "eu-west-1"  # not us-east-1: bucket creation needs a location constraint elsewhere


def server_binary() -> Path:
    """The ``moto_server`` script of the environment running the tests."""
    path = Path(sys.executable).parent / "moto_server"
    if not path.is_file():
        raise RuntimeError(
            f"the S3 tests need moto's server (pip install 'moto[server]', part of the dev "
            f"extra), missing at {path}"
        )
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class S3Server:
    """One ``moto_server`` process on ``127.0.0.1:port``."""

    def __init__(
        self, port: int | None = None, *, start_timeout_s: float = START_TIMEOUT_S
    ) -> None:
        self.port = free_port() if port is None else port
        self.start_timeout_s = start_timeout_s
        self.log_path = Path(tempfile.gettempdir()) / f"minutely-moto-{self.port}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def storage_options(self) -> dict[str, Any]:
        """What s3fs takes to reach this server (moto accepts any key)."""
        return s3_storage_options(self.endpoint)

    def start(self) -> None:
        """Start the server and wait until its port accepts connections."""
        if self.running:
            return
        if self._accepts():
            raise RuntimeError(f"s3 server {self.endpoint}: the port is already in use")
        cmd = [str(server_binary()), "-H", "127.0.0.1", "-p", str(self.port)]
        env = {**os.environ, "AWS_DEFAULT_REGION": REGION}
        with self.log_path.open("ab") as out:
            self._proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        deadline = time.monotonic() + self.start_timeout_s
        while not self._accepts():
            if self._proc.poll() is not None:
                self._proc = None
                raise RuntimeError(
                    f"s3 server {self.endpoint} exited during start:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"s3 server {self.endpoint} did not open its port within "
                    f"{self.start_timeout_s} s:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited after a few seconds. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT_S)
        self.log_path.unlink(missing_ok=True)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(no server log at {self.log_path}: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def _accepts(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
            return True
        return False


def new_bucket(endpoint: str, prefix: str = "test") -> str:
    """Create a bucket with a unique name on the S3 server at ``endpoint``; its name."""
    import boto3

    name = f"{prefix}-{uuid.uuid4().hex[:16]}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id="x",
        aws_secret_access_key="x",
    )
    client.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": REGION})
    return name


def s3_storage_options(endpoint: str) -> dict[str, Any]:
    """s3fs options for the S3 server at ``endpoint``."""
    return {
        "key": "x",
        "secret": "x",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": REGION},
    }


_SESSION: S3Server | None = None


def session_s3() -> S3Server:
    """The S3 server shared by the whole test session, started on first use."""
    global _SESSION
    if _SESSION is None:
        server = S3Server()
        server.start()
        _SESSION = server
        atexit.register(stop_session_s3)
    return _SESSION


def stop_session_s3() -> None:
    """Stop the session's S3 server, if one started."""
    global _SESSION
    if _SESSION is not None:
        server, _SESSION = _SESSION, None
        server.stop()
