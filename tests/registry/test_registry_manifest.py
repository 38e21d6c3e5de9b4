"""The manifest: its frozen JSON contract, round trip and validation messages."""

from __future__ import annotations

import dataclasses
import doctest
import json

import pytest

import minutely.registry.delta as delta_mod
import minutely.registry.manifest as manifest_mod
import minutely.registry.signing as signing_mod
import minutely.registry.store as store_mod
from minutely.errors import ArtifactError
from minutely.registry import (
    DELTA_FILE,
    MANIFEST_VERSION,
    SUPPORTED_MANIFEST_VERSIONS,
    WEIGHTS_FILE,
    FileEntry,
    Manifest,
    chunk_count,
    format_version,
    parse_version,
)


def _manifest(**changes: object) -> Manifest:
    m = Manifest(
        manifest_version=1,
        model="ctr",
        version="v00000007",
        parent="v00000006",
        base="v00000001",
        created_ms=1_767_225_600_000,
        arch="deepfm",
        model_config={"arch": "deepfm", "hidden": [8, 4]},
        feature_schema={"version": 1, "features": [{"name": "a", "kind": "dense"}]},
        schema_fingerprint="0123456789abcdef",
        metrics={"auc": 0.75, "logloss": 0.4},
        samples_seen=12_345,
        files={"weights.safetensors": FileEntry(sha256="ab" * 32, bytes=1024)},
    )
    return dataclasses.replace(m, **changes)  # type: ignore[arg-type]


def test_manifest_fields_and_types_are_frozen() -> None:
    # The manifest is a public contract: changing it means a new manifest_version.
    assert [(f.name, f.type) for f in dataclasses.fields(Manifest)] == [
        ("manifest_version", "int"),
        ("model", "str"),
        ("version", "str"),
        ("parent", "str | None"),
        ("base", "str | None"),
        ("created_ms", "int"),
        ("arch", "str"),
        ("model_config", "dict[str, Any]"),
        ("feature_schema", "dict[str, Any]"),
        ("schema_fingerprint", "str"),
        ("metrics", "dict[str, float]"),
        ("samples_seen", "int"),
        ("files", "dict[str, FileEntry]"),
        ("mode", "str | None"),
        ("warm_start", "bool"),
        ("resume", "dict[str, FileEntry]"),
        ("resume_positions", "dict[str, int]"),
        ("chunk_bytes", "int"),
        ("delta_of", "str | None"),
        ("chain", "int"),
    ]
    assert [(f.name, f.type) for f in dataclasses.fields(FileEntry)] == [
        ("sha256", "str"),
        ("bytes", "int"),
        ("chunks", "list[str]"),
    ]
    assert MANIFEST_VERSION == 3
    assert set(SUPPORTED_MANIFEST_VERSIONS) == {1, 2, 3}
    assert Manifest.__dataclass_params__.frozen  # type: ignore[attr-defined]


def test_manifest_json_document_shape() -> None:
    doc = json.loads(_manifest().to_json())
    assert list(doc) == [f.name for f in dataclasses.fields(Manifest)]
    assert doc["files"] == {
        "weights.safetensors": {"sha256": "ab" * 32, "bytes": 1024, "chunks": []}
    }
    assert doc["parent"] == "v00000006"
    assert doc["metrics"] == {"auc": 0.75, "logloss": 0.4}


def test_manifest_round_trip_is_exact() -> None:
    m = _manifest()
    assert Manifest.from_json(m.to_json()) == m
    assert Manifest.from_json(m.to_json()).to_json() == m.to_json()
    none_refs = _manifest(parent=None, base=None)
    assert Manifest.from_json(none_refs.to_json()) == none_refs


def test_integer_metrics_read_as_floats() -> None:
    doc = json.loads(_manifest().to_json())
    doc["metrics"] = {"auc": 1}
    m = Manifest.from_json(json.dumps(doc).encode())
    assert m.metrics == {"auc": 1.0}
    assert isinstance(m.metrics["auc"], float)


def test_invalid_json_names_the_source() -> None:
    with pytest.raises(ArtifactError, match=r"^/x/manifest\.json: expected a JSON manifest, got"):
        Manifest.from_json(b'{"manifest_version": 1,', source="/x/manifest.json")


def test_non_object_json_is_refused() -> None:
    with pytest.raises(ArtifactError, match=r"m\.json: expected a JSON object, got list"):
        Manifest.from_json(b"[1, 2]", source="m.json")


@pytest.mark.parametrize("mv", [4, 0, "1", None, True])
def test_unsupported_manifest_version_is_refused(mv: object) -> None:
    doc = json.loads(_manifest().to_json())
    doc["manifest_version"] = mv
    with pytest.raises(
        ArtifactError,
        match=rf"m\.json: unsupported manifest_version: expected one of \[1, 2, 3\], got {mv!r}",
    ):
        Manifest.from_json(json.dumps(doc).encode(), source="m.json")


def test_missing_manifest_version_is_refused() -> None:
    doc = json.loads(_manifest().to_json())
    del doc["manifest_version"]
    with pytest.raises(ArtifactError, match=r"unsupported manifest_version: .* got None"):
        Manifest.from_json(json.dumps(doc).encode())


def test_field_of_wrong_type_is_named() -> None:
    doc = json.loads(_manifest().to_json())
    doc["created_ms"] = "yesterday"
    with pytest.raises(
        ArtifactError,
        match=r"m\.json: malformed manifest: Expected `int`, got `str` - at `\$.created_ms`",
    ):
        Manifest.from_json(json.dumps(doc).encode(), source="m.json")


def test_missing_field_is_named() -> None:
    doc = json.loads(_manifest().to_json())
    del doc["files"]["weights.safetensors"]["sha256"]
    with pytest.raises(
        ArtifactError, match=r"malformed manifest: .*missing required field `sha256`"
    ):
        Manifest.from_json(json.dumps(doc).encode())


def test_bad_version_name_in_manifest_is_refused() -> None:
    doc = json.loads(_manifest().to_json())
    doc["version"] = "../v1"
    with pytest.raises(
        ArtifactError, match=r"version: expected 'v' and at least 8 digits, got '\.\./v1'"
    ):
        Manifest.from_json(json.dumps(doc).encode())


def test_version_names() -> None:
    assert format_version(42) == "v00000042"
    assert parse_version("v00000042") == 42
    assert parse_version("v123456789") == 123_456_789
    assert sorted([format_version(10), format_version(9)]) == ["v00000009", "v00000010"]
    with pytest.raises(ArtifactError, match=r"version number: expected an int >= 1, got 0"):
        format_version(0)
    with pytest.raises(
        ArtifactError, match=r"version: expected 'v' and at least 8 digits, got 'v42'"
    ):
        parse_version("v42")


@pytest.mark.parametrize("module", [manifest_mod, store_mod, signing_mod, delta_mod])
def test_docstring_examples_run(module: object) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)  # type: ignore[arg-type]
    assert result.attempted > 0
    assert result.failed == 0


def test_version_1_manifest_reads_with_no_resume_state() -> None:
    doc = json.loads(_manifest().to_json())
    for name in ("mode", "warm_start", "resume", "resume_positions"):
        del doc[name]
    doc["manifest_version"] = 1
    m = Manifest.from_json(json.dumps(doc).encode())
    assert (m.mode, m.warm_start, m.resume, m.resume_positions) == (None, False, {}, {})


def test_warm_start_fields_round_trip() -> None:
    m = _manifest(
        mode="day",
        warm_start=True,
        resume={"training_state.bin": FileEntry(sha256="cd" * 32, bytes=99)},
        resume_positions={"0": 12, "1": 7},
    )
    assert Manifest.from_json(m.to_json()) == m
    doc = json.loads(m.to_json())
    assert doc["resume"] == {"training_state.bin": {"sha256": "cd" * 32, "bytes": 99, "chunks": []}}


# --- version 3: chunk digests and deltas -------------------------------------------------------


def _v3(**changes: object) -> Manifest:
    files = {WEIGHTS_FILE: FileEntry(sha256="ab" * 32, bytes=10, chunks=["01" * 32] * 3)}
    base = {"manifest_version": 3, "files": files, "chunk_bytes": 4}
    return _manifest(**{**base, **changes})


def test_version_3_fields_round_trip() -> None:
    m = _v3()
    assert Manifest.from_json(m.to_json()) == m
    doc = json.loads(m.to_json())
    assert doc["files"][WEIGHTS_FILE]["chunks"] == ["01" * 32] * 3
    assert (doc["chunk_bytes"], doc["delta_of"], doc["chain"]) == (4, None, 0)
    assert m.weights_file == WEIGHTS_FILE
    delta = _v3(
        files={DELTA_FILE: FileEntry(sha256="cd" * 32, bytes=4, chunks=["02" * 32])},
        delta_of="v00000005",
        chain=2,
    )
    assert Manifest.from_json(delta.to_json()) == delta
    assert delta.weights_file == DELTA_FILE


def test_version_2_manifest_reads_as_a_full_version_without_chunks() -> None:
    doc = json.loads(_manifest(manifest_version=2, mode="online").to_json())
    for name in ("chunk_bytes", "delta_of", "chain"):
        del doc[name]
    del doc["files"][WEIGHTS_FILE]["chunks"]
    m = Manifest.from_json(json.dumps(doc).encode())
    assert (m.chunk_bytes, m.delta_of, m.chain, m.files[WEIGHTS_FILE].chunks) == (0, None, 0, [])
    assert m.mode == "online"


def test_chunk_count() -> None:
    assert [chunk_count(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"chunk_bytes": 0}, r"chunk_bytes: expected >= 1 in manifest version 3, got 0"),
        ({"chunk_bytes": -1}, r"chunk_bytes: expected >= 0, got -1"),
        (
            {"chunk_bytes": 3},
            r"files\['weights.safetensors'\]\.chunks: expected 4 digests for 10 bytes in chunks "
            r"of 3, got 3",
        ),
        (
            {"manifest_version": 2, "chunk_bytes": 0},
            r"files\['weights.safetensors'\]\.chunks: expected none without chunk_bytes, got 3",
        ),
        ({"chain": 1}, r"chain: expected 0 for a full version \(delta_of null\), got 1"),
        (
            {"delta_of": "v00000007", "chain": 1},
            r"delta_of: expected an earlier version than 'v00000007', got 'v00000007'",
        ),
        (
            {"delta_of": "latest", "chain": 1},
            r"delta_of: expected an earlier version than 'v00000007', got 'latest'",
        ),
        (
            {"delta_of": "v00000006", "chain": 0},
            r"chain: expected >= 1 for a delta version \(delta_of 'v00000006'\), got 0",
        ),
    ],
)
def test_inconsistent_version_3_fields_are_refused(
    changes: dict[str, object], message: str
) -> None:
    doc = json.loads(_v3().to_json())
    doc.update(changes)
    with pytest.raises(ArtifactError, match=rf"^m\.json: {message}$"):
        Manifest.from_json(json.dumps(doc).encode(), source="m.json")
