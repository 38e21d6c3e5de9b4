"""The simulated event source: the ad servers' logs, written to the raw topic."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from minutely.clock import MS_PER_DAY
from minutely.pipeline.appender import ExactlyOnceWriter
from minutely.sim import EventBatch, Market
from minutely.stream import Log
from minutely.stream.base import Message


def corrupt(message: tuple[bytes, bytes, int], variant: int) -> tuple[bytes, bytes, int]:
    """A malformed copy of a raw event, of the kinds real logs contain."""
    key, value, ts = message
    if variant % 4 == 0:
        return key, value[: len(value) // 2], ts  # truncated write
    doc = msgspec.json.decode(value)
    if variant % 4 == 1:
        doc.pop("ts_ms")  # a field lost upstream
    elif variant % 4 == 2:
        doc["imp_id"] = str(doc["imp_id"])  # an id logged as text
    else:
        doc["ts_ms"] = doc["ts_ms"] + MS_PER_DAY  # a clock a day ahead
    return key, msgspec.json.encode(doc), ts


class SimSource:
    """Appends the market's events, window by window, to the raw topic (exactly once).

    With ``corrupt_every`` > 0, a malformed copy of every n-th event is added to the stream
    (never replacing a valid one), so the dead-letter path runs in every replay. ``writer``
    restores the exactly-once writer's checkpointed state (see
    :class:`~minutely.pipeline.appender.ExactlyOnceWriter`).
    """

    WRITER_ID = "simulate"

    def __init__(
        self,
        market: Market,
        log: Log,
        topic: str,
        corrupt_every: int = 0,
        writer: Mapping[str, Any] | None = None,
        produced: int = 0,
    ) -> None:
        self._market = market
        self._out = ExactlyOnceWriter(log, topic, self.WRITER_ID, writer)
        self._corrupt_every = corrupt_every
        self.produced = produced
        self.corrupted = produced // corrupt_every if corrupt_every else 0

    def produce(self, start_ms: int, end_ms: int) -> EventBatch:
        batch = self._market.events_between(start_ms, end_ms)
        messages = batch.messages()
        if self._corrupt_every:
            out: list[Message] = []
            every = self._corrupt_every
            for i, msg in enumerate(messages, start=self.produced):
                out.append(msg)
                if (i + 1) % every == 0:
                    out.append(corrupt(msg, i // every))
                    self.corrupted += 1
            self._out.append_keyed(out)
        else:
            self._out.append_keyed(list(messages))
        self.produced += len(messages)
        return batch

    def writer_state(self) -> dict[str, Any]:
        return self._out.state()
