"""Durable, atomic file-system steps the registry, the checkpoints and the run folders use.

A reader must never see a half-written file or version: content goes to a temporary name in the
same directory, is fsynced, then renamed into place (rename is atomic within one file system),
and the directory is fsynced so the rename itself survives a crash.

Every folder minutely writes into is prepared by :func:`ensure_writable_dir`, and every write
here turns an ``OSError`` into a :class:`~minutely.errors.StorageError` that names the path and
the reason (a file in the way, a read-only or full file system, no permission).
:func:`remove_stale_dirs` clears what a crashed writer left behind.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

from minutely.errors import StorageError

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20

# What each errno means for a folder or file minutely wants to write.
_GOT = {
    errno.EEXIST: "a file in the way",
    errno.ENOTDIR: "a file where a parent folder should be",
    errno.EROFS: "a read-only file system",
    errno.ENOSPC: "a full file system",
    errno.EDQUOT: "a full disk quota",
    errno.EACCES: "no permission to write",
    errno.EPERM: "no permission to write",
}


def describe_os_error(exc: OSError) -> str:
    """What went wrong, for a message: ``'a read-only file system (EROFS: Read-only ...)'``.

    >>> describe_os_error(OSError(errno.ENOSPC, "No space left on device"))
    'a full file system (ENOSPC: No space left on device)'
    """
    got = _GOT.get(exc.errno or 0, "an OS error")
    code = errno.errorcode.get(exc.errno or 0)
    detail = f"{code}: {exc.strerror}" if code and exc.strerror else str(exc)
    return f"{got} ({detail})"


def ensure_writable_dir(path: Path, what: str) -> Path:
    """Create folder ``path`` with its parents and prove a file can be written and synced there.

    ``what`` names the folder's role in the error (``"run folder"``): a :class:`StorageError`
    ``"<what> <path>: expected a writable folder, got <reason>"``. The probe file is removed.
    Checking at start turns a read-only or full file system into one clear error instead of a
    traceback halfway through a run.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe-{uuid.uuid4().hex}"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"minutely")
            os.fsync(fd)  # a full file system may only show when the data is flushed
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
    except OSError as exc:
        raise StorageError(
            f"{what} {path}: expected a writable folder, got {describe_os_error(exc)}"
        ) from exc
    return path


def fsync_file(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise StorageError(
            f"{path}: expected to sync the file, got {describe_os_error(exc)}"
        ) from exc


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise StorageError(
            f"{path}: expected to sync the folder, got {describe_os_error(exc)}"
        ) from exc


def write_file_durably(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` and fsync it (the caller makes it visible atomically)."""
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise StorageError(
            f"{path}: expected to write {len(data)} bytes durably, got {describe_os_error(exc)}"
        ) from exc


def place_file_durably(src: Path, dst: Path) -> None:
    """Make ``dst`` a durable copy of the file ``src``: a hard link when both are on one file
    system (no bytes copied), else a streamed copy; ``src`` itself is left in place."""
    try:
        try:
            os.link(src, dst)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
            shutil.copyfile(src, dst)
        fsync_file(dst)
    except OSError as exc:
        raise StorageError(
            f"{dst}: expected a copy of {src}, got {describe_os_error(exc)}"
        ) from exc


def replace_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: readers see the old content or the new, never a mix."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write_file_durably(tmp, data)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StorageError(
            f"{path}: expected to replace it atomically, got {describe_os_error(exc)}"
        ) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def remove_stale_dirs(parent: Path, prefixes: Iterable[str], *, min_age_s: float) -> list[Path]:
    """Remove folders in ``parent`` whose name starts with one of ``prefixes`` and in which
    nothing changed for ``min_age_s`` seconds; return those removed.

    These are the temporary and trash folders of a writer that crashed. Age is the newest
    modification time of the folder or anything in it, so a live writer's folder (its files
    still growing) is never touched. Removal is best effort: a folder that cannot be removed
    (a read-only mount opened by a reader) is logged and left.
    """
    prefixes = tuple(prefixes)
    try:
        entries = list(os.scandir(parent))
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        logger.warning("cannot list %s for stale leftovers: %s", parent, describe_os_error(exc))
        return []
    cutoff = time.time() - min_age_s
    removed: list[Path] = []
    for entry in entries:
        if not entry.name.startswith(prefixes) or not entry.is_dir(follow_symlinks=False):
            continue
        path = Path(entry.path)
        if _changed_since(path, cutoff):
            continue
        try:
            shutil.rmtree(path)
        except FileNotFoundError:
            continue  # removed by another process meanwhile
        except OSError as exc:
            logger.warning("cannot remove stale %s: %s", path, describe_os_error(exc))
            continue
        logger.info("removed stale %s (a crashed writer's leftover)", path)
        removed.append(path)
    return removed


def _changed_since(folder: Path, cutoff: float) -> bool:
    """Whether ``folder`` or anything in it was modified after ``cutoff`` (epoch seconds)."""
    try:
        if folder.lstat().st_mtime > cutoff:
            return True
        for root, dirs, files in os.walk(folder):
            for name in (*dirs, *files):
                if os.lstat(os.path.join(root, name)).st_mtime > cutoff:
                    return True
    except OSError:
        return True  # changing under us: in use
    return False


def sha256_file(path: Path) -> tuple[str, int]:
    """The hex sha256 digest and the size in bytes of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size
