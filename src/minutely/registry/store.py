"""A file-system registry of versioned model artifacts with a rollback pointer.

Layout under the root::

    <root>/<model>/v00000001/weights.safetensors
    <root>/<model>/v00000001/manifest.json
    <root>/<model>/serving.json       rollback pointer: {"pinned": "v00000001"} or {"pinned": null}
    <root>/<model>/.tmp-*, .trash-*   a publish or prune in progress, or one that crashed (ignored)

A version is written into a temporary directory, fsynced and renamed into place, so a reader
sees a complete version or none. Version numbers only grow; two publishers racing for the same
number both succeed, one of them with the next number.

A crashed publish or prune leaves a ``.tmp-*`` or ``.trash-*`` folder. Opening a registry, and
every publish and prune, removes those in which nothing changed for ``STALE_LEFTOVER_S``
seconds: a concurrent publisher's folder is younger (its files are being written), so it is
never touched. Removal is best effort, so a server that only reads (perhaps from a read-only
mount) opens the registry all the same. A folder that cannot be written fails a publish with a
:class:`~minutely.errors.StorageError` naming it.

>>> import tempfile, torch
>>> from minutely.schema import default_schema
>>> reg = Registry(Path(tempfile.mkdtemp()))
>>> m = reg.publish("ctr", {"w": torch.zeros(2)}, created_ms=1_000, arch="lr",
...                 model_config={"arch": "lr"}, schema=default_schema(),
...                 metrics={"auc": 0.7}, samples_seen=100)
>>> m.version, reg.serving_version("ctr")
('v00000001', 'v00000001')
>>> _, tensors = reg.load("ctr", m.version, expected_fingerprint=default_schema().fingerprint())
>>> tensors["w"].tolist()
[0.0, 0.0]
"""

from __future__ import annotations

import errno
import hashlib
import logging
import math
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec
import safetensors
import safetensors.torch
import torch

from minutely.errors import (
    ArtifactError,
    ChecksumMismatchError,
    SchemaError,
    SchemaMismatchError,
    StorageError,
)
from minutely.fsutil import (
    describe_os_error,
    ensure_writable_dir,
    fsync_dir,
    fsync_file,
    remove_stale_dirs,
    replace_atomically,
    sha256_file,
    write_file_durably,
)
from minutely.registry.manifest import (
    MANIFEST_FILE,
    MANIFEST_VERSION,
    WEIGHTS_FILE,
    FileEntry,
    Manifest,
    format_version,
    is_version,
    parse_version,
)
from minutely.schema import Schema

logger = logging.getLogger(__name__)

POINTER_FILE = "serving.json"
_MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_PLAIN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_MAX_PUBLISH_RACES = 1_000
_ENCODER = msgspec.json.Encoder()
_LEFTOVER_PREFIXES = (".tmp-", ".trash-")
STALE_LEFTOVER_S = 60.0  # far longer than any pause between two writes of a live publish


class _Pointer(msgspec.Struct, forbid_unknown_fields=True):
    pinned: str | None


class Registry:
    """Versioned artifacts of any number of models under ``root`` (created on first publish)."""

    def __init__(self, root: Path | str) -> None:
        self._root = Path(root)
        self._writable: set[str] = set()  # model folders proven writable by this instance
        try:
            models = [p for p in self._root.iterdir() if _MODEL_RE.match(p.name) and p.is_dir()]
        except OSError:
            models = []  # no registry yet (or not a folder: a publish will say so)
        for mdir in models:
            remove_stale_dirs(mdir, _LEFTOVER_PREFIXES, min_age_s=STALE_LEFTOVER_S)

    @property
    def root(self) -> Path:
        return self._root

    # --- writing ------------------------------------------------------------------------------

    def publish(
        self,
        model: str,
        tensors: Mapping[str, torch.Tensor],
        *,
        created_ms: int,
        arch: str,
        model_config: Mapping[str, Any],
        schema: Schema,
        metrics: Mapping[str, float],
        samples_seen: int,
        parent: str | None = None,
        base: str | None = None,
        mode: str | None = None,
        warm_start: bool = False,
        resume: Mapping[str, bytes] | None = None,
        resume_positions: Mapping[int, int] | None = None,
    ) -> Manifest:
        """Write a new version of ``model`` atomically and return its manifest.

        ``created_ms`` is the event time the weights reflect; ``parent`` and ``base`` name the
        versions it descends from. Metrics must be finite (JSON has no NaN). ``mode`` names the
        trainer mode that produced it and ``warm_start`` marks a version online training restarts
        from; ``resume`` (file name -> bytes) is the trainer state that continues it, written
        beside the weights and read only by :meth:`load_resume`, with ``resume_positions`` the
        samples stream positions that state covers.
        """
        mdir = self._model_dir(model)
        for what, ref in (("parent", parent), ("base", base)):
            if ref is not None and not is_version(ref):
                raise ArtifactError(f"publish {model!r}: {what}: expected a version, got {ref!r}")
        if samples_seen < 0:
            raise ArtifactError(
                f"publish {model!r}: samples_seen: expected >= 0, got {samples_seen}"
            )
        clean_metrics = _finite_metrics(model, metrics)
        try:
            # Through JSON and back, so the returned manifest equals the one read later.
            config_doc = msgspec.json.decode(_ENCODER.encode(dict(model_config)))
        except TypeError as exc:
            raise ArtifactError(
                f"publish {model!r}: model_config: expected JSON-serializable values ({exc})"
            ) from exc
        prepared = _prepare_tensors(model, tensors)
        resume_blobs = dict(resume or {})
        for name in resume_blobs:
            if name in (WEIGHTS_FILE, MANIFEST_FILE) or not _PLAIN_NAME_RE.match(name):
                raise ArtifactError(
                    f"publish {model!r}: resume: expected plain file names other than "
                    f"{WEIGHTS_FILE} and {MANIFEST_FILE}, got {name!r}"
                )

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
            weights = tmp / WEIGHTS_FILE
            try:
                safetensors.torch.save_file(prepared, str(weights))
            except (OSError, safetensors.SafetensorError) as exc:
                raise StorageError(f"{weights}: expected to write the weights, got {exc}") from exc
            fsync_file(weights)
            digest, size = sha256_file(weights)
            resume_entries: dict[str, FileEntry] = {}
            for name, blob in resume_blobs.items():
                write_file_durably(tmp / name, blob)
                resume_entries[name] = FileEntry(
                    sha256=hashlib.sha256(blob).hexdigest(), bytes=len(blob)
                )
            for _ in range(_MAX_PUBLISH_RACES):
                version = format_version(self._next_number(model))
                manifest = Manifest(
                    manifest_version=MANIFEST_VERSION,
                    model=model,
                    version=version,
                    parent=parent,
                    base=base,
                    created_ms=int(created_ms),
                    arch=arch,
                    model_config=config_doc,
                    feature_schema=schema.to_dict(),
                    schema_fingerprint=schema.fingerprint(),
                    metrics=clean_metrics,
                    samples_seen=int(samples_seen),
                    files={WEIGHTS_FILE: FileEntry(sha256=digest, bytes=size)},
                    mode=mode,
                    warm_start=warm_start,
                    resume=resume_entries,
                    resume_positions={str(p): int(o) for p, o in (resume_positions or {}).items()},
                )
                write_file_durably(tmp / MANIFEST_FILE, manifest.to_json())
                fsync_dir(tmp)
                try:
                    # rename (not replace): it fails if a concurrent publisher took the name.
                    os.rename(tmp, mdir / version)
                except OSError as exc:
                    if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                        continue
                    raise StorageError(
                        f"{mdir / version}: expected to rename {tmp.name} into place, got "
                        f"{describe_os_error(exc)}"
                    ) from exc
                fsync_dir(mdir)
                logger.info("published %s/%s (%d bytes)", model, version, size)
                return manifest
            raise ArtifactError(
                f"publish {model!r}: expected a free version number, got "
                f"{_MAX_PUBLISH_RACES} collisions with concurrent publishers"
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def pin(self, model: str, version: str) -> None:
        """Serve ``version`` of ``model`` instead of the latest (the rollback pointer)."""
        self.manifest(model, version)  # refuse to pin what could not be served
        replace_atomically(self._pointer_path(model), msgspec.json.encode(_Pointer(version)))
        logger.info("pinned %s to %s", model, version)

    def unpin(self, model: str) -> None:
        """Serve the latest version of ``model`` again."""
        path = self._pointer_path(model)
        if path.parent.is_dir():
            replace_atomically(path, msgspec.json.encode(_Pointer(None)))
        logger.info("unpinned %s", model)

    def prune(self, model: str, *, keep: int) -> list[str]:
        """Delete all but the newest ``keep`` versions of ``model``; the removed versions.

        The pinned version and the ``base`` of every kept version are kept too (rollback
        targets). A version disappears atomically (renamed away, then deleted), so a reader
        sees it whole or not at all.
        """
        if keep < 1:
            raise ArtifactError(f"prune {model!r}: keep: expected an int >= 1, got {keep}")
        versions = self.versions(model)
        kept = set(versions[-keep:])
        pinned = self.pinned(model)
        if pinned is not None:
            kept.add(pinned)
        for version in versions[-keep:]:
            try:
                base = self.manifest(model, version).base
            except ArtifactError:
                continue
            if base is not None:
                kept.add(base)
        mdir = self._model_dir(model)
        remove_stale_dirs(mdir, _LEFTOVER_PREFIXES, min_age_s=STALE_LEFTOVER_S)
        removed: list[str] = []
        for version in versions:
            if version in kept:
                continue
            trash = mdir / f".trash-{version}-{uuid.uuid4().hex}"
            try:
                os.rename(mdir / version, trash)
            except FileNotFoundError:
                continue  # removed by a concurrent prune
            except OSError as exc:
                raise StorageError(
                    f"{mdir / version}: expected to move it to {trash.name} for removal, got "
                    f"{describe_os_error(exc)}"
                ) from exc
            shutil.rmtree(trash, ignore_errors=True)
            removed.append(version)
        if removed:
            fsync_dir(mdir)
            logger.info("pruned %s: removed %d versions", model, len(removed))
        return removed

    # --- reading ------------------------------------------------------------------------------

    def versions(self, model: str) -> list[str]:
        """The published versions of ``model``, oldest first (in-progress publishes excluded)."""
        mdir = self._model_dir(model)
        try:
            names = os.listdir(mdir)
        except FileNotFoundError:
            return []
        return sorted((n for n in names if is_version(n)), key=parse_version)

    def manifest(self, model: str, version: str) -> Manifest:
        """The manifest of one version; :class:`ArtifactError` naming the file if unusable."""
        path = self._version_dir(model, version) / MANIFEST_FILE
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise ArtifactError(f"{path}: expected a manifest, got no such file") from exc
        manifest = Manifest.from_json(data, source=str(path))
        if manifest.model != model or manifest.version != version:
            raise ArtifactError(
                f"{path}: expected model {model!r} version {version!r}, "
                f"got model {manifest.model!r} version {manifest.version!r}"
            )
        return manifest

    def latest(self, model: str) -> Manifest | None:
        """The manifest of the newest version whose manifest is valid, or ``None``."""
        for version in reversed(self.versions(model)):
            try:
                return self.manifest(model, version)
            except ArtifactError as exc:
                logger.debug("skipping %s/%s: %s", model, version, exc)
        return None

    def pinned(self, model: str) -> str | None:
        """The pinned version of ``model``, or ``None`` when it follows the latest."""
        path = self._pointer_path(model)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            pointer = msgspec.json.decode(data, type=_Pointer)
        except msgspec.DecodeError as exc:
            raise ArtifactError(
                f'{path}: expected {{"pinned": <version or null>}}, got {data[:80]!r} ({exc})'
            ) from exc
        if pointer.pinned is not None and not is_version(pointer.pinned):
            raise ArtifactError(f"{path}: pinned: expected a version, got {pointer.pinned!r}")
        return pointer.pinned

    def serving_version(self, model: str) -> str | None:
        """The version servers should serve: the pinned one, else the latest, else ``None``."""
        pinned = self.pinned(model)
        if pinned is not None:
            return pinned
        latest = self.latest(model)
        return None if latest is None else latest.version

    def load(
        self, model: str, version: str, *, expected_fingerprint: str | None
    ) -> tuple[Manifest, dict[str, torch.Tensor]]:
        """Verify and load one version: manifest, schema fingerprint, file sizes and sha256.

        The weights are read once, hashed, and the verified bytes are what is deserialized
        (safetensors: no code runs on load), so a file changed after the check cannot slip in.
        ``expected_fingerprint`` of ``None`` skips the comparison with the caller's schema.
        """
        vdir = self._version_dir(model, version)
        manifest = self.manifest(model, version)
        _check_schema(manifest, vdir / MANIFEST_FILE, expected_fingerprint)
        if WEIGHTS_FILE not in manifest.files:
            raise ArtifactError(
                f"{vdir / MANIFEST_FILE}: files: expected an entry for {WEIGHTS_FILE!r}, "
                f"got {sorted(manifest.files)}"
            )
        blobs: dict[str, bytes] = {}
        for name, entry in manifest.files.items():
            if "/" in name or name in (".", "..", MANIFEST_FILE):
                raise ArtifactError(
                    f"{vdir / MANIFEST_FILE}: files: expected plain file names, got {name!r}"
                )
            blobs[name] = _read_verified(vdir / name, entry)
        try:
            tensors = safetensors.torch.load(blobs[WEIGHTS_FILE])
        except safetensors.SafetensorError as exc:
            raise ArtifactError(
                f"{vdir / WEIGHTS_FILE}: expected safetensors data, got an unreadable file ({exc})"
            ) from exc
        return manifest, tensors

    def load_resume(self, model: str, version: str) -> tuple[Manifest, dict[str, bytes]]:
        """The verified ``resume`` files of one version (the trainer state that continues it);
        :class:`ArtifactError` when the version has none."""
        vdir = self._version_dir(model, version)
        manifest = self.manifest(model, version)
        if not manifest.resume:
            raise ArtifactError(
                f"{vdir / MANIFEST_FILE}: resume: expected the trainer state that continues "
                f"{model} {version}, got none (only warm-start versions carry one)"
            )
        blobs: dict[str, bytes] = {}
        for name, entry in manifest.resume.items():
            if not _PLAIN_NAME_RE.match(name) or name in (WEIGHTS_FILE, MANIFEST_FILE):
                raise ArtifactError(
                    f"{vdir / MANIFEST_FILE}: resume: expected plain file names, got {name!r}"
                )
            blobs[name] = _read_verified(vdir / name, entry)
        return manifest, blobs

    def warm_start_versions(self, model: str) -> list[str]:
        """The versions of ``model`` marked ``warm_start``, oldest first (unreadable skipped)."""
        out = []
        for version in self.versions(model):
            try:
                if self.manifest(model, version).warm_start:
                    out.append(version)
            except ArtifactError:
                continue
        return out

    # --- paths --------------------------------------------------------------------------------

    def _model_dir(self, model: str) -> Path:
        return self._root / check_model_name(model)

    def _version_dir(self, model: str, version: str) -> Path:
        parse_version(version)
        return self._model_dir(model) / version

    def _pointer_path(self, model: str) -> Path:
        return self._model_dir(model) / POINTER_FILE

    def _next_number(self, model: str) -> int:
        versions = self.versions(model)
        return parse_version(versions[-1]) + 1 if versions else 1


def check_model_name(model: str) -> str:
    """``model`` if it is usable as a directory name, else :class:`ArtifactError`.

    >>> check_model_name("ctr.v2")
    'ctr.v2'
    """
    if not _MODEL_RE.match(model):
        raise ArtifactError(
            f"model name: expected letters, digits, '_', '.' or '-' (not starting with "
            f"'.', '_' or '-'), got {model!r}"
        )
    return model


def _finite_metrics(model: str, metrics: Mapping[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, value in metrics.items():
        v = float(value)
        if not math.isfinite(v):
            raise ArtifactError(
                f"publish {model!r}: metrics[{name!r}]: expected a finite float, got {value!r}"
            )
        out[str(name)] = v
    return out


def _prepare_tensors(model: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, and no two entries sharing memory (what safetensors can store)."""
    out: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ArtifactError(
                f"publish {model!r}: tensors[{name!r}]: expected a torch.Tensor, "
                f"got {type(t).__name__}"
            )
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr != 0 and ptr in storages:
            t = t.clone()  # tied weights: stored twice, restored by load_state_dict
            ptr = t.untyped_storage().data_ptr()
        storages.add(ptr)
        out[name] = t
    return out


def _check_schema(manifest: Manifest, path: Path, expected: str | None) -> None:
    try:
        actual = Schema.from_dict(manifest.feature_schema).fingerprint()
    except SchemaError as exc:
        raise SchemaMismatchError(f"{path}: feature_schema: {exc}") from exc
    if actual != manifest.schema_fingerprint:
        raise SchemaMismatchError(
            f"{path}: schema_fingerprint {manifest.schema_fingerprint!r} does not match its "
            f"feature_schema, which fingerprints to {actual!r}"
        )
    if expected is not None and manifest.schema_fingerprint != expected:
        raise SchemaMismatchError(
            f"{path}: expected schema fingerprint {expected!r}, got {manifest.schema_fingerprint!r}"
        )


def _read_verified(path: Path, entry: FileEntry) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise ArtifactError(f"{path}: listed in the manifest, got no such file") from exc
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != entry.bytes:
        raise ChecksumMismatchError(
            f"{path}: expected {entry.bytes} bytes with sha256 {entry.sha256}, "
            f"got {len(data)} bytes with sha256 {digest}"
        )
    if digest != entry.sha256:
        raise ChecksumMismatchError(f"{path}: expected sha256 {entry.sha256}, got {digest}")
    return data
