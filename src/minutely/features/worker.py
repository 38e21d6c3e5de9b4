"""One process per replica: every storage call runs there, so a call that hangs can be abandoned.

delta-rs holds the GIL during some of its storage calls (``DeltaTable.is_deltatable`` does: while
it waits on a store that does not answer, no other Python thread runs), so a call that hangs in a
thread would stall the whole interpreter and no timeout could fire. Each replica therefore gets
a child process (:class:`ReplicaProcess`, started through :func:`minutely.procs.spawn_child`, so
it dies with its parent): requests and answers are pickled over two pipes, the parent waits for
an answer with a timeout, and a child that has not answered in time is killed and started again.

The child (:mod:`minutely.features._child`, run as ``python -m minutely.features._child RFD
WFD``) first receives its replica (URL, storage options, which never appear on a command line)
and the table's Arrow schema, then serves one request at a time:

* ``ensure``: open the table, creating it when there is none; answers the way its columns differ
  from the schema, or ``None``;
* ``append``: bring the table to its newest version and append one Arrow table in one commit
  (a table that disappeared is an error, never created again);
* ``read``: bring the table to its newest version (when asked) and read the files of one
  bucket that the parent has not read yet;
* ``check``: bring the table to its newest version; answers the seconds it took.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import weakref
from collections.abc import Mapping
from multiprocessing.connection import Connection
from subprocess import DEVNULL, Popen, TimeoutExpired
from typing import Any

import pyarrow as pa

from minutely.procs import spawn_child

_READY = "ready"  # what the child answers once it runs (minutely.features._child.READY)
STARTUP_TIMEOUT_S = 60.0
"""How long a child may take to import its libraries and answer that it runs."""


def _reap(proc: Popen[bytes], send: Connection, recv: Connection) -> None:
    send.close()
    recv.close()
    if proc.poll() is None:
        proc.kill()
    proc.wait()


class ReplicaError(Exception):
    """One call to one replica failed or did not answer in time (internal to the package:
    callers of the reader and the writer get :class:`~minutely.errors.StorageError`)."""

    def __init__(self, url: str, cause: str, *, mismatch: bool = False) -> None:
        super().__init__(f"{url}: {cause}")
        self.url = url
        self.cause = cause
        self.mismatch = mismatch


class ReplicaProcess:
    """The parent's handle on one replica's child process.

    One request is in flight at a time: :meth:`send` refuses while an answer is awaited, and
    :meth:`receive` waits for it at most ``timeout_s``, after which the child is killed (its
    storage call is abandoned) and a fresh one started for the next request.
    """

    def __init__(self, url: str, options: Mapping[str, str], schema: pa.Schema, name: str) -> None:
        self.url = url
        self._init = ("init", url, dict(options), schema)
        self.name = name
        self._proc: Popen[bytes] | None = None
        self._reaper: weakref.finalize[Any, ReplicaProcess] | None = None
        self._send: Connection | None = None
        self._recv: Connection | None = None
        self._ready = False
        self._inflight: float | None = None  # when the request awaiting an answer was sent
        self.restarts = -1
        self.start()

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the child (it imports its libraries while the parent goes on)."""
        self.kill()
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        try:
            self._proc = spawn_child(
                [
                    sys.executable,
                    "-m",
                    "minutely.features._child",
                    str(to_child_r),
                    str(from_child_w),
                ],
                pass_fds=(to_child_r, from_child_w),
                stdin=DEVNULL,
                stdout=DEVNULL,  # the parent's stdout stays its own (stderr is shared)
            )
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self._send = Connection(to_child_w, readable=False)
        self._recv = Connection(from_child_r, writable=False)
        # A handle dropped without close (or an interpreter that exits) still reaps its child.
        self._reaper = weakref.finalize(self, _reap, self._proc, self._send, self._recv)
        with contextlib.suppress(OSError):  # a child gone at once shows in wait_ready
            self._send.send(self._init)
        self._ready = False
        self._inflight = None
        self.restarts += 1

    def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        """Wait until the child runs; :class:`ReplicaError` when it does not in ``timeout_s``."""
        if self._ready:
            return
        if self._recv is None:
            self.start()
        assert self._recv is not None
        try:
            if not self._recv.poll(timeout_s):
                self.kill()
                raise ReplicaError(self.url, f"its worker process did not start in {timeout_s:g} s")
            msg = self._recv.recv()
        except (EOFError, OSError) as exc:
            how = self._how_it_ended()
            self.kill()
            raise ReplicaError(self.url, f"its worker process ended at start ({how})") from exc
        if msg != _READY:  # pragma: no cover (a protocol error)
            self.kill()
            raise ReplicaError(self.url, f"its worker process answered {msg!r} at start")
        self._ready = True

    def running(self) -> bool:
        """Whether the child runs and has answered that it does (never waits): a child that
        is gone is started again, so it is ready by a later call."""
        if self._proc is None or self._proc.poll() is not None:
            self.start()
            return False
        if not self._ready and self._recv is not None and self._recv.poll(0):
            try:
                self.wait_ready(0)
            except ReplicaError:  # it ended at start: killed, and started again next time
                return False
        return self._ready

    @property
    def pid(self) -> int | None:
        """The child's process id (``None`` while none is started)."""
        return None if self._proc is None else self._proc.pid

    @property
    def busy(self) -> bool:
        """Whether a request awaits its answer."""
        return self._inflight is not None

    @property
    def inflight_s(self) -> float:
        """Seconds the request in flight has waited (0 when none)."""
        return 0.0 if self._inflight is None else time.monotonic() - self._inflight

    def kill(self) -> None:
        """Kill the child (if any) and forget the request in flight."""
        if self._reaper is not None:
            self._reaper()  # runs once: closes the pipes, kills and waits for the child
        self._reaper = None
        self._send = self._recv = None
        self._proc = None
        self._ready = False
        self._inflight = None

    def close(self, timeout_s: float = 2.0) -> None:
        """Ask the child to stop; kill it when it has not after ``timeout_s``."""
        proc = self._proc
        if proc is not None and self._send is not None and not self.busy:
            try:
                self._send.send(("stop",))
                proc.wait(timeout=timeout_s)
            except Exception:  # a child that is gone or does not stop is killed below
                pass
        self.kill()

    def _how_it_ended(self) -> str:
        """How the child ended, once its pipe closed: its exit status or the signal."""
        if self._proc is None:
            return "no process"
        try:
            code = self._proc.wait(timeout=1.0)
        except TimeoutExpired:
            return "its pipe closed, the process still runs"
        return f"killed by signal {-code}" if code < 0 else f"exit status {code}"

    # --- requests -----------------------------------------------------------------------------

    def send(self, *request: Any) -> None:
        """Send one request (starting the child first if it is not running)."""
        if self.busy:
            raise ReplicaError(
                self.url, f"it has not answered its previous call after {self.inflight_s:.1f} s"
            )
        if self._proc is None or self._proc.poll() is not None:
            self.start()
        self.wait_ready()
        assert self._send is not None
        try:
            self._send.send(request)
        except OSError as exc:
            self.kill()
            raise ReplicaError(self.url, f"its worker process is gone ({exc!r})") from exc
        self._inflight = time.monotonic()

    def answered(self) -> bool:
        """Whether the request in flight has its answer waiting."""
        return self._recv is not None and self.busy and self._recv.poll(0)

    def receive(self, timeout_s: float, what: str) -> Any:
        """The answer to the request in flight; :class:`ReplicaError` for an error it reports,
        a dead child, or no answer within ``timeout_s`` (``what`` names that limit)."""
        if self._recv is None or self._inflight is None:
            raise ReplicaError(self.url, "no request awaits an answer")
        try:
            if not self._recv.poll(max(timeout_s, 0.0)):
                waited = self.inflight_s
                self.kill()
                raise ReplicaError(self.url, f"no answer within {what} (waited {waited:.2f} s)")
            answer = self._recv.recv()
        except (EOFError, OSError) as exc:
            how = self._how_it_ended()
            self.kill()
            raise ReplicaError(self.url, f"its worker process died ({how})") from exc
        self._inflight = None
        if answer[0] == "ok":
            return answer[1]
        if answer[0] == "mismatch":
            raise ReplicaError(
                self.url, f"a table whose columns differ: {answer[1]}", mismatch=True
            )
        raise ReplicaError(self.url, answer[1])

    def call(self, timeout_s: float, what: str, *request: Any) -> Any:
        self.send(*request)
        return self.receive(timeout_s, what)
