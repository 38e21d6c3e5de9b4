"""Two-way splitting of many small, independent tensor operations.

A training step's per-table work (reading a batch's rows of 40 tables, updating them) is a few
hundred operations too small for torch's intra-op threads, each waiting on memory. With more
than one thread allowed (``torch.get_num_threads()``, the caller's setting, which stays as it
is), :func:`run_split` runs about half of such a list on one helper thread while the calling thread
runs the rest; torch releases the GIL inside each operation, so both proceed at once.

>>> out = []
>>> run_split([lambda: out.append(1), lambda: out.append(2)], [1, 1])
>>> sorted(out)
[1, 2]
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

# Below this total weight (rows touched) the helper's hand-off costs more than it saves.
MIN_SPLIT_WEIGHT = 4096

_helper: tuple[int, ThreadPoolExecutor] | None = None
_local = threading.local()


def _executor() -> ThreadPoolExecutor:
    """The process's helper thread (a new one after a fork: threads do not survive it)."""
    global _helper
    pid = os.getpid()
    if _helper is None or _helper[0] != pid:
        _helper = (pid, ThreadPoolExecutor(max_workers=1, thread_name_prefix="minutely-split"))
    return _helper[1]


def run_split(tasks: Sequence[Callable[[], object]], weights: Sequence[int]) -> None:
    """Run every task once, without autograd; about half the weight on a helper thread.

    Tasks must be independent (touch disjoint tensors). They all run on the calling thread when
    torch may use one thread only, when there are fewer than two tasks or when the total weight
    is below :data:`MIN_SPLIT_WEIGHT`. The helper thread's own OpenMP team size is set to the
    caller's thread count, so an operation there never uses more threads than one on the
    calling thread would. A task that raises ends its thread's share; the exception is raised
    here once both threads have stopped.
    """
    threads = torch.get_num_threads()
    total = sum(weights)
    if threads < 2 or len(tasks) < 2 or total < MIN_SPLIT_WEIGHT:
        with torch.no_grad():
            for task in tasks:
                task()
        return
    # The helper takes a prefix holding about half the weight (at least one task each).
    cut, acc = 0, 0
    while cut < len(tasks) - 1 and 2 * (acc + weights[cut]) <= total:
        acc += weights[cut]
        cut += 1
    cut = max(cut, 1)

    def helper() -> None:
        # The caller's own count (so nothing changes globally): it sets this thread's OpenMP
        # team size, also after the caller has changed its count.
        if getattr(_local, "threads", None) != threads:
            torch.set_num_threads(threads)
            _local.threads = threads
        with torch.no_grad():
            for task in tasks[:cut]:
                task()

    future = _executor().submit(helper)
    try:
        with torch.no_grad():
            for task in tasks[cut:]:
                task()
    finally:
        future.result()
