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
from minutely.errors import ConfigError
from minutely.fsutil import ensure_writable_dir
from minutely.stream.base import Log
from minutely.stream.kafka import KafkaLog
from minutely.stream.sqlite import SqliteLog


def open_log(cfg: StreamConfig, base_dir: Path) -> Log:
    """Open the log that ``cfg`` describes.

    SQLite: ``cfg.path`` is taken relative to ``base_dir`` unless it is absolute; missing parent
    folders are created, and a folder that cannot be written is a
    :class:`~minutely.errors.StorageError`. Kafka: the brokers at ``cfg.bootstrap_servers`` with
    the client options ``cfg.kafka``; topic names are used as they are. Every stage opens its log
    here, so a new backend is one more branch below.
    """
    if cfg.backend == "sqlite":
        path = Path(cfg.path)
        if not path.is_absolute():
            path = Path(base_dir) / path
        ensure_writable_dir(path.parent, "sqlite log folder")
        return SqliteLog(path, session_timeout_s=cfg.session_timeout_s)
    if cfg.backend == "kafka":
        return KafkaLog(
            cfg.bootstrap_servers,
            options=cfg.kafka,
            session_timeout_s=cfg.session_timeout_s,
            request_timeout_s=cfg.request_timeout_s,
        )
    raise ConfigError("stream.backend", "one of ['sqlite', 'kafka']", cfg.backend)
