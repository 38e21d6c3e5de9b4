"""The log backends the stream conformance suite runs against.

A :class:`LogFactory` holds only plain, picklable values, so a test can hand it to another process,
which opens the same log through :func:`minutely.stream.open_log`, as a pipeline stage would.
A new backend is one more entry in :data:`BACKENDS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kafka_broker import session_broker
from minutely.config import StreamConfig
from minutely.stream import Log, open_log


@dataclass(frozen=True)
class LogFactory:
    """Opens handles on one log."""

    cfg: StreamConfig
    base_dir: Path

    def open(self) -> Log:
        return open_log(self.cfg, self.base_dir)


def _sqlite(tmp_path: Path) -> LogFactory:
    # A short session timeout keeps the tests of dead group members quick.
    cfg = StreamConfig(backend="sqlite", path="log.sqlite", session_timeout_s=1.5)
    return LogFactory(cfg, tmp_path)


def _kafka(tmp_path: Path) -> LogFactory:
    # The session's broker; each test's topics are unique (the ``new_topic`` fixture). 6 s is the
    # broker's shortest session timeout; 10 s bounds the tests of an unreachable broker.
    cfg = StreamConfig(
        backend="kafka",
        bootstrap_servers=session_broker().bootstrap,
        session_timeout_s=6.0,
        request_timeout_s=10.0,
    )
    return LogFactory(cfg, tmp_path)


BACKENDS: dict[str, Callable[[Path], LogFactory]] = {"sqlite": _sqlite, "kafka": _kafka}
