"""The same registry behaviour on every backend: a folder, fsspec's memory store, a real S3 server.

Chunk digests, raw manifests, byte ranges, installing a version received from elsewhere,
signatures, deltas, the rollback pointer and pruning; on object stores also that a version is
visible only once its manifest exists.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from registry_helpers import (
    FP,
    Place,
    assert_same_tensors,
    local_place,
    memory_place,
    publish,
    tensors,
)

from minutely.errors import ArtifactError, ChecksumMismatchError, StorageError
from minutely.registry import (
    DELTA_FILE,
    MANIFEST_FILE,
    MANIFEST_VERSION,
    POINTER_FILE,
    SIGNATURE_FILE,
    WEIGHTS_FILE,
    Registry,
    Signer,
    chunk_count,
)
from s3_server import S3Server, new_bucket, s3_storage_options


@pytest.fixture(
    params=["local", "memory", pytest.param("s3", marks=pytest.mark.integration)],
)
def place(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Place]:
    if request.param == "local":
        yield local_place(tmp_path)
    elif request.param == "memory":
        mem = memory_place()
        yield mem
        top = mem.path("").rstrip("/")
        if mem.fs.exists(top):  # the memory store lives as long as the process
            mem.fs.rm(top, recursive=True)
    else:
        endpoint: str = request.getfixturevalue("s3_endpoint")
        bucket = new_bucket(endpoint)
        yield Place("s3", f"s3://{bucket}/models", s3_storage_options(endpoint))


@pytest.fixture
def reg(place: Place) -> Registry:
    return place.registry(chunk_bytes=64)


def test_publish_then_load_round_trips_with_chunk_digests(place: Place, reg: Registry) -> None:
    m = publish(reg, seed=3, parent="v00000002", base="v00000001")
    assert (m.version, m.manifest_version, m.chunk_bytes) == ("v00000001", MANIFEST_VERSION, 64)
    assert (m.delta_of, m.chain) == (None, 0)
    data = place.get(f"ctr/{m.version}/{WEIGHTS_FILE}")
    entry = m.files[WEIGHTS_FILE]
    assert (entry.bytes, entry.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert len(entry.chunks) == chunk_count(len(data), 64) > 1
    assert entry.chunks == [
        hashlib.sha256(data[i : i + 64]).hexdigest() for i in range(0, len(data), 64)
    ]
    loaded, got = reg.load("ctr", m.version, expected_fingerprint=FP)
    assert loaded == m
    assert reg.manifest("ctr", m.version) == m
    assert_same_tensors(got, tensors(3))
    assert place.files(f"ctr/{m.version}") == [MANIFEST_FILE, WEIGHTS_FILE]


def test_versions_latest_and_a_fresh_instance_agree(place: Place, reg: Registry) -> None:
    assert reg.versions("ctr") == []
    assert reg.latest("ctr") is None
    made = [publish(reg, seed=i).version for i in range(3)]
    assert made == ["v00000001", "v00000002", "v00000003"]
    other = place.registry()
    assert other.versions("ctr") == made
    latest = other.latest("ctr")
    assert latest is not None
    assert latest.version == "v00000003"
    assert publish(reg, model="cvr").version == "v00000001"


def test_manifest_bytes_are_the_raw_files(place: Place, reg: Registry) -> None:
    m = publish(reg)
    raw, sig = reg.manifest_bytes("ctr", m.version)
    assert raw == place.get(f"ctr/{m.version}/{MANIFEST_FILE}") == m.to_json()
    assert sig is None
    signer = Signer.generate()
    signed = publish(place.registry(signer=signer), seed=1)
    raw, sig = reg.manifest_bytes("ctr", signed.version)
    assert sig == place.get(f"ctr/{signed.version}/{SIGNATURE_FILE}")
    signer.verifier().verify(raw, sig, "here")
    with pytest.raises(
        ArtifactError, match=r"v00000009/manifest\.json: expected a manifest, got no"
    ):
        reg.manifest_bytes("ctr", "v00000009")


def test_read_range_returns_the_bytes_of_a_chunk(place: Place, reg: Registry) -> None:
    m = publish(reg)
    data = place.get(f"ctr/{m.version}/{WEIGHTS_FILE}")
    for i, digest in enumerate(m.files[WEIGHTS_FILE].chunks):
        chunk = reg.read_range("ctr", m.version, WEIGHTS_FILE, i * 64, 64)
        assert hashlib.sha256(chunk).hexdigest() == digest
    assert reg.read_range("ctr", m.version, WEIGHTS_FILE, len(data) - 5, 64) == data[-5:]
    assert reg.read_range("ctr", m.version, WEIGHTS_FILE, 3, 0) == b""
    assert reg.read_range("ctr", m.version, WEIGHTS_FILE, len(data), 10) == b""
    assert reg.read_range("ctr", m.version, WEIGHTS_FILE, len(data) + 10, 10) == b""
    with pytest.raises(ArtifactError, match=r"v00000001/nope\.bin: expected a file of the version"):
        reg.read_range("ctr", m.version, "nope.bin", 0, 10)
    with pytest.raises(ArtifactError, match=r"expected start >= 0 and length >= 0, got start -1"):
        reg.read_range("ctr", m.version, WEIGHTS_FILE, -1, 10)
    with pytest.raises(ArtifactError, match=r"file: expected a plain file name, got '\.\./x'"):
        reg.read_range("ctr", m.version, "../x", 0, 10)


def _received(reg: Registry, version: str) -> tuple[bytes, bytes | None, dict[str, bytes]]:
    raw, sig = reg.manifest_bytes("ctr", version)
    manifest = reg.manifest("ctr", version)
    files = {
        name: reg.read_range("ctr", version, name, 0, e.bytes) for name, e in manifest.files.items()
    }
    return raw, sig, files


def test_install_copies_a_version_into_another_registry(
    place: Place, reg: Registry, tmp_path: Path
) -> None:
    signer = Signer.generate()
    origin = place.registry(signer=signer, chunk_bytes=64)
    publish(origin, seed=1)
    m = publish(origin, seed=2)
    local = Registry(tmp_path / "local", verifier=signer.verifier())
    raw, sig, files = _received(origin, m.version)
    installed = local.install("ctr", m.version, raw, sig, files)
    assert installed == m
    assert local.versions("ctr") == [m.version]  # under its own name, not renumbered
    assert local.manifest_bytes("ctr", m.version) == (raw, sig)
    assert_same_tensors(local.load("ctr", m.version, expected_fingerprint=FP)[1], tensors(2))
    # Installing the same version again is a no-op.
    assert local.install("ctr", m.version, raw, sig, files) == m
    # Into an object store too (the other direction).
    back = place.registry(verifier=signer.verifier())
    mirror = Registry(tmp_path / "mirror")
    first = mirror.install("ctr", "v00000001", *_received(origin, "v00000001"))
    assert first.version == "v00000001"
    assert back.manifest("ctr", "v00000001") == first


def test_install_refuses_a_different_version_under_a_taken_name(
    place: Place, reg: Registry
) -> None:
    m = publish(reg, seed=1)
    raw, _, files = _received(reg, m.version)
    other = dataclasses.replace(m, samples_seen=1)
    with pytest.raises(
        ArtifactError,
        match=r"v00000001/manifest\.json: expected no version v00000001 of 'ctr' here or the "
        r"same one, got one with a different manifest",
    ):
        reg.install("ctr", m.version, other.to_json(), None, files)
    assert reg.manifest_bytes("ctr", m.version)[0] == raw


def _as_files(files: dict[str, bytes], folder: Path) -> dict[str, bytes | Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, bytes | Path] = {}
    for name, data in files.items():
        (folder / name).write_bytes(data)
        out[name] = folder / name
    return out


def test_install_from_files_verifies_and_links_them_without_reading_them_whole(
    place: Place, reg: Registry, tmp_path: Path
) -> None:
    signer = Signer.generate()
    origin = Registry(tmp_path / "origin", signer=signer, chunk_bytes=64)
    m = publish(origin, seed=3)
    raw, sig, files = _received(origin, m.version)
    sources = _as_files(files, tmp_path / "received")
    target = place.registry(verifier=signer.verifier())
    assert target.install("ctr", m.version, raw, sig, sources) == m
    assert target.read_range("ctr", m.version, WEIGHTS_FILE, 0, 1 << 30) == files[WEIGHTS_FILE]
    assert_same_tensors(target.load("ctr", m.version, expected_fingerprint=FP)[1], tensors(3))
    source = sources[WEIGHTS_FILE]
    assert isinstance(source, Path)
    assert source.read_bytes() == files[WEIGHTS_FILE]
    local = Registry(tmp_path / "local", verifier=signer.verifier())
    local.install("ctr", m.version, raw, sig, sources)
    linked = tmp_path / "local" / "ctr" / m.version / WEIGHTS_FILE
    assert linked.stat().st_ino == source.stat().st_ino  # a folder links: no bytes copied


@pytest.mark.parametrize("as_files", [False, True], ids=["bytes", "files"])
def test_install_checks_everything_before_writing(
    place: Place, reg: Registry, tmp_path: Path, as_files: bool
) -> None:
    m = publish(reg, seed=1)
    raw, sig, files = _received(reg, m.version)
    target = place.registry()
    data = files[WEIGHTS_FILE]
    flipped = bytes([data[0] ^ 1]) + data[1:]
    cases: list[tuple[str, bytes, dict[str, bytes], str]] = [
        ("v00000002", raw, files, r"expected model 'ctr' version 'v00000002', got model 'ctr' "),
        (m.version, raw, {}, r"files: expected exactly \['weights\.safetensors'\], got \[\]"),
        (
            m.version,
            raw,
            {**files, "extra.bin": b"x"},
            r"files: expected exactly \['weights\.safetensors'\], got \['extra\.bin', 'weights",
        ),
        (m.version, raw, {WEIGHTS_FILE: data[:-1]}, r"expected \d+ bytes with sha256 \w+, got"),
        (
            m.version,
            raw,
            {WEIGHTS_FILE: flipped},
            r"weights\.safetensors: expected sha256 \w+, got",
        ),
        (m.version, b"{", files, r"manifest\.json: expected a JSON manifest, got invalid JSON"),
    ]
    for i, (version, manifest_json, given, message) in enumerate(cases):
        model = f"m{i}"
        doc = manifest_json.replace(b'"model": "ctr"', f'"model": "{model}"'.encode())
        message = message.replace("'ctr'", f"'{model}'")
        sources = _as_files(given, tmp_path / str(i)) if as_files else given
        with pytest.raises(ArtifactError, match=message):
            target.install(model, version, doc, sig, sources)
        assert target.versions(model) == []
        assert place.files(model) == []


def test_install_refuses_chunk_digests_that_do_not_match(place: Place, reg: Registry) -> None:
    m = publish(reg, seed=1)
    _, _, files = _received(reg, m.version)
    entry = m.files[WEIGHTS_FILE]
    bad = dataclasses.replace(entry, chunks=[entry.chunks[1], *entry.chunks[1:]])
    doc = dataclasses.replace(m, model="cvr", files={WEIGHTS_FILE: bad}).to_json()
    with pytest.raises(
        ChecksumMismatchError, match=r"weights\.safetensors: chunk 0: expected sha256"
    ):
        reg.install("cvr", m.version, doc, None, files)
    assert reg.versions("cvr") == []


def test_signed_versions_load_and_unsigned_ones_are_refused(place: Place) -> None:
    signer = Signer.generate()
    publisher = place.registry(signer=signer)
    signed = publish(publisher, seed=1)
    unsigned = publish(place.registry(), seed=2)
    reader = place.registry(verifier=signer.verifier())
    assert_same_tensors(reader.load("ctr", signed.version, expected_fingerprint=FP)[1], tensors(1))
    with pytest.raises(
        ArtifactError,
        match=rf"v00000002/manifest\.json: unsigned: expected manifest\.sig signed by key "
        rf"{signer.key_id}, got none",
    ):
        reader.load("ctr", unsigned.version, expected_fingerprint=FP)
    # A manifest changed after signing.
    path = f"ctr/{signed.version}/{MANIFEST_FILE}"
    place.put(path, place.get(path).replace(b'"samples_seen": 100', b'"samples_seen": 101'))
    with pytest.raises(ArtifactError, match=r"v00000001/manifest\.json: wrong signature: "):
        reader.load("ctr", signed.version, expected_fingerprint=FP)


def test_pin_unpin_and_serving_version(place: Place, reg: Registry) -> None:
    reg.unpin("ctr")  # nothing published yet: harmless
    assert reg.serving_version("ctr") is None
    for i in range(3):
        publish(reg, seed=i)
    reg.pin("ctr", "v00000001")
    assert json.loads(place.get(f"ctr/{POINTER_FILE}")) == {"pinned": "v00000001"}
    assert place.registry().serving_version("ctr") == "v00000001"
    publish(reg, seed=3)
    assert reg.serving_version("ctr") == "v00000001"
    reg.unpin("ctr")
    assert reg.pinned("ctr") is None
    assert reg.serving_version("ctr") == "v00000004"
    with pytest.raises(ArtifactError, match=r"v00000009/manifest\.json: expected a manifest"):
        reg.pin("ctr", "v00000009")


def test_prune_keeps_newest_pinned_and_bases(place: Place, reg: Registry) -> None:
    publish(reg, seed=0)  # v1: the day model
    for i in range(1, 6):
        publish(reg, seed=i, base="v00000001")
    reg.pin("ctr", "v00000003")
    assert reg.prune("ctr", keep=2) == ["v00000002", "v00000004"]
    assert reg.versions("ctr") == ["v00000001", "v00000003", "v00000005", "v00000006"]
    assert {f.split("/")[0] for f in place.files("ctr")} == {
        POINTER_FILE,
        "v00000001",
        "v00000003",
        "v00000005",
        "v00000006",
    }
    assert publish(reg, seed=9).version == "v00000007"


def test_warm_start_resume_state_round_trips(place: Place, reg: Registry) -> None:
    warm = publish(reg, warm_start=True, mode="day", resume={"training_state.bin": b"state"})
    assert warm.resume["training_state.bin"].chunks == []  # never distributed
    manifest, blobs = reg.load_resume("ctr", warm.version)
    assert (manifest, blobs) == (warm, {"training_state.bin": b"state"})
    assert reg.warm_start_versions("ctr") == [warm.version]


def test_a_delta_version_loads_through_its_chain(place: Place, reg: Registry) -> None:
    big = {"emb": torch.randn(400, 8), "bias": torch.zeros(1)}
    full = publish(reg, weights=big)
    new = {"emb": big["emb"].clone(), "bias": torch.ones(1)}
    new["emb"][[3, 77]] += 1.0
    delta = publish(reg, seed=1, weights=new, delta_from=(full.version, big))
    assert (delta.delta_of, delta.chain, sorted(delta.files)) == (full.version, 1, [DELTA_FILE])
    assert place.files(f"ctr/{delta.version}") == [DELTA_FILE, MANIFEST_FILE]
    assert_same_tensors(
        place.registry().load("ctr", delta.version, expected_fingerprint=FP)[1], new
    )


# --- object stores: visibility is the manifest ---------------------------------------------------


def _object_store(place: Place) -> None:
    if place.kind == "local":
        pytest.skip("a folder makes a version visible by renaming it, not by its manifest")


def test_a_version_without_its_manifest_is_invisible(place: Place, reg: Registry) -> None:
    _object_store(place)
    publish(reg)
    # What a publisher that died before its manifest leaves behind.
    place.put(f"ctr/v00000002/{WEIGHTS_FILE}", b"partial")
    place.put(f"ctr/v00000002/{DELTA_FILE}", b"partial")
    assert reg.versions("ctr") == ["v00000001"]
    assert reg.serving_version("ctr") == "v00000001"
    with pytest.raises(ArtifactError, match=r"v00000002/manifest\.json: expected a manifest"):
        reg.load("ctr", "v00000002", expected_fingerprint=FP)
    # The next publish takes the number and replaces the partial file.
    m = publish(reg, seed=1)
    assert m.version == "v00000002"
    assert place.files("ctr/v00000002") == [MANIFEST_FILE, WEIGHTS_FILE]
    assert_same_tensors(reg.load("ctr", m.version, expected_fingerprint=FP)[1], tensors(1))


def test_prune_deletes_the_manifest_first_and_sweeps_leftovers(place: Place, reg: Registry) -> None:
    _object_store(place)
    for i in range(3):
        publish(reg, seed=i)
    # A prune that died after deleting v1's manifest: its data is left without one.
    place.delete(f"ctr/v00000001/{MANIFEST_FILE}")
    assert reg.versions("ctr") == ["v00000002", "v00000003"]
    assert reg.prune("ctr", keep=1) == ["v00000002"]
    assert place.files("ctr") == [f"v00000003/{MANIFEST_FILE}", f"v00000003/{WEIGHTS_FILE}"]


def test_the_root_of_an_object_store_registry_is_not_a_folder(place: Place, reg: Registry) -> None:
    _object_store(place)
    assert not reg.is_local
    assert reg.location == str(place.root)
    with pytest.raises(StorageError, match=r"expected a local folder, got an object-store URL"):
        _ = reg.root


# --- opening and failing -------------------------------------------------------------------------


def test_bad_registry_arguments_are_named(tmp_path: Path) -> None:
    with pytest.raises(
        StorageError,
        match=r"^registry nosuchfs://x: expected a local folder or a URL of a file system fsspec "
        r"can open \(s3://, memory://, \.\.\.\), got ValueError: ",
    ):
        Registry("nosuchfs://x")
    with pytest.raises(
        StorageError,
        match=rf"^registry {tmp_path}: expected storage_options only with an object-store URL, "
        r"got \['key'\] for a local folder",
    ):
        Registry(tmp_path, storage_options={"key": "x"})
    with pytest.raises(ArtifactError, match=r"registry chunk_bytes: expected an int >= 1, got 0"):
        Registry(tmp_path, chunk_bytes=0)
    local = Registry(f"file://{tmp_path}/reg")
    assert local.is_local
    assert local.root == tmp_path / "reg"


@pytest.mark.integration
def test_publishing_to_a_missing_bucket_names_the_object(s3_endpoint: str) -> None:
    reg = Registry("s3://no-such-bucket-here/m", storage_options=s3_storage_options(s3_endpoint))
    with pytest.raises(
        StorageError,
        match=r"^s3://no-such-bucket-here/m/ctr/v00000001/weights\.safetensors: expected to write "
        r"\d+ bytes, got FileNotFoundError: ",
    ):
        publish(reg)
    assert reg.versions("ctr") == []


@pytest.mark.integration
@pytest.mark.slow
def test_an_unreachable_store_is_an_os_error_a_reader_retries() -> None:
    """The server's poller counts an OSError as transient and an ArtifactError as a refusal."""
    server = S3Server()
    server.start()
    try:
        reg = Registry(
            f"s3://{new_bucket(server.endpoint)}/m", storage_options=server.storage_options()
        )
        publish(reg)
    finally:
        server.stop()
    with pytest.raises(OSError, match=r"/m/ctr/v00000001/manifest\.json: EndpointConnectionError"):
        reg.load("ctr", "v00000001", expected_fingerprint=FP)
    with pytest.raises(OSError, match=r"/m/ctr/v00000001/weights\.safetensors: EndpointConnect"):
        reg.read_range("ctr", "v00000001", WEIGHTS_FILE, 0, 10)
