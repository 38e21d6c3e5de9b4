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

MANIFEST_VERSION = 2
SUPPORTED_MANIFEST_VERSIONS: frozenset[int] = frozenset({1, 2})
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "weights.safetensors"

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
    """The digest of one file of a version (``bytes`` is its size)."""

    sha256: str
    bytes: int


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
        return manifest


_ENCODER = msgspec.json.Encoder()
_ANY_DECODER = msgspec.json.Decoder()
