"""Running one stage as a process: signals, status files, the loop.

Each service (``minutely simulate``, ``join``, ``train``) runs its stage until it is done or told
to stop. SIGTERM and SIGINT set a stop flag; the stage then finishes the item in hand,
checkpoints and exits 0. SIGKILL needs nothing: every stage resumes from its last checkpoint.
While it runs, a service replaces ``<run>/status/<name>.json`` about once a second with its
position, lag and counts, which ``minutely up`` shows as one line per service.
"""

from __future__ import annotations

import gc
import json
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from minutely.clock import Clock
from minutely.fsutil import replace_atomically

STATUS_DIR = "status"


def status_path(run_dir: Path, name: str) -> Path:
    return run_dir / STATUS_DIR / f"{name}.json"


def write_status(run_dir: Path, name: str, clock: Clock, status: dict[str, Any]) -> None:
    path = status_path(run_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"service": name, "updated_ms": clock.now_ms(), **status}
    replace_atomically(path, json.dumps(doc, sort_keys=True).encode())


def read_statuses(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Every service's last status, by name (a file being replaced is skipped this time)."""
    out: dict[str, dict[str, Any]] = {}
    folder = run_dir / STATUS_DIR
    if not folder.is_dir():
        return out
    for f in sorted(folder.glob("*.json")):
        try:
            out[f.stem] = json.loads(f.read_bytes())
        except (OSError, ValueError):
            continue
    return out


def tune_gc() -> None:
    """Keep Python's cycle collector off the long-lived heap of a streaming stage.

    A full collection walks every tracked object: after the imports that is torch's and
    pyarrow's large heap, and in the join the pending impressions; profiles of the join showed a
    quarter of its time there. ``gc.freeze()`` moves what exists now out of the collector's
    view, and a higher first threshold makes collections rarer (the stages create few cycles).
    Called once, when a service starts.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 1_000)


def stop_on_signals() -> threading.Event:
    """A flag that SIGTERM and SIGINT set (call from the main thread)."""
    stop = threading.Event()

    def _set(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _set)
    signal.signal(signal.SIGINT, _set)
    return stop


def serve_loop(
    step: Callable[[], object],
    status: Callable[[], dict[str, Any]],
    run_dir: Path,
    name: str,
    clock: Clock,
    stop: threading.Event,
    *,
    done: Callable[[], bool] = lambda: False,
    status_every_s: float = 1.0,
) -> None:
    """Call ``step`` until ``stop`` is set or ``done()``; write the status on the way."""
    last = 0.0
    while not stop.is_set() and not done():
        step()
        now = time.monotonic()
        if now - last >= status_every_s:
            write_status(run_dir, name, clock, status())
            last = now
    write_status(run_dir, name, clock, {**status(), "stopped": True})
