"""The one place that picks the log backend from the configuration.

>>> import tempfile
>>> from pathlib import Path
>>> from minutely.config import StreamConfig
>>> log = open_log(StreamConfig(path="run/log.sqlite"), Path(tempfile.mkdtemp()))
>>> log.create_topic("events", 4)
>>> log.close()
"""

from __future__ import annotations

from pathlib import Path

from minutely.config import StreamConfig
from minutely.errors import ConfigError, StreamError
from minutely.stream.base import Log
from minutely.stream.sqlite import SqliteLog


def open_log(cfg: StreamConfig, base_dir: Path) -> Log:
    """Open the log that ``cfg`` describes.

    ``cfg.path`` is taken relative to ``base_dir`` unless it is absolute; missing parent folders
    are created. Every stage opens its log here, so a new backend is one more branch below.
    """
    if cfg.backend == "sqlite":
        path = Path(cfg.path)
        if not path.is_absolute():
            path = Path(base_dir) / path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StreamError(f"sqlite log {path}: cannot create its folder: {exc}") from exc
        return SqliteLog(path)
    raise ConfigError("stream.backend", "one of ['sqlite']", cfg.backend)
