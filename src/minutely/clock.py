"""Injected time.

Every stage reads time through one :class:`Clock`, so the same pipeline runs live on the wall
clock or as an accelerated, deterministic replay. Times are integer epoch **milliseconds** (UTC).

>>> c = ReplayClock(start_ms=1_000)
>>> c.advance_to(5_000)
>>> c.now_ms()
5000
"""

from __future__ import annotations

import time
from typing import Protocol

MS_PER_S = 1_000
MS_PER_MIN = 60_000
MS_PER_HOUR = 3_600_000
MS_PER_DAY = 86_400_000


class Clock(Protocol):
    """A source of the current time in epoch milliseconds."""

    def now_ms(self) -> int: ...


class WallClock:
    """The system clock."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


class ReplayClock:
    """A clock driven by the replay: it only moves when told, and never backwards."""

    def __init__(self, start_ms: int = 0) -> None:
        self._now = int(start_ms)

    def now_ms(self) -> int:
        return self._now

    def advance_to(self, ts_ms: int) -> None:
        """Move to ``ts_ms``; a time earlier than now is ignored (time never goes back)."""
        if ts_ms > self._now:
            self._now = int(ts_ms)

    def advance(self, delta_ms: int) -> None:
        if delta_ms < 0:
            raise ValueError(f"ReplayClock.advance: expected delta_ms >= 0, got {delta_ms}")
        self._now += int(delta_ms)


def floor_window(ts_ms: int, window_ms: int) -> int:
    """Start of the window of length ``window_ms`` that contains ``ts_ms``."""
    return ts_ms - ts_ms % window_ms
