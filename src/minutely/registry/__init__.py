"""Versioned model artifacts: safetensors weights, signed JSON manifests with chunk digests,
sparse deltas, lineage and a rollback pointer, in a folder or an object store."""

from minutely.registry.delta import apply_delta, make_delta
from minutely.registry.manifest import (
    DELTA_FILE,
    MANIFEST_FILE,
    MANIFEST_VERSION,
    SIGNATURE_FILE,
    SUPPORTED_MANIFEST_VERSIONS,
    WEIGHTS_FILE,
    FileEntry,
    Manifest,
    chunk_count,
    format_version,
    parse_version,
)
from minutely.registry.signing import Signer, Verifier, generate_keypair
from minutely.registry.store import (
    DEFAULT_CHUNK_BYTES,
    POINTER_FILE,
    Registry,
    check_model_name,
    file_entry,
)

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DELTA_FILE",
    "MANIFEST_FILE",
    "MANIFEST_VERSION",
    "POINTER_FILE",
    "SIGNATURE_FILE",
    "SUPPORTED_MANIFEST_VERSIONS",
    "WEIGHTS_FILE",
    "FileEntry",
    "Manifest",
    "Registry",
    "Signer",
    "Verifier",
    "apply_delta",
    "check_model_name",
    "chunk_count",
    "file_entry",
    "format_version",
    "generate_keypair",
    "make_delta",
    "parse_version",
]
