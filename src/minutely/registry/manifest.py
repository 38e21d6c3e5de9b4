"""The artifact manifest: what a model version is, where it came from, and how to verify it.

A version directory holds ``weights.safetensors`` and ``manifest.json``. The manifest names the
version and its lineage (``parent``: the version it continued training from; ``base``: the
day/warm-start version it descends from), the architecture and model config, the feature schema
and its fingerprint, quality metrics, and the sha256 and size of every other file. Its JSON form
is a public contract, frozen by a schema test; a reader refuses a ``manifest_version`` it does not
know.

Version 2 adds what a training run needs to continue from a version: ``mode`` (``"day"``,
``"hour"`` or ``"online"``: the trainer mode that produced it), ``warm_start`` (a batch model
that online training restarts from, the rollback target), ``resume`` (files in the version
folder with the trainer state that resumes it: weights and optimizer state; servers never read
them) and ``resume_positions`` (the samples stream's positions, partition -> offset, the state
covers). A version-1 manifest reads with those fields empty.

Version 3 adds what distribution and deltas need: ``chunk_bytes`` and, for every file in
``files``, ``chunks`` (the sha256 of each consecutive ``chunk_bytes`` slice of the file, the last
one possibly short: what servers fetch and check piece by piece); ``delta_of`` (the version this
one is a delta on top of: its weights are ``delta.safetensors``, only the tensors and rows that
changed; ``None`` for a full version with ``weights.safetensors``) and ``chain`` (deltas since
the last full version, 0 for a full one). Versions 1 and 2 read with those fields empty (no
chunks, full versions).

>>> m = Manifest(
...     manifest_version=1, model="ctr", version="v00000001", parent=None, base=None,
...     created_ms=1_000, arch="lr", model_config={"arch": "lr"},
...     feature_schema={"version": 1, "features": []}, schema_fingerprint="ab",
...     metrics={"auc": 0.75}, samples_seen=10,
...     files={"weights.safetensors": FileEntry(sha256="00", bytes=3)},
... )
>>> Manifest.from_json(m.to_json()) == m
True
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import msgspec

from minutely.errors import ArtifactError

MANIFEST_VERSION = 3
SUPPORTED_MANIFEST_VERSIONS: frozenset[int] = frozenset({1, 2, 3})
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "weights.safetensors"
DELTA_FILE = "delta.safetensors"
SIGNATURE_FILE = "manifest.sig"

_VERSION_RE = re.compile(r"^v(\d{8,})$")


def format_version(number: int) -> str:
    """The directory name of version ``number``: sortable as text up to 99,999,999.

    >>> format_version(42)
    'v00000042'
    """
    if number < 1:
        raise ArtifactError(f"version number: expected an int >= 1, got {number}")
    return f"v{number:08d}"


def parse_version(version: str) -> int:
    """The number of a version name; :class:`ArtifactError` for anything else.

    >>> parse_version("v00000042")
    42
    """
    match = _VERSION_RE.match(version)
    if match is None:
        raise ArtifactError(f"version: expected 'v' and at least 8 digits, got {version!r}")
    return int(match.group(1))


def is_version(name: str) -> bool:
    return _VERSION_RE.match(name) is not None


@dataclass(frozen=True)
class FileEntry:
    """The digest of one file of a version (``bytes`` is its size, ``chunks`` the sha256 of each
    consecutive ``Manifest.chunk_bytes`` slice; empty before manifest version 3)."""

    sha256: str
    bytes: int
    chunks: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Manifest:
    """The description of one model version (treat the dict fields as read-only)."""

    manifest_version: int
    model: str
    version: str
    parent: str | None
    base: str | None
    created_ms: int
    arch: str
    model_config: dict[str, Any]
    feature_schema: dict[str, Any]
    schema_fingerprint: str
    metrics: dict[str, float]
    samples_seen: int
    files: dict[str, FileEntry]
    mode: str | None = None
    warm_start: bool = False
    resume: dict[str, FileEntry] = field(default_factory=dict)
    resume_positions: dict[str, int] = field(default_factory=dict)
    chunk_bytes: int = 0
    delta_of: str | None = None
    chain: int = 0

    @property
    def weights_file(self) -> str:
        """The file with this version's weights: the delta for a delta version."""
        return WEIGHTS_FILE if self.delta_of is None else DELTA_FILE

    def to_json(self) -> bytes:
        """Indented JSON, fields in declaration order (stable bytes for the same manifest)."""
        return msgspec.json.format(_ENCODER.encode(self), indent=2) + b"\n"

    @classmethod
    def from_json(cls, data: bytes, *, source: str = "<manifest>") -> Manifest:
        """Parse and type-check a manifest; ``source`` names the file in error messages.

        The ``manifest_version`` is checked before the other fields, so a manifest written by a
        newer format fails with that reason rather than with a field error.
        """
        try:
            raw = _ANY_DECODER.decode(data)
        except msgspec.DecodeError as exc:
            raise ArtifactError(
                f"{source}: expected a JSON manifest, got invalid JSON ({exc})"
            ) from exc
        if not isinstance(raw, dict):
            raise ArtifactError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        mv = raw.get("manifest_version")
        if type(mv) is not int or mv not in SUPPORTED_MANIFEST_VERSIONS:
            raise ArtifactError(
                f"{source}: unsupported manifest_version: expected one of "
                f"{sorted(SUPPORTED_MANIFEST_VERSIONS)}, got {mv!r}"
            )
        try:
            manifest = msgspec.convert(raw, type=cls)
        except msgspec.ValidationError as exc:
            raise ArtifactError(f"{source}: malformed manifest: {exc}") from exc
        if not is_version(manifest.version):
            raise ArtifactError(
                f"{source}: version: expected 'v' and at least 8 digits, got {manifest.version!r}"
            )
        _check_delta_fields(manifest, source)
        _check_chunks(manifest, source)
        return manifest


def chunk_count(size: int, chunk_bytes: int) -> int:
    """How many ``chunk_bytes`` chunks a file of ``size`` bytes has (the last may be short).

    >>> chunk_count(10, 4), chunk_count(8, 4), chunk_count(0, 4)
    (3, 2, 0)
    """
    return -(-size // chunk_bytes)


def _check_delta_fields(m: Manifest, source: str) -> None:
    if m.delta_of is None:
        if m.chain != 0:
            raise ArtifactError(
                f"{source}: chain: expected 0 for a full version (delta_of null), got {m.chain}"
            )
        return
    if not is_version(m.delta_of) or parse_version(m.delta_of) >= parse_version(m.version):
        raise ArtifactError(
            f"{source}: delta_of: expected an earlier version than {m.version!r}, "
            f"got {m.delta_of!r}"
        )
    if m.chain < 1:
        raise ArtifactError(
            f"{source}: chain: expected >= 1 for a delta version (delta_of {m.delta_of!r}), "
            f"got {m.chain}"
        )


def _check_chunks(m: Manifest, source: str) -> None:
    if m.chunk_bytes < 0:
        raise ArtifactError(f"{source}: chunk_bytes: expected >= 0, got {m.chunk_bytes}")
    if m.manifest_version >= 3 and m.chunk_bytes == 0:
        raise ArtifactError(
            f"{source}: chunk_bytes: expected >= 1 in manifest version {m.manifest_version}, got 0"
        )
    for name, entry in m.files.items():
        if m.chunk_bytes == 0:
            if entry.chunks:
                raise ArtifactError(
                    f"{source}: files[{name!r}].chunks: expected none without chunk_bytes, "
                    f"got {len(entry.chunks)}"
                )
            continue
        want = chunk_count(entry.bytes, m.chunk_bytes)
        if len(entry.chunks) != want:
            raise ArtifactError(
                f"{source}: files[{name!r}].chunks: expected {want} digests for {entry.bytes} "
                f"bytes in chunks of {m.chunk_bytes}, got {len(entry.chunks)}"
            )


_ENCODER = msgspec.json.Encoder()
_ANY_DECODER = msgspec.json.Decoder()
