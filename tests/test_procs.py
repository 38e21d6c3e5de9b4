"""spawn_child: a child that never outlives its parent and keeps out of its process group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from minutely.procs import spawn_child

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux-only")

SLEEPER = [sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(120)"]


def alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie nobody reaped yet counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return not alive(pid)


def test_the_child_runs_the_command_in_its_own_session(tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    code = "import os, sys; open(sys.argv[1], 'w').write(f'{os.getpid()} {os.getsid(0)}')"
    child = spawn_child([sys.executable, "-c", code, str(out)])
    assert child.wait(timeout=60) == 0
    pid, sid = map(int, out.read_text().split())
    assert pid == child.pid  # the trampoline became the command (exec), not its parent
    assert sid == child.pid  # a session of its own: the terminal's Ctrl-C stays with the parent
    assert os.getsid(0) != sid


def test_popen_arguments_pass_through(tmp_path: Path) -> None:
    child = spawn_child(
        [sys.executable, "-c", "import os; print(os.getcwd(), os.environ['MINUTELY_X'])"],
        cwd=tmp_path,
        env={**os.environ, "MINUTELY_X": "42"},
        stdout=subprocess.PIPE,
    )
    out, _ = child.communicate(timeout=60)
    assert out.decode().split() == [str(tmp_path), "42"]


def test_a_command_that_cannot_start_exits_127_naming_it(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-program")
    child = spawn_child([missing], stderr=subprocess.PIPE)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 127
    assert f"cannot start {missing!r}" in err.decode()


def test_an_empty_command_and_conflicting_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match=r"spawn_child: expected a non-empty argv, got \[\]"):
        spawn_child([])
    with pytest.raises(ValueError, match=r"other than preexec_fn .*, got \['preexec_fn'\]"):
        spawn_child(SLEEPER, preexec_fn=lambda: None)


def test_the_trampoline_refuses_a_malformed_command_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "minutely.procs", "x", "sleep"], capture_output=True, timeout=60
    )
    assert proc.returncode == 2
    assert "expected PARENT_PID -- ARGV..., got ['x', 'sleep']" in proc.stderr.decode()


def test_the_trampoline_does_not_start_a_command_whose_parent_is_gone() -> None:
    # A parent PID that is not ours stands for a parent that died before the signal was armed.
    proc = subprocess.run(
        [sys.executable, "-m", "minutely.procs", "1", "--", *SLEEPER],
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stdout == b""


PARENT = textwrap.dedent(
    """
    import sys, time
    from minutely.procs import spawn_child

    child = spawn_child(%r)
    print(child.pid, flush=True)
    time.sleep(120)
    """
)


@pytest.mark.integration
def test_the_child_dies_when_its_parent_is_killed() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT % (SLEEPER,)], stdout=subprocess.PIPE, text=True
    )
    child_pid = None
    try:
        assert parent.stdout is not None
        child_pid = int(parent.stdout.readline())
        assert parent.stdout.readline() == "ready\n"  # the command itself runs (shared stdout)
        assert alive(child_pid)
        parent.send_signal(signal.SIGKILL)  # no cleanup code of the parent can run
        parent.wait(timeout=10)
        assert wait_gone(child_pid, timeout_s=5), f"child {child_pid} outlived its parent"
    finally:
        parent.kill()
        parent.wait()
        assert parent.stdout is not None
        parent.stdout.close()
        if child_pid is not None and alive(child_pid):
            os.kill(child_pid, signal.SIGKILL)
