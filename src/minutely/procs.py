"""Child processes that never outlive their parent.

:func:`spawn_child` starts ``argv`` through a small trampoline, ``python -m minutely.procs``,
which on Linux asks the kernel to send the child ``SIGTERM`` when its parent dies
(``prctl(PR_SET_PDEATHSIG)``) and then replaces itself with ``argv`` (``os.execvp``: same PID,
and the setting survives the exec). So even a parent killed with ``SIGKILL``, whose cleanup code
never runs, takes its children with it.

Why a trampoline rather than ``Popen(preexec_fn=...)``: ``preexec_fn`` runs Python code between
``fork`` and ``exec`` in a copy of a process that may have other threads (the HTTP client, torch's
pools, a server's loop); a lock one of them held at the fork stays locked forever in the child,
which can then hang before it ever execs. The trampoline is a fresh single-threaded interpreter,
so setting the signal there is safe; the price is one short interpreter start (this module
imports nothing heavy).

The trampoline also checks that its parent is still the process that spawned it: a parent that
died before ``prctl`` took effect would otherwise leave the child orphaned for good.

The child gets a session and process group of its own (``start_new_session``): a Ctrl-C in the
terminal reaches only the parent, which then stops its children in order, instead of every
process at once.

Limits: the death signal follows the *thread* that spawned the child, so spawn from a thread that
lives as long as the child (the main thread, typically). Elsewhere than Linux the trampoline only
execs: the child gets its own session but no death signal.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from minutely.errors import ServeError

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_USAGE = "usage: python -m minutely.procs PARENT_PID -- ARGV..."


def spawn_child(argv: Sequence[str], **popen_kw: Any) -> subprocess.Popen[Any]:
    """Start ``argv`` as a child that receives ``SIGTERM`` when this process dies.

    ``popen_kw`` goes to :class:`subprocess.Popen` (``stdout``, ``cwd``, ``env``...); the
    returned ``Popen``'s ``pid`` is the command's own (the trampoline execs into it). A command
    that cannot be started exits with status 127 and says why on its stderr.
    """
    argv = [str(a) for a in argv]
    if not argv:
        raise ValueError(f"spawn_child: expected a non-empty argv, got {argv}")
    if "preexec_fn" in popen_kw or "start_new_session" in popen_kw:
        raise ValueError(
            "spawn_child: expected Popen arguments other than preexec_fn and start_new_session "
            f"(it sets up the child itself), got {sorted(popen_kw)}"
        )
    trampoline = [sys.executable, "-m", "minutely.procs", str(os.getpid()), "--", *argv]
    return subprocess.Popen(trampoline, start_new_session=True, **popen_kw)


def wait_for_port_file(
    path: Path, proc: subprocess.Popen[Any], what: str, *, timeout_s: float
) -> int:
    """The port a child writes to ``path`` once it listens; :class:`ServeError` naming ``what``
    when the child exits first or nothing is written within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            text = ""
        if text:
            return int(text)
        code = proc.poll()
        if code is not None:
            raise ServeError(f"{what}: expected it to listen, got exit code {code} at start")
        if time.monotonic() > deadline:
            raise ServeError(
                f"{what}: expected its port in {path} within {timeout_s:g} s, got nothing"
            )
        time.sleep(0.05)


def _set_parent_death_signal(sig: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")


def _trampoline(args: Sequence[str]) -> int:
    """Set the death signal, check the parent is alive, exec the command (returns on failure)."""
    if len(args) < 3 or args[1] != "--" or not args[0].isdigit():
        print(f"minutely.procs: expected PARENT_PID -- ARGV..., got {list(args)}", file=sys.stderr)
        print(_USAGE, file=sys.stderr)
        return 2
    parent, argv = int(args[0]), list(args[2:])
    if sys.platform == "linux":
        _set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the signal was armed
            return 1
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        print(f"minutely.procs: cannot start {argv[0]!r}: {exc}", file=sys.stderr)
    return 127


if __name__ == "__main__":
    raise SystemExit(_trampoline(sys.argv[1:]))
