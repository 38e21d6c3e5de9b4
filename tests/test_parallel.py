"""run_split: every task once, half the weight on a helper thread when threads allow."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
import torch

from minutely._parallel import MIN_SPLIT_WEIGHT, run_split


@pytest.fixture
def threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


Log = list[tuple[int, int, bool]]


def recorder(log: Log, k: int) -> Callable[[], None]:
    def task() -> None:
        log.append((k, threading.get_ident(), torch.is_grad_enabled()))

    return task


@pytest.mark.usefixtures("threads")
def test_large_work_is_split_between_the_caller_and_one_helper() -> None:
    torch.set_num_threads(2)
    log: Log = []
    run_split([recorder(log, k) for k in range(6)], [MIN_SPLIT_WEIGHT] * 6)
    assert sorted(k for k, _, _ in log) == list(range(6))
    me = threading.get_ident()
    on_helper = [k for k, ident, _ in log if ident != me]
    assert on_helper == [0, 1, 2]  # a prefix holding half the weight
    assert not any(grad for _, _, grad in log)
    assert torch.get_num_threads() == 2


@pytest.mark.usefixtures("threads")
@pytest.mark.parametrize(("n_threads", "weight"), [(1, MIN_SPLIT_WEIGHT), (2, 1)])
def test_one_thread_or_little_work_stays_on_the_calling_thread(n_threads: int, weight: int) -> None:
    torch.set_num_threads(n_threads)
    log: Log = []
    run_split([recorder(log, k) for k in range(4)], [weight] * 4)
    assert [k for k, _, _ in log] == [0, 1, 2, 3]
    assert {ident for _, ident, _ in log} == {threading.get_ident()}
    assert not any(grad for _, _, grad in log)


@pytest.mark.usefixtures("threads")
def test_an_error_is_raised_once_both_threads_have_stopped() -> None:
    torch.set_num_threads(2)
    ran: list[int] = []

    def fails() -> None:
        raise ValueError("task 0 failed")

    tasks = [fails, *(lambda k=k: ran.append(k) for k in range(1, 4))]
    with pytest.raises(ValueError, match="task 0 failed"):
        run_split(tasks, [MIN_SPLIT_WEIGHT] * 4)
    assert sorted(ran) == [2, 3]  # the helper stops at its failing task; the caller's half ran
