"""Signed manifests: keys, the signature file, and every way a registry with a verifier refuses."""

from __future__ import annotations

import base64
import json
import os
import pickle
import stat
from pathlib import Path

import pytest
import torch
from registry_helpers import FP, assert_same_tensors, publish, tensors

from minutely.errors import ArtifactError, StorageError
from minutely.registry import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    WEIGHTS_FILE,
    Manifest,
    Registry,
    Signer,
    Verifier,
    file_entry,
    generate_keypair,
)
from minutely.registry.signing import key_id


@pytest.fixture
def signer() -> Signer:
    return Signer.generate()


def test_sign_then_verify(signer: Signer) -> None:
    data = b'{"model": "ctr"}\n'
    sig = signer.sign(data)
    doc = json.loads(sig)
    assert list(doc) == ["alg", "key_id", "signature"]
    assert doc["alg"] == "ed25519"
    assert doc["key_id"] == signer.key_id == signer.verifier().key_id
    assert len(doc["key_id"]) == 16
    assert len(base64.b64decode(doc["signature"])) == 64
    signer.verifier().verify(data, sig, "m")


def test_key_files_round_trip_and_the_private_key_is_private(tmp_path: Path) -> None:
    private, public = tmp_path / "keys" / "signing.pem", tmp_path / "keys" / "public.pem"
    made = generate_keypair(private, public)
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    assert public.read_bytes() == made.public_key_pem()
    assert public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    signer = Signer.from_pem_file(private)
    verifier = Verifier.from_pem_file(public)
    assert signer.key_id == verifier.key_id == made.key_id
    verifier.verify(b"x", signer.sign(b"x"), "m")
    assert [p.name for p in sorted((tmp_path / "keys").iterdir())] == ["public.pem", "signing.pem"]
    with pytest.raises(StorageError, match=rf"^{private}: expected no file \(a new key\), got an"):
        generate_keypair(private, tmp_path / "other.pem")


def test_unreadable_key_files_are_named(tmp_path: Path, signer: Signer) -> None:
    missing = tmp_path / "none.pem"
    with pytest.raises(ArtifactError, match=rf"^{missing}: expected an Ed25519 public key file in"):
        Verifier.from_pem_file(missing)
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"not a key")
    with pytest.raises(ArtifactError, match=r"expected an Ed25519 public key in PEM, got unread"):
        Verifier.from_pem_file(garbage)
    with pytest.raises(ArtifactError, match=r"expected an unencrypted Ed25519 private key in PEM"):
        Signer.from_pem_file(garbage)
    # A public key where the private key should be, and the other way round.
    public = tmp_path / "public.pem"
    public.write_bytes(signer.public_key_pem())
    with pytest.raises(ArtifactError, match=rf"^{public}: expected an unencrypted Ed25519 priv"):
        Signer.from_pem_file(public)
    private = tmp_path / "private.pem"
    private.write_bytes(signer.private_key_pem())
    with pytest.raises(ArtifactError, match=rf"^{private}: expected an Ed25519 public key in PEM"):
        Verifier.from_pem_file(private)


def _sig_file(**doc: object) -> bytes:
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("sig", "message"),
    [
        (None, r"m: unsigned: expected manifest\.sig signed by key {kid}, got none"),
        (b"garbage", r"m: wrong signature: expected manifest\.sig as JSON .* got b'garbage'"),
        (b"[1]", r"m: wrong signature: expected manifest\.sig as JSON"),
        (
            _sig_file(alg="rsa", key_id="0" * 16, signature=""),
            r"m: wrong signature: expected alg 'ed25519', got 'rsa'",
        ),
        (
            _sig_file(alg="ed25519", key_id="{kid}", signature="!!"),
            r"m: wrong signature: expected base64 in signature, got '!!'",
        ),
        (
            _sig_file(alg="ed25519", key_id="{kid}", signature="AAAA"),
            r"m: wrong signature: expected 64 signature bytes, got 3",
        ),
        (
            _sig_file(
                alg="ed25519", key_id="{kid}", signature=base64.b64encode(bytes(64)).decode()
            ),
            r"m: wrong signature: the ed25519 signature by key {kid} does not match",
        ),
    ],
)
def test_every_bad_signature_file_is_named(signer: Signer, sig: bytes | None, message: str) -> None:
    kid = signer.key_id
    if sig is not None:
        sig = sig.replace(b"{kid}", kid.encode())
    with pytest.raises(ArtifactError, match="^" + message.replace("{kid}", kid)):
        signer.verifier().verify(b"data", sig, "m")


# --- a registry with a verifier ----------------------------------------------------------------


@pytest.fixture
def signed(tmp_path: Path, signer: Signer) -> tuple[Registry, Registry, Manifest]:
    """(publisher, reader with the verifier, a signed version)."""
    root = tmp_path / "registry"
    publisher = Registry(root, signer=signer)
    m = publish(publisher, seed=1)
    return publisher, Registry(root, verifier=signer.verifier()), m


def _vdir(reg: Registry, m: Manifest) -> Path:
    return reg.root / "ctr" / m.version


def test_a_signed_version_is_written_signed_and_loads(
    signed: tuple[Registry, Registry, Manifest], signer: Signer
) -> None:
    _, reader, m = signed
    vdir = _vdir(reader, m)
    assert sorted(p.name for p in vdir.iterdir()) == [MANIFEST_FILE, SIGNATURE_FILE, WEIGHTS_FILE]
    signer.verifier().verify(
        (vdir / MANIFEST_FILE).read_bytes(), (vdir / SIGNATURE_FILE).read_bytes(), "m"
    )
    assert_same_tensors(reader.load("ctr", m.version, expected_fingerprint=FP)[1], tensors(1))
    raw, sig = reader.manifest_bytes("ctr", m.version)
    assert reader.verify_manifest("ctr", m.version, raw, sig) == m


def test_unsigned_version_is_refused_by_load_install_and_verify(
    signed: tuple[Registry, Registry, Manifest], signer: Signer, tmp_path: Path
) -> None:
    _, reader, _ = signed
    plain = publish(Registry(reader.root), seed=2)
    where = rf"{_vdir(reader, plain)}/manifest\.json"
    message = (
        rf"^{where}: unsigned: expected manifest\.sig signed by key {signer.key_id}, got none$"
    )
    with pytest.raises(ArtifactError, match=message):
        reader.load("ctr", plain.version, expected_fingerprint=FP)
    raw, sig = reader.manifest_bytes("ctr", plain.version)
    assert sig is None
    with pytest.raises(ArtifactError, match=message):
        reader.verify_manifest("ctr", plain.version, raw, None)
    local = Registry(tmp_path / "local", verifier=signer.verifier())
    files = {WEIGHTS_FILE: (_vdir(reader, plain) / WEIGHTS_FILE).read_bytes()}
    with pytest.raises(ArtifactError, match=r"/local/ctr/v00000002/manifest\.json: unsigned: "):
        local.install("ctr", plain.version, raw, None, files)
    assert local.versions("ctr") == []
    # Without a verifier the same version loads.
    Registry(reader.root).load("ctr", plain.version, expected_fingerprint=FP)


def test_a_version_signed_by_another_key_is_refused(
    signed: tuple[Registry, Registry, Manifest], signer: Signer
) -> None:
    _, reader, _ = signed
    other = Signer.generate()
    m = publish(Registry(reader.root, signer=other), seed=2)
    with pytest.raises(
        ArtifactError,
        match=rf"manifest\.json: wrong signature: expected one by key {signer.key_id}, got one "
        rf"by key '{other.key_id}'",
    ):
        reader.load("ctr", m.version, expected_fingerprint=FP)


def test_tampered_manifest_bytes_are_refused(signed: tuple[Registry, Registry, Manifest]) -> None:
    _, reader, m = signed
    path = _vdir(reader, m) / MANIFEST_FILE
    doc = json.loads(path.read_bytes())
    doc["metrics"]["auc"] = 0.99
    path.write_text(json.dumps(doc, indent=2) + "\n")
    message = r"manifest\.json: wrong signature: the ed25519 signature by key \w+ does not match"
    with pytest.raises(ArtifactError, match=message):
        reader.load("ctr", m.version, expected_fingerprint=FP)
    with pytest.raises(ArtifactError, match=message):
        reader.load_resume("ctr", m.version)
    # A single added byte of whitespace is enough.
    _, sig = reader.manifest_bytes("ctr", m.version)
    assert reader.verify_manifest("ctr", m.version, m.to_json(), sig) == m  # the signed bytes
    with pytest.raises(ArtifactError, match=message):
        reader.verify_manifest("ctr", m.version, m.to_json() + b" ", sig)


def test_malformed_signature_file_is_refused(signed: tuple[Registry, Registry, Manifest]) -> None:
    _, reader, m = signed
    (_vdir(reader, m) / SIGNATURE_FILE).write_bytes(b'{"alg": "ed25519"}')
    with pytest.raises(
        ArtifactError,
        match=r"manifest\.json: wrong signature: expected manifest\.sig as JSON .*missing required "
        r"field `key_id`",
    ):
        reader.load("ctr", m.version, expected_fingerprint=FP)


def test_a_signature_moved_to_another_version_is_refused(
    signed: tuple[Registry, Registry, Manifest],
) -> None:
    publisher, reader, m = signed
    second = publish(publisher, seed=2)
    sig = (_vdir(reader, m) / SIGNATURE_FILE).read_bytes()
    (_vdir(reader, second) / SIGNATURE_FILE).write_bytes(sig)
    with pytest.raises(ArtifactError, match=r"v00000002/manifest\.json: wrong signature: the ed2"):
        reader.load("ctr", second.version, expected_fingerprint=FP)


def test_a_weights_file_that_is_a_pickle_is_never_unpickled(
    signed: tuple[Registry, Registry, Manifest], signer: Signer, tmp_path: Path
) -> None:
    """A signed manifest whose weights entry matches a pickle: the registry reads safetensors
    only, so the pickle is refused without running its code."""
    marker = tmp_path / "unpickled"
    _, reader, m = signed
    vdir = _vdir(reader, m)

    def replace_weights(payload: bytes) -> None:
        (vdir / WEIGHTS_FILE).write_bytes(payload)
        doc = json.loads((vdir / MANIFEST_FILE).read_bytes())
        entry = file_entry(payload, m.chunk_bytes)
        doc["files"] = {
            WEIGHTS_FILE: {"sha256": entry.sha256, "bytes": entry.bytes, "chunks": entry.chunks}
        }
        data = (json.dumps(doc, indent=2) + "\n").encode()
        (vdir / MANIFEST_FILE).write_bytes(data)
        (vdir / SIGNATURE_FILE).write_bytes(signer.sign(data))  # even when the key signed it

    refused = r"weights\.safetensors: expected safetensors data, got an unreadable file"
    payload = pickle.dumps(_Boom(str(marker)))
    replace_weights(payload)
    with pytest.raises(ArtifactError, match=refused):
        reader.load("ctr", m.version, expected_fingerprint=FP)
    assert not marker.exists()
    # A torch.save file (a zip of pickles) is refused the same way.
    saved = tmp_path / "saved.pt"
    torch.save({"w": torch.zeros(2)}, saved)
    replace_weights(saved.read_bytes())
    with pytest.raises(ArtifactError, match=refused):
        reader.load("ctr", m.version, expected_fingerprint=FP)
    # The payload is live: unpickling it does run its code.
    pickle.loads(payload).close()
    assert marker.exists()


class _Boom:
    """Unpickling it would create a file: a stand-in for code a pickle can run."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.path, "w"))


def test_key_id_is_the_hash_of_the_raw_public_key(signer: Signer) -> None:
    import hashlib

    from cryptography.hazmat.primitives import serialization

    pem = signer.public_key_pem()
    key = serialization.load_pem_public_key(pem)
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert key_id(key) == hashlib.sha256(raw).hexdigest()[:16] == signer.key_id  # type: ignore[arg-type]


def test_install_keeps_the_signature_it_got_and_never_signs(
    signed: tuple[Registry, Registry, Manifest], signer: Signer, tmp_path: Path
) -> None:
    _, reader, m = signed
    plain = publish(Registry(reader.root), seed=2)
    mirror = Registry(tmp_path / "mirror", signer=Signer.generate())
    for version in (m.version, plain.version):
        raw, sig = reader.manifest_bytes("ctr", version)
        files = {WEIGHTS_FILE: (reader.root / "ctr" / version / WEIGHTS_FILE).read_bytes()}
        mirror.install("ctr", version, raw, sig, files)
        assert mirror.manifest_bytes("ctr", version) == (raw, sig)
    assert mirror.manifest_bytes("ctr", plain.version)[1] is None


def test_an_install_that_loses_a_race_with_a_prune_is_named(
    signed: tuple[Registry, Registry, Manifest], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, reader, m = signed
    raw, sig = reader.manifest_bytes("ctr", m.version)
    files = {WEIGHTS_FILE: (reader.root / "ctr" / m.version / WEIGHTS_FILE).read_bytes()}
    local = Registry(tmp_path / "local")
    # The version was there when the commit tried its name, and gone when checked again.
    monkeypatch.setattr(local._store, "commit", lambda *args: None)
    with pytest.raises(
        ArtifactError,
        match=r"v00000001/manifest\.json: expected to install ctr v00000001, got a version that "
        r"appeared and vanished meanwhile",
    ):
        local.install("ctr", m.version, raw, sig, files)
