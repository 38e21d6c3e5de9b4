"""Atomic checkpoints: weights, optimizer states, counters and the caller's state, as one unit.

Layout of a checkpoint directory::

    <directory>/LATEST               the name of the newest complete checkpoint: the commit point
    <directory>/ckpt-00000007/
        model.safetensors            model weights (the model's flat state dict)
        optim.sparse.pt              SparseAdam state (torch.save; read with weights_only=True)
        optim.dense.pt               Adam state
        trainer.json                 the trainer's counters
        extra.<name>                 the caller's opaque blobs (log offsets, join state, ...)
        manifest.json                written last: sha256 and size of every file above
    <directory>/.tmp-ckpt-*          a save in progress, or one that crashed (ignored; removed
                                     by the next save, and by a load once a minute old)

A save writes and fsyncs every file in a temporary directory, renames it to ``ckpt-<seq>``, and
only then replaces ``LATEST`` (``os.replace``): a crash at any point leaves ``LATEST`` naming a
complete checkpoint. One process writes to a directory at a time. The last ``keep`` checkpoints
are kept, so a restore has older ones to fall back on.

:func:`load_latest_checkpoint` verifies a checkpoint's manifest and the sha256 of every file
before it uses it. When the newest committed checkpoint is damaged (a file missing or changed,
a truncated manifest, ``LATEST`` naming a folder that is gone or garbled) it logs a warning on
the ``minutely.checkpoint`` logger and restores the newest older one that verifies; it raises
:class:`~minutely.errors.CheckpointError` naming the directory only when none does. A
checkpoint that verifies but does not fit the model is refused, never skipped: that is a
configuration mistake, not damage.

>>> import tempfile, torch
>>> from pathlib import Path
>>> from minutely.config import ModelConfig, TrainConfig
>>> from minutely.model import build_model
>>> from minutely.schema import default_schema
>>> from minutely.train import Trainer
>>> model = build_model(ModelConfig(arch="lr", buckets=64), default_schema())
>>> trainer = Trainer(model, TrainConfig())
>>> root = Path(tempfile.mkdtemp())
>>> save_checkpoint(root, model, trainer, {"offsets": b"{}"}).name
'ckpt-00000001'
>>> load_latest_checkpoint(root, model, trainer)
{'offsets': b'{}'}
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor

from minutely.errors import CheckpointError, SchemaMismatchError
from minutely.fsutil import ensure_writable_dir, fsync_dir, remove_stale_dirs, write_file_durably
from minutely.model.base import CtrModel
from minutely.train.trainer import Trainer, TrainerState

logger = logging.getLogger("minutely.checkpoint")

FORMAT = 1
LATEST = "LATEST"
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
COUNTERS = "trainer.json"
_TMP_PREFIX = ".tmp-ckpt-"
_NAME = re.compile(r"ckpt-(\d{8})")
_EXTRA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# A temporary folder untouched this long is a crashed save's, not a live one's (loads only:
# saves remove every temporary folder, since one process writes to a directory at a time).
STALE_TMP_S = 60.0


def _optim_file(name: str) -> str:
    return f"optim.{name}.pt"


def _extra_file(name: str) -> str:
    return f"extra.{name}"


# -- saving ------------------------------------------------------------------------------


def save_checkpoint(
    directory: Path,
    model: CtrModel,
    trainer: Trainer,
    extra: Mapping[str, bytes] | None = None,
    *,
    keep: int = 3,
) -> Path:
    """Write one atomic checkpoint into ``directory``; return its path (``ckpt-<seq:08d>``).

    ``extra`` maps names (letters, digits, ``_.-``) to bytes returned as-is by the loaders.
    """
    extra = dict(extra or {})
    bad = [n for n in extra if not _EXTRA_NAME.fullmatch(n)]
    if bad:
        raise ValueError(
            f"save_checkpoint: expected extra names of [A-Za-z0-9_.-] (no leading '.'), got {bad}"
        )
    if keep < 1:
        raise ValueError(f"save_checkpoint: expected keep >= 1, got {keep}")
    not_bytes = {n: type(b).__name__ for n, b in extra.items() if not isinstance(b, bytes)}
    if not_bytes:
        raise ValueError(f"save_checkpoint: expected bytes as extra values, got {not_bytes}")
    directory = ensure_writable_dir(Path(directory), "checkpoint folder")
    for stale in directory.glob(_TMP_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    seq = max((s for s, _ in _checkpoints(directory)), default=0) + 1
    final = directory / f"ckpt-{seq:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=directory))
    try:
        files: dict[str, dict[str, Any]] = {}
        files[WEIGHTS] = _write(tmp / WEIGHTS, safetensors.torch.save(model.flat_state_dict()))
        for name, sd in trainer.optimizer_state_dicts().items():
            buf = io.BytesIO()
            torch.save(sd, buf)
            files[_optim_file(name)] = _write(tmp / _optim_file(name), buf.getbuffer())
        s = trainer.state()
        counters = {
            "steps": s.steps,
            "samples_seen": s.samples_seen,
            "skipped_batches": s.skipped_batches,
        }
        files[COUNTERS] = _write(tmp / COUNTERS, json.dumps(counters).encode())
        for name, blob in extra.items():
            files[_extra_file(name)] = _write(tmp / _extra_file(name), blob)
        manifest = {
            "format": FORMAT,
            "seq": seq,
            "arch": model.arch,
            "schema_fingerprint": model.schema.fingerprint(),
            "optimizers": sorted(trainer.optimizer_state_dicts()),
            "extras": sorted(extra),
            "files": files,
        }
        _write(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
        fsync_dir(tmp)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(directory)
    pointer = directory / (LATEST + ".tmp")
    _write(pointer, (final.name + "\n").encode())
    os.replace(pointer, directory / LATEST)
    fsync_dir(directory)
    for _, old in _checkpoints(directory)[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _write(path: Path, data: bytes | memoryview) -> dict[str, Any]:
    write_file_durably(path, data)
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """Complete-by-name checkpoints (``ckpt-<seq>``), oldest first."""
    found = []
    for p in directory.iterdir():
        m = _NAME.fullmatch(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


# -- loading -----------------------------------------------------------------------------


def latest_checkpoint(directory: Path) -> Path | None:
    """The checkpoint ``LATEST`` names, or ``None`` if no checkpoint was ever committed."""
    pointer = Path(directory) / LATEST
    try:
        name = pointer.read_text().strip()
    except FileNotFoundError:
        return None
    if not _NAME.fullmatch(name):
        raise CheckpointError(f"{pointer}: expected a name like 'ckpt-00000001', got {name!r}")
    path = Path(directory) / name
    if not path.is_dir():
        raise CheckpointError(f"{pointer}: names {name!r}, which does not exist")
    return path


def load_latest_checkpoint(
    directory: Path, model: CtrModel, trainer: Trainer
) -> dict[str, bytes] | None:
    """Restore the newest valid checkpoint in place (see :func:`load_checkpoint`).

    ``None`` if no checkpoint was ever committed (no ``LATEST``). Damaged checkpoints are skipped
    with a warning; :class:`CheckpointError` if none of them verifies.
    """
    directory = Path(directory)
    remove_stale_dirs(directory, (_TMP_PREFIX,), min_age_s=STALE_TMP_S)
    pointer = directory / LATEST
    try:
        committed = pointer.read_text().strip()
    except FileNotFoundError:
        return None
    except NotADirectoryError as exc:
        raise CheckpointError(
            f"checkpoint directory {directory}: expected a folder, got a file in the way"
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        committed = f"<unreadable: {exc}>"
    skipped: list[str] = []
    found = _checkpoints(directory)
    m = _NAME.fullmatch(committed)
    if m is None:
        skipped.append(
            f"{LATEST}: expected a name like 'ckpt-00000001', got {committed!r}; trying every "
            "checkpoint"
        )
    else:
        # Newer folders were never committed; an older one is a restore point of its own.
        found = [(seq, p) for seq, p in found if seq <= int(m.group(1))]
        if not (directory / committed).is_dir():
            skipped.append(f"{LATEST}: names {committed!r}, which does not exist")
    for _, path in reversed(found):
        try:
            manifest, blobs = _verified(path)
        except CheckpointError as exc:
            skipped.append(str(exc))
            continue
        if skipped:
            logger.warning(
                "skipped checkpoint(s) in %s: %s; loaded %s instead",
                directory,
                "; ".join(skipped),
                path,
            )
        return _restore(path, manifest, blobs, model, trainer)
    raise CheckpointError(
        f"checkpoint directory {directory}: expected a valid checkpoint, got none of "
        f"{len(found)} ({'; '.join(_relative(r, directory) for r in skipped)})"
    )


def _relative(reason: str, directory: Path) -> str:
    """``reason`` with the directory prefix dropped (the message names the directory once)."""
    return reason.replace(f"checkpoint {directory}/", "")


def load_checkpoint(path: Path, model: CtrModel, trainer: Trainer) -> dict[str, bytes]:
    """Restore ``model`` weights, ``trainer`` optimizers and counters; return the extras.

    Every file is checked against the manifest and every tensor against the model and
    optimizers before anything is modified; any mismatch raises :class:`CheckpointError`.
    """
    path = Path(path)
    manifest, blobs = _verified(path)
    return _restore(path, manifest, blobs, model, trainer)


def _verified(path: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The manifest of checkpoint ``path`` and every file it lists, each checked by sha256."""
    manifest = _read_manifest(path)
    blobs = {name: _read_verified(path, name, meta) for name, meta in manifest["files"].items()}
    return manifest, blobs


def _restore(
    path: Path,
    manifest: Mapping[str, Any],
    blobs: Mapping[str, bytes],
    model: CtrModel,
    trainer: Trainer,
) -> dict[str, bytes]:
    if manifest["arch"] != model.arch or manifest["schema_fingerprint"] != (
        model.schema.fingerprint()
    ):
        raise CheckpointError(
            f"checkpoint {path}: expected a {model.arch} model on schema "
            f"{model.schema.fingerprint()}, got {manifest['arch']} on schema "
            f"{manifest['schema_fingerprint']}"
        )
    try:
        weights = safetensors.torch.load(_need(blobs, WEIGHTS, path))
        optim = {
            name: torch.load(io.BytesIO(_need(blobs, _optim_file(name), path)), weights_only=True)
            for name in manifest["optimizers"]
        }
        counters = json.loads(_need(blobs, COUNTERS, path))
        state = TrainerState(
            steps=int(counters["steps"]),
            samples_seen=int(counters["samples_seen"]),
            skipped_batches=int(counters["skipped_batches"]),
        )
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path}: unreadable content ({exc})") from exc
    try:
        model.check_flat_state_dict(weights)
        trainer.check_restore(optim)
    except (SchemaMismatchError, CheckpointError) as exc:
        raise CheckpointError(f"checkpoint {path}: {exc}") from exc
    model.load_flat_state_dict(weights)
    trainer.restore(state, optim)
    return {name: _need(blobs, _extra_file(name), path) for name in manifest["extras"]}


def _need(blobs: Mapping[str, bytes], name: str, path: Path) -> bytes:
    if name not in blobs:
        raise CheckpointError(f"checkpoint {path}: manifest does not list {name!r}")
    return blobs[name]


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path}: expected a directory, got none")
    try:
        raw = (path / MANIFEST).read_bytes()
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint {path}: no {MANIFEST} (a partially written checkpoint)"
        ) from None
    try:
        m = json.loads(raw)
        ok = (
            m["format"] == FORMAT
            and isinstance(m["arch"], str)
            and isinstance(m["schema_fingerprint"], str)
            and all(isinstance(n, str) for n in m["optimizers"])
            and all(isinstance(n, str) for n in m["extras"])
            and all(
                isinstance(v["sha256"], str) and isinstance(v["bytes"], int)
                for v in m["files"].values()
            )
            # Plain names only: a manifest never points outside its directory.
            and all(_FILE_NAME.fullmatch(name) for name in m["files"])
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint {path}: malformed {MANIFEST} ({exc!r})") from exc
    if not ok:
        raise CheckpointError(
            f"checkpoint {path}: expected a {MANIFEST} of format {FORMAT}, got "
            f"format {m.get('format')!r}, or fields of the wrong type, or file names with paths"
        )
    return dict(m)


def _read_verified(path: Path, name: str, meta: Mapping[str, Any]) -> bytes:
    try:
        data = (path / name).read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path}: file {name!r} is missing") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != meta["sha256"]:
        raise CheckpointError(
            f"checkpoint {path}: file {name!r}: expected sha256 {meta['sha256']}, got {digest}"
        )
    return data


def checkpoint_tensors(path: Path) -> dict[str, Tensor]:
    """The verified model weights of checkpoint ``path`` (to export or inspect it)."""
    manifest = _read_manifest(Path(path))
    if WEIGHTS not in manifest["files"]:
        raise CheckpointError(f"checkpoint {path}: manifest does not list {WEIGHTS!r}")
    data = _read_verified(Path(path), WEIGHTS, manifest["files"][WEIGHTS])
    return safetensors.torch.load(data)
