"""Several worker processes on one port: the parent of ``python -m minutely.serve --workers N``.

Python runs one thread of Python code at a time per process, so one server process uses about
one core however many requests wait. The parent binds the listening socket once and starts N
workers (each ``python -m minutely.serve`` with the socket's descriptor, ``--listen-fd``); the
kernel hands each new connection to one of the workers waiting in ``accept``. Every worker
polls the registry, loads and swaps versions on its own.

The parent:

* starts the workers with :func:`~minutely.procs.spawn_child`, so they die with it even when it
  is killed with ``SIGKILL``;
* sets ``PROMETHEUS_MULTIPROC_DIR`` to a fresh folder of its own for them, so a scrape of
  ``/metrics`` (answered by any worker) sums all of them (:mod:`minutely.serve.metrics`);
* writes the port file once every worker made its first registry check and listens;
* restarts a worker that exits on its own (the others keep serving meanwhile, and the socket
  stays open, so no connection is refused), and gives up after ``MAX_QUICK_EXITS`` workers in a
  row exited within ``QUICK_EXIT_S`` of their start;
* on ``SIGTERM`` or ``SIGINT`` stops every worker with ``SIGTERM`` (each finishes the requests
  it has in flight), waits for them, removes its folder and exits with status 0.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from minutely.fsutil import replace_atomically
from minutely.procs import spawn_child
from minutely.serve.metrics import MULTIPROC_ENV

logger = logging.getLogger("minutely.serve")

STOP_TIMEOUT_S = 30.0
QUICK_EXIT_S = 10.0
MAX_QUICK_EXITS = 5

WorkerArgv = Callable[[int, Path], list[str]]
"""The command of worker ``i`` given the listening descriptor and its ready file."""


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes]
    started: float
    ready_file: Path


def bind_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A listening TCP socket on ``host:port`` that child processes can inherit."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def supervise(
    worker_argv: WorkerArgv,
    *,
    workers: int,
    host: str,
    port: int,
    port_file: Path | None,
    start_timeout_s: float = 300.0,
) -> int:
    """Run ``workers`` workers on one socket until SIGTERM/SIGINT; the exit status."""
    stop = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = signal.signal(signal.SIGTERM, _stop), signal.signal(signal.SIGINT, _stop)
    try:
        return _supervise(worker_argv, workers, host, port, port_file, start_timeout_s, stop)
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])


def _supervise(
    worker_argv: WorkerArgv,
    workers: int,
    host: str,
    port: int,
    port_file: Path | None,
    start_timeout_s: float,
    stop: threading.Event,
) -> int:
    try:
        sock = bind_socket(host, port)
    except OSError as exc:
        logger.error("cannot listen on %s:%d: %s", host, port, exc)
        return 1
    folder = Path(tempfile.mkdtemp(prefix="minutely-serve-"))
    metrics_dir = folder / "metrics"
    metrics_dir.mkdir()
    env = {**os.environ, MULTIPROC_ENV: str(metrics_dir)}
    fd = sock.fileno()

    def start(index: int) -> _Worker:
        ready = folder / f"worker-{index}.ready"
        ready.unlink(missing_ok=True)
        proc = spawn_child(worker_argv(fd, ready), pass_fds=(fd,), env=env)
        logger.info("worker %d started (pid %d)", index, proc.pid)
        return _Worker(index, proc, time.monotonic(), ready)

    pool: list[_Worker] = []
    try:
        pool = [start(i) for i in range(workers)]
        status = _wait_ready(pool, stop, start_timeout_s)
        if status is not None:
            return status
        bound = sock.getsockname()[1]
        if port_file is not None:
            replace_atomically(port_file, f"{bound}\n".encode())
        logger.info("%d workers listening on %s:%d", workers, host, bound)
        return _watch(pool, stop, start, metrics_dir)
    finally:
        _stop_all(pool)
        sock.close()
        shutil.rmtree(folder, ignore_errors=True)


def _wait_ready(pool: Sequence[_Worker], stop: threading.Event, timeout_s: float) -> int | None:
    """``None`` once every worker is ready; an exit status when one failed or time ran out."""
    deadline = time.monotonic() + timeout_s
    while not all(_is_ready(w) for w in pool):
        for w in pool:
            code = w.proc.poll()
            if code is not None:
                logger.error("worker %d exited with %d at start", w.index, code)
                return 1
        if time.monotonic() > deadline:
            logger.error("workers did not start in %.0f s", timeout_s)
            return 1
        if stop.wait(0.05):
            return 0
    return None


def _is_ready(worker: _Worker) -> bool:
    try:
        return bool(worker.ready_file.read_text().strip())
    except FileNotFoundError:
        return False


def _watch(
    pool: list[_Worker],
    stop: threading.Event,
    start: Callable[[int], _Worker],
    metrics_dir: Path,
) -> int:
    """Restart workers that exit until ``stop`` is set; 0, or 1 when they keep failing."""
    from prometheus_client.multiprocess import mark_process_dead

    quick_exits = 0
    while not stop.wait(0.2):
        for i, w in enumerate(pool):
            code = w.proc.poll()
            if code is None:
                continue
            mark_process_dead(w.proc.pid, str(metrics_dir))  # type: ignore[no-untyped-call]
            lived = time.monotonic() - w.started
            quick_exits = quick_exits + 1 if lived < QUICK_EXIT_S else 0
            if quick_exits >= MAX_QUICK_EXITS:
                logger.error(
                    "worker %d exited with %d after %.1f s, the %d-th quick exit in a row; "
                    "stopping",
                    w.index,
                    code,
                    lived,
                    quick_exits,
                )
                return 1
            logger.warning(
                "worker %d (pid %d) exited with %d after %.1f s; restarting it",
                w.index,
                w.proc.pid,
                code,
                lived,
            )
            pool[i] = start(w.index)
    return 0


def _stop_all(pool: Sequence[_Worker]) -> None:
    """SIGTERM every worker, wait for them (SIGKILL after ``STOP_TIMEOUT_S``)."""
    for w in pool:
        if w.proc.poll() is None:
            w.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for w in pool:
        try:
            w.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning("worker %d did not stop in %.0f s; killing it", w.index, STOP_TIMEOUT_S)
            w.proc.kill()
            w.proc.wait()
