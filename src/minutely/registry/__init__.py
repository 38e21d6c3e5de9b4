"""Versioned model artifacts: safetensors weights, JSON manifests, lineage, rollback pointer."""

from minutely.registry.manifest import (
    MANIFEST_FILE,
    MANIFEST_VERSION,
    SUPPORTED_MANIFEST_VERSIONS,
    WEIGHTS_FILE,
    FileEntry,
    Manifest,
    format_version,
    parse_version,
)
from minutely.registry.store import POINTER_FILE, Registry, check_model_name

__all__ = [
    "MANIFEST_FILE",
    "MANIFEST_VERSION",
    "POINTER_FILE",
    "SUPPORTED_MANIFEST_VERSIONS",
    "WEIGHTS_FILE",
    "FileEntry",
    "Manifest",
    "Registry",
    "check_model_name",
    "format_version",
    "parse_version",
]
