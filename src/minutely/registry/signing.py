"""Ed25519 signatures of manifests: who published a version, checked before anything is loaded.

A signed version has ``manifest.sig`` beside ``manifest.json``::

    {"alg": "ed25519", "key_id": "<first 16 hex of sha256 of the raw public key>",
     "signature": "<base64 of the signature over the exact manifest.json bytes>"}

The manifest lists the sha256 of every file of the version, so a valid signature vouches for
all of them. A :class:`Verifier` refuses a manifest without a signature, one signed by another
key, and one whose bytes changed after signing, with an
:class:`~minutely.errors.ArtifactError` that says which.

>>> signer = Signer.generate()
>>> sig = signer.sign(b'{"model": "ctr"}')
>>> signer.verifier().verify(b'{"model": "ctr"}', sig, "m.json")
>>> signer.verifier().verify(b'{"model": "cvr"}', sig, "m.json")
Traceback (most recent call last):
...
minutely.errors.ArtifactError: m.json: wrong signature: the ed25519 signature by key ...
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import uuid
from pathlib import Path

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from minutely.errors import ArtifactError, StorageError
from minutely.fsutil import describe_os_error, fsync_dir
from minutely.registry.manifest import SIGNATURE_FILE

ALG = "ed25519"
_SIG_BYTES = 64


class _SigFile(msgspec.Struct, forbid_unknown_fields=True):
    alg: str
    key_id: str
    signature: str


def key_id(public_key: Ed25519PublicKey) -> str:
    """The first 16 hex digits of the sha256 of the raw 32-byte public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


class Verifier:
    """Checks ``manifest.sig`` files against one Ed25519 public key."""

    def __init__(self, public_key: Ed25519PublicKey) -> None:
        self._key = public_key
        self.key_id = key_id(public_key)

    @classmethod
    def from_pem(cls, data: bytes, *, source: str = "<public key>") -> Verifier:
        """The verifier of a PEM public key (``SubjectPublicKeyInfo``)."""
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError) as exc:
            raise ArtifactError(
                f"{source}: expected an Ed25519 public key in PEM, got unreadable data ({exc})"
            ) from exc
        if not isinstance(key, Ed25519PublicKey):
            raise ArtifactError(
                f"{source}: expected an Ed25519 public key in PEM, got a {type(key).__name__}"
            )
        return cls(key)

    @classmethod
    def from_pem_file(cls, path: Path | str) -> Verifier:
        """The verifier of the PEM public key in ``path``."""
        return cls.from_pem(_read_key_file(path, "public"), source=str(path))

    def verify(self, data: bytes, sig: bytes | None, where: str) -> None:
        """Return if ``sig`` (a ``manifest.sig`` file) signs ``data`` with this key, else raise
        :class:`ArtifactError` ``"<where>: unsigned: ..."`` or ``"<where>: wrong signature:
        ..."`` naming the reason."""
        if sig is None:
            raise ArtifactError(
                f"{where}: unsigned: expected {SIGNATURE_FILE} signed by key {self.key_id}, "
                "got none"
            )
        try:
            doc = msgspec.json.decode(sig, type=_SigFile)
        except msgspec.DecodeError as exc:
            raise ArtifactError(
                f"{where}: wrong signature: expected {SIGNATURE_FILE} as JSON "
                f'{{"alg": "{ALG}", "key_id": ..., "signature": <base64>}}, got {sig[:80]!r} '
                f"({exc})"
            ) from exc
        if doc.alg != ALG:
            raise ArtifactError(f"{where}: wrong signature: expected alg {ALG!r}, got {doc.alg!r}")
        if doc.key_id != self.key_id:
            raise ArtifactError(
                f"{where}: wrong signature: expected one by key {self.key_id}, got one by key "
                f"{doc.key_id!r}"
            )
        try:
            raw = base64.b64decode(doc.signature, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ArtifactError(
                f"{where}: wrong signature: expected base64 in signature, got "
                f"{doc.signature[:40]!r} ({exc})"
            ) from exc
        if len(raw) != _SIG_BYTES:
            raise ArtifactError(
                f"{where}: wrong signature: expected {_SIG_BYTES} signature bytes, got {len(raw)}"
            )
        try:
            self._key.verify(raw, data)
        except InvalidSignature as exc:
            raise ArtifactError(
                f"{where}: wrong signature: the {ALG} signature by key {self.key_id} does not "
                "match the manifest bytes"
            ) from exc


class Signer:
    """Signs manifests with one Ed25519 private key."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.key_id = key_id(private_key.public_key())

    @classmethod
    def generate(cls) -> Signer:
        """A signer with a fresh random key (kept in memory only)."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_pem_file(cls, path: Path | str) -> Signer:
        """The signer of the unencrypted PEM (PKCS #8) private key in ``path``."""
        data = _read_key_file(path, "private")
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise ArtifactError(
                f"{path}: expected an unencrypted Ed25519 private key in PEM, got unreadable "
                f"data ({exc})"
            ) from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ArtifactError(
                f"{path}: expected an Ed25519 private key in PEM, got a {type(key).__name__}"
            )
        return cls(key)

    def private_key_pem(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def public_key_pem(self) -> bytes:
        """The public key in PEM (``SubjectPublicKeyInfo``), what a :class:`Verifier` reads."""
        return self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def verifier(self) -> Verifier:
        """The verifier of this signer's public key."""
        return Verifier(self._key.public_key())

    def sign(self, data: bytes) -> bytes:
        """The ``manifest.sig`` file that signs ``data`` (the exact manifest bytes)."""
        signature = base64.b64encode(self._key.sign(data)).decode("ascii")
        doc = _SigFile(alg=ALG, key_id=self.key_id, signature=signature)
        return msgspec.json.encode(doc) + b"\n"


def generate_keypair(private_path: Path | str, public_path: Path | str) -> Signer:
    """Write a new key pair: the private key (PEM, mode 0600) and the public key (PEM).

    Refuses to overwrite an existing key file (a :class:`StorageError` naming it): replacing a
    key silently would make every version signed with the old one unverifiable.
    """
    signer = Signer.generate()
    private_path, public_path = Path(private_path), Path(public_path)
    for path in (private_path, public_path):
        if path.exists():
            raise StorageError(f"{path}: expected no file (a new key), got an existing one")
    _write_new_file(private_path, signer.private_key_pem(), 0o600)
    _write_new_file(public_path, signer.public_key_pem(), 0o644)
    return signer


def _read_key_file(path: Path | str, kind: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise ArtifactError(
            f"{path}: expected an Ed25519 {kind} key file in PEM, got no such file"
        ) from exc
    except OSError as exc:
        raise ArtifactError(
            f"{path}: expected an Ed25519 {kind} key file in PEM, got {describe_os_error(exc)}"
        ) from exc


def _write_new_file(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` with ``mode`` from its first byte on (a temporary file renamed into place)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            os.fchmod(fd, mode)  # not widened by the umask, nor narrowed
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StorageError(
            f"{path}: expected to write a key file, got {describe_os_error(exc)}"
        ) from exc
    fsync_dir(path.parent)
