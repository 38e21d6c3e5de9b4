"""The log backends the stream conformance suite runs against.

A :class:`LogFactory` holds only plain, picklable values, so a test can hand it to another process,
which opens the same log through :func:`minutely.stream.open_log`, as a pipeline stage would.
A new backend is one more entry in :data:`BACKENDS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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
    return LogFactory(StreamConfig(backend="sqlite", path="log.sqlite"), tmp_path)


BACKENDS: dict[str, Callable[[Path], LogFactory]] = {"sqlite": _sqlite}
