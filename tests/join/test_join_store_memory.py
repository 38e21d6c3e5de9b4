"""Days of simulated traffic through a joiner with its state on disk: the join's memory stays
flat while the store grows with the pCVR horizon, and the store shrinks again as entries
expire."""

from __future__ import annotations

import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import pytest

from minutely.clock import MS_PER_DAY, MS_PER_HOUR
from minutely.config import JoinConfig, ModelConfig, SimConfig
from minutely.events import decode_event
from minutely.join import Joiner
from minutely.join.store import JoinStore
from minutely.schema import default_schema
from minutely.sim import Market

pytestmark = pytest.mark.slow

SIM = SimConfig(impressions_per_day=30_000, users=3_000, campaigns_per_hour=4)
CTR = ModelConfig(name="ctr", attribution_window_s=600, correction_horizon_s=3_600)


def cvr(horizon_days: int) -> ModelConfig:
    return ModelConfig(
        name="cvr",
        label="conversion",
        attribution_window_s=3_600,
        correction_horizon_s=horizon_days * 86_400,
    )


def hours_of_traffic(days: int) -> list[list[bytes]]:
    """Each simulated hour's raw events, encoded, as a producer logs them."""
    market = Market(SIM)
    t0 = market.day_start_ms(0)
    return [
        [
            v
            for _, v, _ in market.events_between(
                t0 + h * MS_PER_HOUR, t0 + (h + 1) * MS_PER_HOUR
            ).messages()
        ]
        for h in range(days * 24)
    ]


@dataclass
class Day:
    peak_bytes: int  # the join's peak of traced Python allocations that day
    entry_rows: int  # pCVR entries in the store at the day's end
    store_bytes: int  # the store's pages in use at the day's end


def replay(traffic: list[list[bytes]], model: ModelConfig, store: JoinStore | None) -> list[Day]:
    """Join hour by hour, checkpointing each hour (with a store); one :class:`Day` per day."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        j = Joiner([CTR, model], JoinConfig(), default_schema(), store=store)
        days: list[Day] = []
        for h, hour in enumerate(traffic):
            if h % 24 == 0:
                tracemalloc.reset_peak()
            j.process_many([decode_event(v) for v in hour])
            j.drain()
            j.drain_late()
            if store is not None:
                j.checkpoint()
            if h % 24 == 23:
                peak = tracemalloc.get_traced_memory()[1] - base
                rows = 0 if store is None else store.row_counts()[1]
                size = 0 if store is None else store.used_bytes()
                days.append(Day(peak, rows, size))
        return days
    finally:
        tracemalloc.stop()


def test_a_week_with_a_week_long_horizon_keeps_the_joins_memory_flat(tmp_path: Path) -> None:
    traffic = hours_of_traffic(7)
    store = JoinStore.create(tmp_path / "p0.sqlite")
    days = replay(traffic, cvr(7), store)
    store.close()
    # Every day's entries are kept for the whole week: the store grows day by day...
    rows = [d.entry_rows for d in days]
    assert rows == sorted(rows)
    assert rows[6] > 5 * rows[0] > 0
    assert days[6].store_bytes > 2 * days[1].store_bytes
    # ...while the join's memory on day 7 is that of day 2.
    peaks = [d.peak_bytes for d in days]
    assert peaks[6] <= 1.1 * peaks[1] + 200_000, peaks
    # The same replay without a store holds every entry in memory: the measure sees it grow.
    in_memory = [d.peak_bytes for d in replay(traffic, cvr(7), None)]
    assert in_memory[6] > 1.5 * in_memory[1], in_memory


def test_entries_leave_the_store_once_their_horizon_passes(tmp_path: Path) -> None:
    traffic = hours_of_traffic(5)
    path = tmp_path / "p0.sqlite"
    store = JoinStore.create(path)
    days = replay(traffic, cvr(2), store)
    rows = [d.entry_rows for d in days]
    # A day's entries expire two days (plus the window) later: the count grows for two days,
    # then stays, and so does the space in use.
    assert rows[1] > 1.5 * rows[0] > 0
    assert max(rows[2:]) < 1.3 * rows[1], rows
    used = [d.store_bytes for d in days]
    assert max(used[2:]) < 1.3 * used[1], used
    j = Joiner.resume([CTR, cvr(2)], JoinConfig(), default_schema(), store)
    j.advance_to(Market(SIM).day_start_ms(0) + 8 * MS_PER_DAY)  # past every horizon
    j.checkpoint()
    assert store.row_counts() == (0, 0)
    store.close()
