"""A real Kafka broker for the tests: the ``noida-db`` binary, run with only its Kafka service.

:class:`KafkaBroker` starts the binary on a free port and a data folder, waits until the port
accepts connections, and stops it by PID (SIGTERM, then SIGKILL). It can stop and start again on
the same port and data, so a test can take the broker away from its clients and bring it back
(the broker writes its data when it exits on SIGTERM: one killed with SIGKILL loses what it was
sent since it started).
:func:`session_broker` is the one broker a test session shares, started on first use.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.resources
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0


def broker_binary() -> Path:
    """The broker executable shipped in the ``noida_db`` package (not its Python wrapper)."""
    try:
        path = Path(str(importlib.resources.files("noida_db") / "noida-db"))
    except ModuleNotFoundError as exc:
        raise RuntimeError(
            "the Kafka tests need the noida-db package (pip install noida-db==0.2.3, part of the "
            "dev extra)"
        ) from exc
    if not path.is_file():
        raise RuntimeError(f"the Kafka tests need the noida-db broker binary, missing at {path}")
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class KafkaBroker:
    """One broker process on ``127.0.0.1:port`` keeping its data in ``data_dir``."""

    def __init__(
        self, data_dir: Path, port: int | None = None, *, start_timeout_s: float = START_TIMEOUT_S
    ) -> None:
        self.data_dir = Path(data_dir)
        self.port = free_port() if port is None else port
        self.start_timeout_s = start_timeout_s
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the broker and wait until its port accepts connections."""
        if self.running:
            return
        binary = broker_binary()
        if self._accepts():
            raise RuntimeError(f"kafka broker {self.bootstrap}: the port is already in use")
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        cmd = [
            str(binary),
            "start",
            "--only",
            "kafka",
            "--host",
            "127.0.0.1",
            "--kafka-port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
        ]
        with self.log_path.open("ab") as out:
            # Its own session: a Ctrl-C meant for pytest does not reach the broker first.
            self._proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + self.start_timeout_s
        while not self._accepts():
            if self._proc.poll() is not None:
                self._proc = None
                raise RuntimeError(
                    f"kafka broker {self.bootstrap} exited during start:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"kafka broker {self.bootstrap} did not open its port within "
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
        # The binary may leave a process of its own behind when stopped early (during its
        # start): the whole session it was started in goes.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def restart(self) -> None:
        """Stop, then start again on the same port and data."""
        self.stop()
        self.start()

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(no broker log at {self.log_path}: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def _accepts(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
            return True
        return False


_SESSION: KafkaBroker | None = None


def session_broker() -> KafkaBroker:
    """The broker shared by the whole test session, started on first use."""
    global _SESSION
    if _SESSION is None:
        broker = KafkaBroker(Path(tempfile.mkdtemp(prefix="minutely-kafka-")) / "data")
        broker.start()
        _SESSION = broker
        # Should the session end without its finish hook (a crash), the broker still stops.
        atexit.register(stop_session_broker)
    return _SESSION


def stop_session_broker() -> None:
    """Stop the session's broker, if one started, and delete its data."""
    global _SESSION
    if _SESSION is not None:
        broker, _SESSION = _SESSION, None
        broker.stop()
        shutil.rmtree(broker.data_dir.parent, ignore_errors=True)
