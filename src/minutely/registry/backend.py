"""Where a registry keeps its files: a local folder, or an object store reached through fsspec.

Both stores offer the same few steps to :class:`~minutely.registry.Registry`: list the complete
versions of a model, read a file (whole or a byte range), commit a new version, remove one, and
replace the rollback pointer. They differ in how a version becomes visible:

- :class:`LocalStore` writes a version into a ``.tmp-*`` folder, fsyncs it and renames it into
  place (atomic within one file system); a version folder exists whole or not at all. A prune
  renames a version to ``.trash-*`` before deleting it. Leftovers of a crashed writer are
  removed once nothing in them changed for ``STALE_LEFTOVER_S`` seconds.
- :class:`FsspecStore` (``s3://bucket/prefix``, ``memory://...``, any fsspec URL) has no rename:
  a version is complete iff its ``manifest.json`` exists, and that object is written last (data
  files, then ``manifest.sig``, then ``manifest.json``) and deleted first. Each object is
  replaced whole by one request. One publisher per model: two writers racing for the same
  version number are not detected on an object store.

A missing file is a :class:`FileNotFoundError`, another failure to read an :class:`OSError`
(what a caller may retry); a failed write is a :class:`~minutely.errors.StorageError` naming
the path.
"""

from __future__ import annotations

import abc
import errno
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from minutely.errors import StorageError
from minutely.fsutil import (
    describe_os_error,
    ensure_writable_dir,
    fsync_dir,
    place_file_durably,
    remove_stale_dirs,
    replace_atomically,
    write_file_durably,
)
from minutely.registry.manifest import MANIFEST_FILE, is_version, parse_version

logger = logging.getLogger(__name__)

_MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_LEFTOVER_PREFIXES = (".tmp-", ".trash-")
_MAX_PUBLISH_RACES = 1_000
STALE_LEFTOVER_S = 60.0  # far longer than any pause between two writes of a live publish

# The files of a version once its number is known (signature, then manifest: written last).
Finisher = Callable[[str], Mapping[str, bytes]]

# A file of a version: its bytes, or a local file holding them (streamed or linked, never read
# into memory whole: a received version may be larger than the memory a server can spare).
FileSource = bytes | Path


class Store(abc.ABC):
    """The operations a registry needs from where it keeps its files (see the module)."""

    location: str  # the folder or URL, as messages name it

    def describe(self, model: str, version: str | None = None, name: str | None = None) -> str:
        """The path or URL of a model folder, a version folder or a file, for messages."""
        parts = [self.location, model]
        if version is not None:
            parts.append(version)
        if name is not None:
            parts.append(name)
        return "/".join(parts)

    @abc.abstractmethod
    def versions(self, model: str) -> list[str]:
        """The complete versions of ``model``, oldest first."""

    @abc.abstractmethod
    def read(self, model: str, version: str | None, name: str) -> bytes:
        """A whole file of a version (``version`` ``None``: a file of the model folder)."""

    @abc.abstractmethod
    def read_range(self, model: str, version: str, name: str, start: int, length: int) -> bytes:
        """``length`` bytes of a file from ``start`` (fewer at its end)."""

    @abc.abstractmethod
    def commit(
        self, model: str, version: str | None, files: Mapping[str, FileSource], finish: Finisher
    ) -> str | None:
        """Add a version: ``files``, then ``finish(version)``'s files in their order.

        ``version`` ``None`` takes the next free number (trying the following ones when a
        concurrent publisher takes it first); the version committed is returned. A given
        ``version`` that already exists is left as it is and ``None`` returned.
        """

    @abc.abstractmethod
    def remove(self, model: str, version: str) -> bool:
        """Delete a version (invisible first, then its files); ``False`` if it was gone."""

    @abc.abstractmethod
    def write_pointer(self, model: str, name: str, data: bytes, *, create: bool) -> None:
        """Replace file ``name`` of the model folder whole (``create`` ``False``: only if the
        model folder, or the file, exists already)."""

    @abc.abstractmethod
    def sweep(self, model: str) -> None:
        """Remove what crashed writers left in the model folder (best effort)."""


class LocalStore(Store):
    """A registry folder on a local (or mounted) file system; see the module."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.location = str(self.root)
        self._writable: set[str] = set()  # model folders proven writable by this instance
        try:
            models = [p for p in self.root.iterdir() if _MODEL_RE.match(p.name) and p.is_dir()]
        except OSError:
            models = []  # no registry yet (or not a folder: a publish will say so)
        for mdir in models:
            remove_stale_dirs(mdir, _LEFTOVER_PREFIXES, min_age_s=STALE_LEFTOVER_S)

    def versions(self, model: str) -> list[str]:
        try:
            names = os.listdir(self.root / model)
        except FileNotFoundError:
            return []
        return sorted((n for n in names if is_version(n)), key=parse_version)

    def read(self, model: str, version: str | None, name: str) -> bytes:
        return self._path(model, version, name).read_bytes()

    def read_range(self, model: str, version: str, name: str, start: int, length: int) -> bytes:
        with open(self._path(model, version, name), "rb") as f:
            f.seek(start)
            return f.read(length)

    def commit(
        self, model: str, version: str | None, files: Mapping[str, FileSource], finish: Finisher
    ) -> str | None:
        mdir = self.root / model
        if model not in self._writable:
            ensure_writable_dir(mdir, f"registry folder of {model!r}")
            self._writable.add(model)
        remove_stale_dirs(mdir, _LEFTOVER_PREFIXES, min_age_s=STALE_LEFTOVER_S)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=mdir))
        except OSError as exc:
            raise StorageError(
                f"registry folder of {model!r} {mdir}: expected a writable folder, got "
                f"{describe_os_error(exc)}"
            ) from exc
        try:
            for name, source in files.items():
                if isinstance(source, Path):
                    place_file_durably(source, tmp / name)
                else:
                    write_file_durably(tmp / name, source)
            for _ in range(_MAX_PUBLISH_RACES):
                target = version if version is not None else self._next(model)
                for name, data in finish(target).items():
                    write_file_durably(tmp / name, data)
                fsync_dir(tmp)
                try:
                    # rename (not replace): it fails if a concurrent writer took the name.
                    os.rename(tmp, mdir / target)
                except OSError as exc:
                    if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                        if version is not None:
                            return None
                        continue
                    raise StorageError(
                        f"{mdir / target}: expected to rename {tmp.name} into place, got "
                        f"{describe_os_error(exc)}"
                    ) from exc
                fsync_dir(mdir)
                return target
            raise StorageError(
                f"registry folder of {model!r} {mdir}: expected a free version number, got "
                f"{_MAX_PUBLISH_RACES} collisions with concurrent publishers"
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def remove(self, model: str, version: str) -> bool:
        mdir = self.root / model
        trash = mdir / f".trash-{version}-{uuid.uuid4().hex}"
        try:
            os.rename(mdir / version, trash)
        except FileNotFoundError:
            return False  # removed by a concurrent prune
        except OSError as exc:
            raise StorageError(
                f"{mdir / version}: expected to move it to {trash.name} for removal, got "
                f"{describe_os_error(exc)}"
            ) from exc
        shutil.rmtree(trash, ignore_errors=True)
        fsync_dir(mdir)
        return True

    def write_pointer(self, model: str, name: str, data: bytes, *, create: bool) -> None:
        path = self.root / model / name
        if create or path.parent.is_dir():
            replace_atomically(path, data)

    def sweep(self, model: str) -> None:
        remove_stale_dirs(self.root / model, _LEFTOVER_PREFIXES, min_age_s=STALE_LEFTOVER_S)

    def _path(self, model: str, version: str | None, name: str) -> Path:
        mdir = self.root / model
        return mdir / name if version is None else mdir / version / name

    def _next(self, model: str) -> str:
        versions = self.versions(model)
        return f"v{(parse_version(versions[-1]) + 1 if versions else 1):08d}"


class FsspecStore(Store):
    """A registry under an fsspec URL (``s3://bucket/prefix``); see the module."""

    def __init__(self, url: str, storage_options: Mapping[str, Any]) -> None:
        import fsspec.core  # only object-store registries need it

        self.location = url.rstrip("/")
        options = dict(storage_options)
        # A cached listing would hide a version published after it was made (s3fs keeps
        # answering "no such file" for its manifest): a registry is read to see what is new.
        options.setdefault("use_listings_cache", False)
        try:
            fs, path = fsspec.core.url_to_fs(self.location, **options)
        except (ImportError, ValueError, TypeError) as exc:
            raise StorageError(
                f"registry {self.location}: expected a local folder or a URL of a file system "
                f"fsspec can open (s3://, memory://, ...), got {type(exc).__name__}: {exc}"
            ) from exc
        self.fs: Any = fs
        self.base = str(path).rstrip("/")

    def versions(self, model: str) -> list[str]:
        complete, _ = self._scan(model)
        return sorted(complete, key=parse_version)

    def read(self, model: str, version: str | None, name: str) -> bytes:
        path = self._path(model, version, name)
        try:
            data = self.fs.cat_file(path)
        except OSError:
            raise
        except Exception as exc:  # a client library's own error: a read that may be retried
            raise OSError(f"{self._url(path)}: {type(exc).__name__}: {exc}") from exc
        return bytes(data)

    def read_range(self, model: str, version: str, name: str, start: int, length: int) -> bytes:
        path = self._path(model, version, name)
        if length == 0:
            if not self._exists(path):  # a missing file is still an error
                raise FileNotFoundError(errno.ENOENT, "no such file", self._url(path))
            return b""
        try:
            data = self.fs.cat_file(path, start=start, end=start + length)
        except OSError as exc:
            # S3 answers a range that starts at or past the end with an error, not with nothing.
            if exc.errno == errno.EINVAL and start >= self._size(path):
                return b""
            raise
        except Exception as exc:
            raise OSError(f"{self._url(path)}: {type(exc).__name__}: {exc}") from exc
        return bytes(data)

    def commit(
        self, model: str, version: str | None, files: Mapping[str, FileSource], finish: Finisher
    ) -> str | None:
        if version is not None:
            if self._exists(self._path(model, version, MANIFEST_FILE)):
                return None
            target = version
        else:
            complete, folders = self._scan(model)
            numbers = [parse_version(v) for v in complete]
            target = f"v{max(numbers, default=0) + 1:08d}"
            if target in folders:
                self._remove_files(model, target)  # what a crashed publish left there
        for name, data in files.items():
            self._put(self._path(model, target, name), data)
        for name, data in finish(target).items():  # the manifest comes last
            self._put(self._path(model, target, name), data)
        return target

    def remove(self, model: str, version: str) -> bool:
        manifest = self._path(model, version, MANIFEST_FILE)
        if not self._exists(manifest):
            return False
        try:
            self.fs.rm_file(manifest)  # invisible from here on
        except FileNotFoundError:
            return False
        except Exception as exc:
            raise StorageError(
                f"{self._url(manifest)}: expected to delete it, got {type(exc).__name__}: {exc}"
            ) from exc
        self._remove_files(model, version)
        return True

    def write_pointer(self, model: str, name: str, data: bytes, *, create: bool) -> None:
        path = self._path(model, None, name)
        if create or self._exists(path):
            self._put(path, data)

    def sweep(self, model: str) -> None:
        """Delete version folders without a manifest numbered below the newest complete one
        (a crashed publish or prune: a live publish only writes above the newest)."""
        complete, folders = self._scan(model)
        if not complete:
            return
        newest = max(parse_version(v) for v in complete)
        for version in folders - complete:
            if parse_version(version) < newest:
                logger.info("removing %s (no manifest: a crashed writer's leftover)", version)
                self._remove_files(model, version)

    def _scan(self, model: str) -> tuple[set[str], set[str]]:
        """(versions with a manifest, every version folder) of a model, listed afresh."""
        mpath = f"{self.base}/{model}"
        self.fs.invalidate_cache(mpath)
        try:
            paths = self.fs.find(mpath)
        except FileNotFoundError:
            return set(), set()
        except OSError:
            raise
        except Exception as exc:
            raise OSError(f"{self._url(mpath)}: {type(exc).__name__}: {exc}") from exc
        complete: set[str] = set()
        folders: set[str] = set()
        prefix = mpath.rstrip("/") + "/"
        for p in paths:
            rel = str(p)[len(prefix) :] if str(p).startswith(prefix) else ""
            parts = rel.split("/")
            if len(parts) == 2 and is_version(parts[0]):
                folders.add(parts[0])
                if parts[1] == MANIFEST_FILE:
                    complete.add(parts[0])
        return complete, folders

    def _remove_files(self, model: str, version: str) -> None:
        folder = self._path(model, version, None)
        try:
            self.fs.rm(folder, recursive=True)
        except FileNotFoundError:
            pass
        except Exception as exc:
            raise StorageError(
                f"{self._url(folder)}: expected to delete the files of {version}, got "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def _put(self, path: str, source: FileSource) -> None:
        try:
            if isinstance(source, Path):
                self.fs.put_file(str(source), path)  # streamed (multipart on S3)
            else:
                self.fs.pipe_file(path, source)
        except Exception as exc:
            what = f"{source}" if isinstance(source, Path) else f"{len(source)} bytes"
            raise StorageError(
                f"{self._url(path)}: expected to write {what}, got {type(exc).__name__}: {exc}"
            ) from exc

    def _size(self, path: str) -> int:
        self.fs.invalidate_cache(path)
        return int(self.fs.info(path)["size"])

    def _exists(self, path: str) -> bool:
        self.fs.invalidate_cache(path)  # a listing cached earlier may be stale
        try:
            self.fs.info(path)
        except FileNotFoundError:
            return False
        except OSError:
            raise
        except Exception as exc:
            raise OSError(f"{self._url(path)}: {type(exc).__name__}: {exc}") from exc
        return True

    def _path(self, model: str, version: str | None, name: str | None) -> str:
        parts = [self.base, model]
        if version is not None:
            parts.append(version)
        if name is not None:
            parts.append(name)
        return "/".join(parts)

    def _url(self, path: str) -> str:
        return self.location + path[len(self.base) :]


def open_store(root: Path | str, storage_options: Mapping[str, Any] | None) -> Store:
    """A :class:`LocalStore` for a path (``file://`` too), else an :class:`FsspecStore`."""
    if isinstance(root, str) and "://" in root and not root.startswith("file://"):
        return FsspecStore(root, storage_options or {})
    if storage_options:
        raise StorageError(
            f"registry {root}: expected storage_options only with an object-store URL, got "
            f"{sorted(storage_options)} for a local folder"
        )
    path = root[len("file://") :] if isinstance(root, str) and root.startswith("file://") else root
    return LocalStore(Path(path))
