"""open_log: the single switch from configuration to a log backend."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from minutely.config import StreamConfig
from minutely.errors import ConfigError, StorageError
from minutely.stream import SqliteLog, open_log


def test_relative_path_is_under_base_dir_and_folders_are_made(tmp_path: Path) -> None:
    log = open_log(StreamConfig(path="runs/a/log.sqlite"), tmp_path)
    try:
        assert isinstance(log, SqliteLog)
        assert log.path == tmp_path / "runs" / "a" / "log.sqlite"
        log.create_topic("events", 1)
    finally:
        log.close()
    assert (tmp_path / "runs" / "a" / "log.sqlite").is_file()


def test_absolute_path_ignores_base_dir(tmp_path: Path) -> None:
    target = tmp_path / "abs.sqlite"
    log = open_log(StreamConfig(path=str(target)), tmp_path / "elsewhere")
    try:
        assert isinstance(log, SqliteLog)
        assert log.path == target
    finally:
        log.close()
    assert not (tmp_path / "elsewhere").exists()


def test_a_folder_that_cannot_be_made_is_a_storage_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(
        StorageError,
        match=rf"^sqlite log folder {tmp_path / 'file' / 'sub'}: expected a writable folder, "
        r"got a file where a parent folder should be",
    ):
        open_log(StreamConfig(path="sub/log.sqlite"), tmp_path / "file")


def test_a_read_only_log_folder_is_a_storage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def read_only(path: Any, *args: Any, **kwargs: Any) -> int:
        if str(path).startswith(str(tmp_path)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, *args, **kwargs)

    # Root writes through permission bits, so the read-only mount is simulated.
    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(
        StorageError,
        match=rf"^sqlite log folder {tmp_path}: expected a writable folder, "
        r"got a read-only file system \(EROFS",
    ):
        open_log(StreamConfig(path="log.sqlite"), tmp_path)


def test_unknown_backend_is_a_config_error(tmp_path: Path) -> None:
    cfg: Any = StreamConfig(backend="carrier-pigeon")  # type: ignore[arg-type]
    pattern = r"'stream.backend': expected one of \['sqlite', 'kafka'\]"
    with pytest.raises(ConfigError, match=pattern):
        open_log(cfg, tmp_path)
