"""A registry of versioned model artifacts with a rollback pointer, in a folder or an object store.

Layout under the root (a local folder, or an fsspec URL such as ``s3://bucket/prefix``)::

    <root>/<model>/v00000001/weights.safetensors    a full version's weights
    <root>/<model>/v00000001/manifest.json          what the version is (see manifest.py)
    <root>/<model>/v00000001/manifest.sig           its Ed25519 signature (signing.py), if signed
    <root>/<model>/v00000002/delta.safetensors      a delta version: what changed since delta_of
    <root>/<model>/serving.json       rollback pointer: {"pinned": "v00000001"} or {"pinned": null}
    <root>/<model>/.tmp-*, .trash-*   (folder) a publish or prune in progress, or one that crashed

In a folder, a version is written into a temporary directory, fsynced and renamed into place,
so a reader sees a complete version or none; two publishers racing for the same number both
succeed, one of them with the next number. On an object store a version is complete iff its
``manifest.json`` exists: it is written after every other file and deleted before them, and one
publisher per model is assumed (see :mod:`minutely.registry.backend`). Version numbers only grow.

Every file in a manifest's ``files`` carries the sha256 of each ``chunk_bytes`` slice (what
servers fetch from one another and check piece by piece: :meth:`Registry.read_range` serves a
chunk from the origin, :meth:`Registry.install` adds a version received from elsewhere). With a
``signer`` every published manifest is signed; with a ``verifier`` :meth:`Registry.load`,
:meth:`Registry.load_resume` and :meth:`Registry.install` refuse a version whose manifest is
unsigned or signed by another key (:meth:`Registry.verify_manifest`). Weights are safetensors
and manifests JSON: nothing a registry reads is ever unpickled.

A version published with ``delta_from`` stores only what changed since its parent
(:mod:`minutely.registry.delta`) when that is smaller, at most ``max_chain`` deltas in a row;
:meth:`Registry.load` rebuilds the full tensors through the chain, verifying every link and,
at the end, that the result is bit for bit what the publisher had.

A crashed publish or prune in a folder leaves a ``.tmp-*`` or ``.trash-*`` folder. Opening a
registry, and every publish and prune, removes those in which nothing changed for
``backend.STALE_LEFTOVER_S`` seconds: a concurrent publisher's folder is younger (its files are
being written), so it is never touched. Removal is best effort, so a server that only reads (perhaps
from a read-only mount) opens the registry all the same. A folder that cannot be written fails
a publish with a :class:`~minutely.errors.StorageError` naming it.

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

import contextlib
import hashlib
import logging
import math
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from minutely.errors import (
    ArtifactError,
    ChecksumMismatchError,
    SchemaError,
    SchemaMismatchError,
    StorageError,
)
from minutely.registry.backend import FileSource, LocalStore, Store, open_store
from minutely.registry.delta import apply_delta, make_delta
from minutely.registry.manifest import (
    DELTA_FILE,
    MANIFEST_FILE,
    MANIFEST_VERSION,
    SIGNATURE_FILE,
    WEIGHTS_FILE,
    FileEntry,
    Manifest,
    is_version,
    parse_version,
)
from minutely.registry.signing import Signer, Verifier
from minutely.schema import Schema

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

POINTER_FILE = "serving.json"
DEFAULT_CHUNK_BYTES = 4 << 20
FULL_SHA256_KEY = "full_sha256"  # delta.safetensors metadata: sha256 of the full weights file
_MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_PLAIN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_RESERVED = (WEIGHTS_FILE, DELTA_FILE, MANIFEST_FILE, SIGNATURE_FILE)
_ENCODER = msgspec.json.Encoder()
_READ_BLOCK = 1 << 20  # how much of a file is read at a time when no chunk size is given


class _Pointer(msgspec.Struct, forbid_unknown_fields=True):
    pinned: str | None


class Registry:
    """Versioned artifacts of any number of models under ``root`` (created on first publish).

    ``root`` is a folder (a :class:`~pathlib.Path` or a plain path string) or an fsspec URL
    opened with ``storage_options``; ``signer`` signs what this instance publishes,
    ``verifier`` makes it refuse what the matching key did not sign; ``chunk_bytes`` is the
    chunk size of the digests published manifests carry.
    """

    def __init__(
        self,
        root: Path | str,
        *,
        storage_options: Mapping[str, Any] | None = None,
        signer: Signer | None = None,
        verifier: Verifier | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        if type(chunk_bytes) is not int or chunk_bytes < 1:
            raise ArtifactError(f"registry chunk_bytes: expected an int >= 1, got {chunk_bytes!r}")
        self._store: Store = open_store(root, storage_options)
        self._signer = signer
        self._verifier = verifier
        self._chunk_bytes = chunk_bytes
        self.on_change: Callable[[str, Manifest | None], None] | None = None
        """Called with the model (and the new manifest, for a publish) after every publish,
        pin and unpin made through this instance: how the fleet is told (see
        :class:`~minutely.pipeline.origin.Announcer`). Installs do not call it."""

    @property
    def root(self) -> Path:
        """The registry folder; a :class:`StorageError` for an object-store registry."""
        if not isinstance(self._store, LocalStore):
            raise StorageError(
                f"registry {self._store.location}: expected a local folder, got an object-store "
                "URL (see Registry.location)"
            )
        return self._store.root

    @property
    def location(self) -> str:
        """The registry folder or URL, as a string."""
        return self._store.location

    @property
    def is_local(self) -> bool:
        """Whether the registry is a folder (rather than an object store)."""
        return isinstance(self._store, LocalStore)

    @property
    def chunk_bytes(self) -> int:
        return self._chunk_bytes

    @property
    def verifier(self) -> Verifier | None:
        return self._verifier

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
        delta_from: tuple[str, Mapping[str, torch.Tensor]] | None = None,
        max_chain: int = 8,
    ) -> Manifest:
        """Write a new version of ``model`` atomically and return its manifest.

        ``created_ms`` is the event time the weights reflect; ``parent`` and ``base`` name the
        versions it descends from. Metrics must be finite (JSON has no NaN). ``mode`` names the
        trainer mode that produced it and ``warm_start`` marks a version online training restarts
        from; ``resume`` (file name -> bytes) is the trainer state that continues it, written
        beside the weights and read only by :meth:`load_resume`, with ``resume_positions`` the
        samples stream positions that state covers.

        ``delta_from=(version, tensors)`` (a published version and exactly the tensors it
        holds) publishes a delta on top of it when that version's ``chain`` is below
        ``max_chain`` (0: always full), the two have the same schema, names, shapes and dtypes,
        and the delta file is smaller than the full one; otherwise a full version.
        """
        check_model_name(model)
        for what, ref in (("parent", parent), ("base", base)):
            if ref is not None and not is_version(ref):
                raise ArtifactError(f"publish {model!r}: {what}: expected a version, got {ref!r}")
        if samples_seen < 0:
            raise ArtifactError(
                f"publish {model!r}: samples_seen: expected >= 0, got {samples_seen}"
            )
        if type(max_chain) is not int or max_chain < 0:
            raise ArtifactError(
                f"publish {model!r}: max_chain: expected an int >= 0, got {max_chain!r}"
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
            if name in _RESERVED or not _PLAIN_NAME_RE.match(name):
                raise ArtifactError(
                    f"publish {model!r}: resume: expected plain file names other than "
                    f"{', '.join(_RESERVED)}, got {name!r}"
                )

        full_blob = _serialize(model, prepared, None)
        weights_name, blob, delta_of, chain = WEIGHTS_FILE, full_blob, None, 0
        if delta_from is not None:
            delta = self._delta(model, schema, prepared, full_blob, delta_from, max_chain)
            if delta is not None:
                blob, delta_of, chain = delta
                weights_name = DELTA_FILE
        files = {weights_name: blob, **resume_blobs}
        resume_entries = {
            name: FileEntry(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
            for name, data in resume_blobs.items()
        }
        made: dict[str, Manifest] = {}

        def finish(version: str) -> dict[str, bytes]:
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
                files={weights_name: file_entry(blob, self._chunk_bytes)},
                mode=mode,
                warm_start=warm_start,
                resume=resume_entries,
                resume_positions={str(p): int(o) for p, o in (resume_positions or {}).items()},
                chunk_bytes=self._chunk_bytes,
                delta_of=delta_of,
                chain=chain,
            )
            made[version] = manifest
            data = manifest.to_json()
            return _final_files(data, None if self._signer is None else self._signer.sign(data))

        version = self._store.commit(model, None, files, finish)
        if version is None:  # only a given version can be taken already
            raise AssertionError("a publish always gets a version number")
        logger.info(
            "published %s/%s (%d bytes, %s)",
            model,
            version,
            len(blob),
            "full" if delta_of is None else f"delta on {delta_of}",
        )
        self._changed(model, made[version])
        return made[version]

    def install(
        self,
        model: str,
        version: str,
        manifest_json: bytes,
        signature: bytes | None,
        files: Mapping[str, FileSource],
    ) -> Manifest:
        """Atomically add ``version`` of ``model`` received from elsewhere, under its own name.

        ``files`` gives each file's bytes or a local file holding them: a file is verified in
        chunks and then linked (or streamed) into the store, never read into memory whole, and
        must not change until this returns.

        Before anything is written: the signature (when this registry has a verifier), the
        manifest's model and version, that ``files`` are exactly the manifest's ``files``, and
        the size, sha256 and chunk digests of each; an :class:`ArtifactError` naming the reason
        otherwise. A version already here with the same manifest bytes is left as it is (a
        no-op); one with other bytes is refused.
        """
        manifest = self.verify_manifest(model, version, manifest_json, signature)
        where = self._store.describe(model, version, MANIFEST_FILE)
        if set(files) != set(manifest.files):
            raise ArtifactError(
                f"install {model} {version}: files: expected exactly {sorted(manifest.files)}, "
                f"got {sorted(files)}"
            )
        for name, entry in manifest.files.items():
            got = file_entry(files[name], manifest.chunk_bytes if entry.chunks else 0)
            _check_entry(self._store.describe(model, version, name), got, entry)
        if self._installed_same(model, version, manifest_json, where):
            return manifest
        final = _final_files(manifest_json, signature)  # as received: never signed here
        committed = self._store.commit(model, version, files, lambda _: final)
        if committed is None and not self._installed_same(model, version, manifest_json, where):
            raise ArtifactError(
                f"{where}: expected to install {model} {version}, got a version that appeared "
                "and vanished meanwhile (a concurrent install and prune)"
            )
        logger.info("installed %s/%s", model, version)
        return manifest

    def pin(self, model: str, version: str) -> None:
        """Serve ``version`` of ``model`` instead of the latest (the rollback pointer)."""
        self.manifest(model, version)  # refuse to pin what could not be served
        self._store.write_pointer(
            model, POINTER_FILE, msgspec.json.encode(_Pointer(version)), create=True
        )
        logger.info("pinned %s to %s", model, version)
        self._changed(model, None)

    def unpin(self, model: str) -> None:
        """Serve the latest version of ``model`` again."""
        check_model_name(model)
        self._store.write_pointer(
            model, POINTER_FILE, msgspec.json.encode(_Pointer(None)), create=False
        )
        logger.info("unpinned %s", model)
        self._changed(model, None)

    def _changed(self, model: str, manifest: Manifest | None) -> None:
        if self.on_change is not None:
            self.on_change(model, manifest)

    def prune(self, model: str, *, keep: int) -> list[str]:
        """Delete all but the newest ``keep`` versions of ``model``; the removed versions.

        The pinned version, the ``base`` of every kept version (rollback targets) and every
        version a kept delta is built on (its ``delta_of``, and theirs) are kept too. A version
        disappears atomically (in a folder: renamed away, then deleted; on an object store: its
        manifest deleted first), so a reader sees it whole or not at all.
        """
        if keep < 1:
            raise ArtifactError(f"prune {model!r}: keep: expected an int >= 1, got {keep}")
        versions = self.versions(model)
        kept = set(versions[-keep:])
        pinned = self.pinned(model)
        if pinned is not None:
            kept.add(pinned)
        todo = sorted(kept)
        while todo:
            try:
                manifest = self.manifest(model, todo.pop())
            except ArtifactError:
                continue
            for ref in (manifest.base, manifest.delta_of):
                if ref is not None and ref not in kept:
                    kept.add(ref)
                    todo.append(ref)
        self._store.sweep(model)
        removed = [v for v in versions if v not in kept and self._store.remove(model, v)]
        if removed:
            logger.info("pruned %s: removed %d versions", model, len(removed))
        return removed

    # --- reading ------------------------------------------------------------------------------

    def versions(self, model: str) -> list[str]:
        """The published versions of ``model``, oldest first (in-progress publishes excluded)."""
        return self._store.versions(check_model_name(model))

    def manifest_bytes(self, model: str, version: str) -> tuple[bytes, bytes | None]:
        """The raw ``manifest.json`` and ``manifest.sig`` (``None`` when unsigned) of a version,
        unverified (what an agent copies elsewhere and checks with :meth:`verify_manifest`)."""
        return self._manifest_bytes(model, version, signature=True)

    def verify_manifest(
        self, model: str, version: str, manifest_json: bytes, signature: bytes | None
    ) -> Manifest:
        """Check the signature of manifest bytes (when this registry has a verifier) and parse
        them as the manifest of ``version`` of ``model``; :class:`ArtifactError` otherwise."""
        check_model_name(model)
        where = self._store.describe(model, _checked_version(version), MANIFEST_FILE)
        if self._verifier is not None:
            self._verifier.verify(manifest_json, signature, where)
        return _parse_manifest(model, version, manifest_json, where)

    def manifest(self, model: str, version: str) -> Manifest:
        """The manifest of one version, parsed but not signature-checked (see :meth:`load`);
        :class:`ArtifactError` naming the file if unusable."""
        data, _ = self._manifest_bytes(model, version, signature=False)
        where = self._store.describe(model, version, MANIFEST_FILE)
        return _parse_manifest(model, version, data, where)

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
        where = self._store.describe(check_model_name(model), None, POINTER_FILE)
        try:
            data = self._store.read(model, None, POINTER_FILE)
        except FileNotFoundError:
            return None
        try:
            pointer = msgspec.json.decode(data, type=_Pointer)
        except msgspec.DecodeError as exc:
            raise ArtifactError(
                f'{where}: expected {{"pinned": <version or null>}}, got {data[:80]!r} ({exc})'
            ) from exc
        if pointer.pinned is not None and not is_version(pointer.pinned):
            raise ArtifactError(f"{where}: pinned: expected a version, got {pointer.pinned!r}")
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
        """Verify and load one version: signature (with a verifier), manifest, schema
        fingerprint, file sizes and sha256; the full tensors, a delta resolved through its chain.

        The files are read once, hashed, and the verified bytes are what is deserialized
        (safetensors: no code runs on load), so a file changed after the check cannot slip in.
        Each parent of a delta is verified like the version itself; a missing or corrupt one is
        an :class:`ArtifactError` naming it. ``expected_fingerprint`` of ``None`` skips the
        comparison with the caller's schema.
        """
        manifest = self._verified_manifest(model, version)
        where = self._store.describe(model, version, MANIFEST_FILE)
        _check_schema(manifest, where, expected_fingerprint)
        blobs = {
            name: self._read_verified(model, version, name, entry)
            for name, entry in manifest.files.items()
        }
        weights = blobs[manifest.weights_file]
        if manifest.delta_of is None:
            return manifest, _load_tensors(
                weights, self._store.describe(model, version, WEIGHTS_FILE)
            )
        return manifest, self._resolve(model, manifest, weights)

    def load_resume(self, model: str, version: str) -> tuple[Manifest, dict[str, bytes]]:
        """The verified ``resume`` files of one version (the trainer state that continues it);
        :class:`ArtifactError` when the version has none."""
        manifest = self._verified_manifest(model, version)
        if not manifest.resume:
            raise ArtifactError(
                f"{self._store.describe(model, version, MANIFEST_FILE)}: resume: expected the "
                f"trainer state that continues {model} {version}, got none (only warm-start "
                "versions carry one)"
            )
        blobs: dict[str, bytes] = {}
        for name, entry in manifest.resume.items():
            if not _PLAIN_NAME_RE.match(name) or name in _RESERVED:
                raise ArtifactError(
                    f"{self._store.describe(model, version, MANIFEST_FILE)}: resume: expected "
                    f"plain file names, got {name!r}"
                )
            blobs[name] = self._read_verified(model, version, name, entry)
        return manifest, blobs

    def read_range(self, model: str, version: str, file: str, start: int, length: int) -> bytes:
        """``length`` bytes of ``file`` of a version from byte ``start`` (fewer at the end of
        the file, none from there on), unverified: what an agent fetches a chunk from the
        origin with; :class:`ArtifactError` when the version has no such file."""
        path = self._store.describe(check_model_name(model), _checked_version(version), file)
        if not _PLAIN_NAME_RE.match(file):
            raise ArtifactError(
                f"read_range {path}: file: expected a plain file name, got {file!r}"
            )
        if start < 0 or length < 0:
            raise ArtifactError(
                f"read_range {path}: expected start >= 0 and length >= 0, got start {start} "
                f"length {length}"
            )
        try:
            return self._store.read_range(model, version, file, start, length)
        except FileNotFoundError as exc:
            raise ArtifactError(
                f"{path}: expected a file of the version, got no such file"
            ) from exc

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

    # --- internals ----------------------------------------------------------------------------

    def _manifest_bytes(
        self, model: str, version: str, *, signature: bool
    ) -> tuple[bytes, bytes | None]:
        check_model_name(model)
        _checked_version(version)
        try:
            data = self._store.read(model, version, MANIFEST_FILE)
        except FileNotFoundError as exc:
            raise ArtifactError(
                f"{self._store.describe(model, version, MANIFEST_FILE)}: expected a manifest, "
                "got no such file"
            ) from exc
        sig: bytes | None = None
        if signature:
            try:
                sig = self._store.read(model, version, SIGNATURE_FILE)
            except FileNotFoundError:
                sig = None
        return data, sig

    def _verified_manifest(self, model: str, version: str) -> Manifest:
        data, sig = self._manifest_bytes(model, version, signature=self._verifier is not None)
        return self.verify_manifest(model, version, data, sig)

    def _installed_same(self, model: str, version: str, manifest_json: bytes, where: str) -> bool:
        try:
            existing, _ = self._manifest_bytes(model, version, signature=False)
        except ArtifactError:
            return False
        if existing != manifest_json:
            raise ArtifactError(
                f"{where}: expected no version {version} of {model!r} here or the same one, got "
                "one with a different manifest"
            )
        return True

    def _read_verified(self, model: str, version: str, name: str, entry: FileEntry) -> bytes:
        path = self._store.describe(model, version, name)
        try:
            data = self._store.read(model, version, name)
        except FileNotFoundError as exc:
            raise ArtifactError(f"{path}: listed in the manifest, got no such file") from exc
        _check_blob(path, data, entry)
        return data

    def _delta(
        self,
        model: str,
        schema: Schema,
        prepared: dict[str, torch.Tensor],
        full_blob: bytes,
        delta_from: tuple[str, Mapping[str, torch.Tensor]],
        max_chain: int,
    ) -> tuple[bytes, str, int] | None:
        """(delta file, parent version, chain) when a delta is worth publishing, else None."""
        parent_version, parent_tensors = delta_from
        try:
            parent = self.manifest(model, parent_version)
        except ArtifactError as exc:
            raise ArtifactError(
                f"publish {model!r}: delta_from: expected a published version to build the "
                f"delta on, got {parent_version!r} ({exc})"
            ) from exc
        if max_chain == 0 or parent.chain >= max_chain:
            return None
        if parent.schema_fingerprint != schema.fingerprint():
            return None
        delta = make_delta(parent_tensors, prepared)
        if delta is None:
            return None
        full_sha = hashlib.sha256(full_blob).hexdigest()
        blob = _serialize(model, delta, {FULL_SHA256_KEY: full_sha})
        if len(blob) >= len(full_blob):
            return None
        return blob, parent_version, parent.chain + 1

    def _resolve(self, model: str, top: Manifest, top_blob: bytes) -> dict[str, torch.Tensor]:
        """The full tensors of delta version ``top``: its chain down to a full version, every
        link verified, applied in order, and checked against the publisher's digest."""
        links = [(top, top_blob)]
        child = top
        while child.delta_of is not None:
            where = self._store.describe(model, child.version, MANIFEST_FILE)
            try:
                parent = self._verified_manifest(model, child.delta_of)
                _check_link(child, parent)
                blob = self._read_verified(
                    model, parent.version, parent.weights_file, parent.files[parent.weights_file]
                )
            except ArtifactError as exc:
                raise ArtifactError(
                    f"{where}: delta_of: expected version {child.delta_of} of {model!r} to "
                    f"apply the delta to, got: {exc}"
                ) from exc
            links.append((parent, blob))
            child = parent
        base, base_blob = links[-1]
        tensors = _load_tensors(base_blob, self._store.describe(model, base.version, WEIGHTS_FILE))
        for link, blob in reversed(links[:-1]):
            path = self._store.describe(model, link.version, DELTA_FILE)
            delta = _load_tensors(blob, path)
            try:
                tensors = apply_delta(tensors, delta)
            except ArtifactError as exc:
                raise ArtifactError(f"{path}: {exc}") from exc
        path = self._store.describe(model, top.version, DELTA_FILE)
        want = _safetensors_metadata(top_blob, path).get(FULL_SHA256_KEY)
        if want is None:
            raise ArtifactError(
                f"{path}: expected the {FULL_SHA256_KEY!r} of the weights in its metadata, got none"
            )
        got = hashlib.sha256(_serialize(model, _prepare_tensors(model, tensors), None)).hexdigest()
        if got != want:
            raise ArtifactError(
                f"{path}: expected the chain {' <- '.join(m.version for m, _ in links)} to "
                f"rebuild weights with sha256 {want}, got sha256 {got}"
            )
        return tensors


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


def file_entry(source: FileSource, chunk_bytes: int) -> FileEntry:
    """The :class:`FileEntry` of ``source`` (bytes, or a file read in chunks, never whole):
    size, sha256 and the sha256 of each ``chunk_bytes`` chunk (none when ``chunk_bytes`` is 0).

    >>> e = file_entry(b"abcde", 2)
    >>> e.bytes, len(e.chunks), e.chunks[2] == hashlib.sha256(b"e").hexdigest()
    (5, 3, True)
    """
    whole = hashlib.sha256()
    chunks: list[str] = []
    size = 0
    block = chunk_bytes if chunk_bytes > 0 else _READ_BLOCK
    with contextlib.ExitStack() as stack:
        if isinstance(source, Path):
            f = stack.enter_context(open(source, "rb"))
            pieces: Iterator[bytes | memoryview] = iter(lambda: f.read(block), b"")
        else:
            view = memoryview(source)
            pieces = (view[i : i + block] for i in range(0, len(view), block))
        for piece in pieces:
            whole.update(piece)
            size += len(piece)
            if chunk_bytes > 0:
                chunks.append(hashlib.sha256(piece).hexdigest())
    return FileEntry(sha256=whole.hexdigest(), bytes=size, chunks=chunks)


def _final_files(manifest_json: bytes, signature: bytes | None) -> dict[str, bytes]:
    """The files that complete a version, in writing order: signature, then manifest."""
    out: dict[str, bytes] = {}
    if signature is not None:
        out[SIGNATURE_FILE] = signature
    out[MANIFEST_FILE] = manifest_json
    return out


def _checked_version(version: str) -> str:
    parse_version(version)
    return version


def _parse_manifest(model: str, version: str, data: bytes, where: str) -> Manifest:
    """Parse manifest bytes and check they describe ``version`` of ``model`` with usable files."""
    manifest = Manifest.from_json(data, source=where)
    if manifest.model != model or manifest.version != version:
        raise ArtifactError(
            f"{where}: expected model {model!r} version {version!r}, "
            f"got model {manifest.model!r} version {manifest.version!r}"
        )
    for name in manifest.files:
        if not _PLAIN_NAME_RE.match(name) or name in (MANIFEST_FILE, SIGNATURE_FILE):
            raise ArtifactError(f"{where}: files: expected plain file names, got {name!r}")
    if manifest.weights_file not in manifest.files:
        raise ArtifactError(
            f"{where}: files: expected an entry for {manifest.weights_file!r}, "
            f"got {sorted(manifest.files)}"
        )
    return manifest


def _check_link(child: Manifest, parent: Manifest) -> None:
    if parent.chain != child.chain - 1:
        raise ArtifactError(
            f"chain: expected {child.chain - 1} (the parent of a delta with chain {child.chain}),"
            f" got {parent.chain}"
        )
    if parent.schema_fingerprint != child.schema_fingerprint:
        raise ArtifactError(
            f"schema_fingerprint: expected {child.schema_fingerprint!r} like the delta's, got "
            f"{parent.schema_fingerprint!r}"
        )


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
    import torch  # here, not at the top: the fleet's agents use the registry without torch

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


def _serialize(
    model: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None
) -> bytes:
    import safetensors
    import safetensors.torch

    try:
        return bytes(safetensors.torch.save(tensors, metadata=metadata))
    except (safetensors.SafetensorError, ValueError, RuntimeError) as exc:
        raise ArtifactError(
            f"publish {model!r}: expected tensors safetensors can store, got {exc}"
        ) from exc


def _load_tensors(data: bytes, path: str) -> dict[str, torch.Tensor]:
    import safetensors
    import safetensors.torch

    try:
        return safetensors.torch.load(data)
    except safetensors.SafetensorError as exc:
        raise ArtifactError(
            f"{path}: expected safetensors data, got an unreadable file ({exc})"
        ) from exc


def _safetensors_metadata(data: bytes, path: str) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (its header is JSON after an 8-byte length)."""
    try:
        size = int.from_bytes(data[:8], "little")
        header = msgspec.json.decode(data[8 : 8 + size])
        meta = header.get("__metadata__") or {}
        if not isinstance(meta, dict):
            raise ValueError(f"__metadata__ is a {type(meta).__name__}")
    except (msgspec.DecodeError, ValueError, AttributeError) as exc:
        raise ArtifactError(f"{path}: expected a safetensors header, got {exc}") from exc
    return {str(k): str(v) for k, v in meta.items()}


def _check_schema(manifest: Manifest, path: str, expected: str | None) -> None:
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


def _check_blob(path: str, data: bytes, entry: FileEntry) -> None:
    _check_entry(path, file_entry(data, 0), entry)


def _check_entry(path: str, got: FileEntry, entry: FileEntry) -> None:
    """``got`` (computed from a file) against the manifest's ``entry``: size, sha256, and the
    chunk digests when both list them."""
    if got.bytes != entry.bytes:
        raise ChecksumMismatchError(
            f"{path}: expected {entry.bytes} bytes with sha256 {entry.sha256}, "
            f"got {got.bytes} bytes with sha256 {got.sha256}"
        )
    if got.sha256 != entry.sha256:
        raise ChecksumMismatchError(f"{path}: expected sha256 {entry.sha256}, got {got.sha256}")
    if not got.chunks:
        return
    for i, (want, have) in enumerate(zip(entry.chunks, got.chunks, strict=True)):
        if want != have:
            raise ChecksumMismatchError(
                f"{path}: chunk {i}: expected sha256 {want}, got {have} (the manifest's chunk "
                "digests do not match the file)"
            )
