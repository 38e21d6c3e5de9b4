"""Folders minutely writes into, durable writes, and stale leftovers: clear errors, no debris.

Tests run as root, which writes through any permission bit, so read-only and full file systems
are simulated by making the OS call fail with the errno the kernel would give.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from minutely.errors import MinutelyError, StorageError
from minutely.fsutil import (
    ensure_writable_dir,
    fsync_dir,
    remove_stale_dirs,
    replace_atomically,
    write_file_durably,
)


def failing_under(root: Path, code: int, real: Callable[..., Any]) -> Callable[..., Any]:
    """``real``, except that a call on a path (or an fd of a file) under ``root`` fails."""

    def call(target: Any, *args: Any, **kwargs: Any) -> Any:
        path = os.readlink(f"/proc/self/fd/{target}") if isinstance(target, int) else target
        if str(path).startswith(str(root)):
            raise OSError(code, os.strerror(code), str(path))
        return real(target, *args, **kwargs)

    return call


def test_storage_errors_are_minutely_errors() -> None:
    assert issubclass(StorageError, MinutelyError)


def test_a_missing_folder_is_made_with_its_parents_and_left_clean(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b"
    assert ensure_writable_dir(target, "run folder") == target
    assert target.is_dir()
    assert list(target.iterdir()) == []  # the probe file is gone
    assert ensure_writable_dir(target, "run folder") == target  # an existing folder is fine


def test_a_file_in_place_of_the_folder_is_named(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.write_text("data")
    with pytest.raises(
        StorageError,
        match=rf"^run folder {target}: expected a writable folder, got a file in the way \(EEXIST",
    ):
        ensure_writable_dir(target, "run folder")
    assert target.read_text() == "data"


def test_a_file_in_place_of_a_parent_folder_is_named(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("")
    target = tmp_path / "taken" / "sub" / "run"
    with pytest.raises(
        StorageError,
        match=rf"^checkpoint folder {target}: expected a writable folder, got a file where a "
        r"parent folder should be \(ENOTDIR",
    ):
        ensure_writable_dir(target, "checkpoint folder")


@pytest.mark.parametrize(
    ("code", "got"),
    [
        (errno.EROFS, r"a read-only file system \(EROFS: Read-only file system\)"),
        (errno.EACCES, r"no permission to write \(EACCES: Permission denied\)"),
        (errno.ENOSPC, r"a full file system \(ENOSPC: No space left on device\)"),
        (errno.EIO, r"an OS error \(EIO: Input/output error\)"),
    ],
)
def test_a_folder_that_cannot_be_created_names_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, got: str
) -> None:
    target = tmp_path / "new"
    monkeypatch.setattr(os, "mkdir", failing_under(target, code, os.mkdir))
    with pytest.raises(
        StorageError,
        match=rf"^registry folder {target}: expected a writable folder, got {got}",
    ):
        ensure_writable_dir(target, "registry folder")


@pytest.mark.parametrize(
    ("call", "code", "got"),
    [
        ("open", errno.EROFS, r"a read-only file system \(EROFS"),
        ("write", errno.ENOSPC, r"a full file system \(ENOSPC"),
        ("fsync", errno.EDQUOT, r"a full disk quota \(EDQUOT"),
    ],
)
def test_an_existing_folder_that_cannot_be_written_names_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: str, code: int, got: str
) -> None:
    target = tmp_path / "existing"
    target.mkdir()

    monkeypatch.setattr(os, call, failing_under(target, code, getattr(os, call)))
    with pytest.raises(
        StorageError, match=rf"^run folder {target}: expected a writable folder, got {got}"
    ):
        ensure_writable_dir(target, "run folder")
    monkeypatch.undo()
    assert list(target.iterdir()) == []  # no probe file left behind


def test_a_durable_write_that_fails_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "gone" / "f.bin"
    with pytest.raises(StorageError, match=rf"^{missing}: expected to write 3 bytes durably, got "):
        write_file_durably(missing, b"abc")

    monkeypatch.setattr(os, "fsync", failing_under(tmp_path, errno.ENOSPC, os.fsync))
    target = tmp_path / "f.bin"
    with pytest.raises(
        StorageError,
        match=rf"^{target}: expected to write 3 bytes durably, got a full file system \(ENOSPC",
    ):
        write_file_durably(target, b"abc")
    with pytest.raises(
        StorageError, match=rf"^{tmp_path}: expected to sync the folder, got a full"
    ):
        fsync_dir(tmp_path)


def test_a_failed_atomic_replace_names_the_file_and_keeps_the_old_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "pointer.json"
    target.write_bytes(b"old")

    monkeypatch.setattr(os, "replace", failing_under(tmp_path, errno.EROFS, os.replace))
    with pytest.raises(
        StorageError, match=rf"^{target}: expected to replace it atomically, got a read-only"
    ):
        replace_atomically(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["pointer.json"]


def age(path: Path, seconds: float) -> None:
    """Set the mtime of ``path`` and everything in it to ``seconds`` ago."""
    then = time.time() - seconds
    for p in [path, *path.rglob("*")]:
        os.utime(p, (then, then))


def test_only_stale_leftovers_with_the_given_prefixes_are_removed(tmp_path: Path) -> None:
    stale_tmp = tmp_path / ".tmp-crashed"
    stale_trash = tmp_path / ".trash-v00000001-x"
    fresh_tmp = tmp_path / ".tmp-in-progress"
    written_lately = tmp_path / ".tmp-slow-writer"  # an old folder with a file still growing
    other = tmp_path / "v00000001"
    for d in (stale_tmp, stale_trash, fresh_tmp, written_lately, other):
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "f").write_bytes(b"x")
    for d in (stale_tmp, stale_trash, written_lately, other):
        age(d, 3600)
    os.utime(written_lately / "sub" / "f")  # touched now
    removed = remove_stale_dirs(tmp_path, (".tmp-", ".trash-"), min_age_s=60)
    assert sorted(p.name for p in removed) == [".tmp-crashed", ".trash-v00000001-x"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".tmp-in-progress",
        ".tmp-slow-writer",
        "v00000001",
    ]


def test_stale_leftovers_of_a_missing_folder_are_nothing_to_do(tmp_path: Path) -> None:
    assert remove_stale_dirs(tmp_path / "absent", (".tmp-",), min_age_s=60) == []
