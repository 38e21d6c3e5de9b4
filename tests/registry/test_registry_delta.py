"""Sparse deltas: encoding round trips bit for bit, and delta versions in the registry (size,
chain bound, resolution through the chain, refusals naming the broken link, pruning)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from registry_helpers import FP, assert_same_tensors, publish

from minutely.errors import ArtifactError
from minutely.registry import (
    DELTA_FILE,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    Manifest,
    Registry,
    Signer,
    apply_delta,
    make_delta,
)


def _model(rows: int = 1000, dim: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "emb.weight": torch.randn(rows, dim, generator=g),
        "mlp.weight": torch.randn(8, dim, generator=g),
        "mlp.bias": torch.randn(8, generator=g),
        "steps": torch.tensor(7, dtype=torch.int64),
    }


def _changed(
    model: dict[str, torch.Tensor], rows: list[int], seed: int = 1
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {k: v.clone() for k, v in model.items()}
    out["emb.weight"][rows] += torch.randn(len(rows), model["emb.weight"].shape[1], generator=g)
    return out


# --- encoding ------------------------------------------------------------------------------------


def test_sparse_row_changes_round_trip_and_leave_the_parent_alone() -> None:
    parent = _model()
    before = {k: v.clone() for k, v in parent.items()}
    new = _changed(parent, [5, 17, 999])
    delta = make_delta(parent, new)
    assert delta is not None
    assert sorted(delta) == ["emb.weight::rows", "emb.weight::values"]
    assert delta["emb.weight::rows"].tolist() == [5, 17, 999]
    assert delta["emb.weight::rows"].dtype == torch.int64
    assert torch.equal(delta["emb.weight::values"], new["emb.weight"][[5, 17, 999]])
    out = apply_delta(parent, delta)
    assert_same_tensors(out, new)
    assert_same_tensors(parent, before)


def test_dense_changes_are_stored_in_full() -> None:
    parent = _model(rows=10)
    new = _changed(parent, list(range(5)))  # half the rows: not fewer than half
    new["mlp.bias"] = new["mlp.bias"] + 1
    new["steps"] = torch.tensor(8, dtype=torch.int64)
    delta = make_delta(parent, new)
    assert delta is not None
    assert sorted(delta) == ["emb.weight", "mlp.bias", "steps"]
    assert_same_tensors(apply_delta(parent, delta), new)


def test_unchanged_tensors_make_an_empty_delta() -> None:
    parent = _model()
    delta = make_delta(parent, {k: v.clone() for k, v in parent.items()})
    assert delta == {}
    assert_same_tensors(apply_delta(parent, {}), parent)


def test_changes_are_compared_bit_for_bit() -> None:
    parent = {"w": torch.tensor([[0.0, 1.0], [float("nan"), 2.0], [3.0, 4.0]])}
    same_nan = {"w": parent["w"].clone()}
    assert make_delta(parent, same_nan) == {}
    signed_zero = {"w": parent["w"].clone()}
    signed_zero["w"][0, 0] = -0.0
    delta = make_delta(parent, signed_zero)
    assert delta is not None
    assert delta["w::rows"].tolist() == [0]
    assert_same_tensors(apply_delta(parent, delta), signed_zero)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int32, torch.bool])
def test_other_dtypes_round_trip(dtype: torch.dtype) -> None:
    parent = {"t": torch.zeros(6, 3, dtype=dtype), "e": torch.zeros(0, 3, dtype=dtype)}
    new = {"t": parent["t"].clone(), "e": parent["e"].clone()}
    new["t"][4] = torch.ones(3, dtype=dtype)
    delta = make_delta(parent, new)
    assert delta is not None
    assert sorted(delta) == ["t::rows", "t::values"]
    assert_same_tensors(apply_delta(parent, delta), new)


@pytest.mark.parametrize(
    "change",
    ["shape", "dtype", "missing", "extra", "separator"],
)
def test_no_delta_between_different_layouts(change: str) -> None:
    parent = _model(rows=10)
    new = {k: v.clone() for k, v in parent.items()}
    if change == "shape":
        new["emb.weight"] = torch.zeros(11, 16)
    elif change == "dtype":
        new["mlp.bias"] = new["mlp.bias"].double()
    elif change == "missing":
        del new["steps"]
    elif change == "extra":
        new["more"] = torch.zeros(1)
    else:
        parent["a::b"] = torch.zeros(1)
        new["a::b"] = torch.ones(1)
    assert make_delta(parent, new) is None


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 12),
    dim=st.integers(1, 4),
    changed=st.lists(st.integers(0, 11), max_size=12),
    seed=st.integers(0, 1000),
)
def test_apply_of_make_rebuilds_any_change(
    rows: int, dim: int, changed: list[int], seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    parent = {"m": torch.randn(rows, dim, generator=g), "v": torch.randn(dim, generator=g)}
    new = {k: v.clone() for k, v in parent.items()}
    picked = sorted({r for r in changed if r < rows})
    if picked:
        new["m"][picked] = torch.randn(len(picked), dim, generator=g)
    if seed % 2:
        new["v"] = new["v"] * 2
    delta = make_delta(parent, new)
    assert delta is not None
    assert_same_tensors(apply_delta(parent, delta), new)


@pytest.mark.parametrize(
    ("delta", "message"),
    [
        ({"nope": torch.zeros(1)}, r"delta 'nope': expected a tensor 'nope' in the parent, got"),
        ({"w": torch.zeros(2, 2)}, r"delta 'w': expected shape \[4, 2\] torch.float32 like the"),
        ({"w": torch.zeros(4, 2).double()}, r"delta 'w': expected shape \[4, 2\] torch\.float32"),
        (
            {"w::rows": torch.tensor([1])},
            r"delta 'w::rows': expected it with 'w::values', got none",
        ),
        (
            {"w::values": torch.zeros(1, 2)},
            r"delta 'w::values': expected it with 'w::rows', got no row indices",
        ),
        (
            {"w::rows": torch.tensor([4]), "w::values": torch.zeros(1, 2)},
            r"delta 'w::rows': expected row indices in \[0, 4\), got \[4, 4\]",
        ),
        (
            {"w::rows": torch.tensor([1], dtype=torch.int32), "w::values": torch.zeros(1, 2)},
            r"delta 'w::rows': expected a 1-d int64 tensor, got shape \[1\] torch\.int32",
        ),
        (
            {"w::rows": torch.tensor([1, 2]), "w::values": torch.zeros(1, 2)},
            r"delta 'w::values': expected shape \[2, 2\] torch\.float32, got shape \[1, 2\]",
        ),
        (
            {"b::rows": torch.tensor([0]), "b::values": torch.zeros(1)},
            r"delta 'b::rows': expected a parent tensor with ndim >= 2, got shape \[3\]",
        ),
        ({"w::cols": torch.zeros(1)}, r"delta 'w::cols': expected a tensor name, '<name>::rows'"),
    ],
)
def test_a_delta_that_does_not_fit_is_named(delta: dict[str, torch.Tensor], message: str) -> None:
    parent = {"w": torch.zeros(4, 2), "b": torch.zeros(3)}
    with pytest.raises(ArtifactError, match=message):
        apply_delta(parent, delta)


# --- delta versions in the registry --------------------------------------------------------------


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry", chunk_bytes=4096)


def test_a_delta_of_one_percent_of_the_rows_is_far_smaller(reg: Registry) -> None:
    rows = 10_000
    parent = _model(rows=rows)
    full = publish(reg, weights=parent)
    new = _changed(parent, list(range(0, rows, 100)))  # 1% of the rows
    new["mlp.bias"] = new["mlp.bias"] + 0.5
    m = publish(reg, seed=1, weights=new, delta_from=(full.version, parent))
    assert (m.delta_of, m.chain, list(m.files)) == (full.version, 1, [DELTA_FILE])
    full_bytes, delta_bytes = full.files[WEIGHTS_FILE].bytes, m.files[DELTA_FILE].bytes
    assert delta_bytes * 50 < full_bytes, (delta_bytes, full_bytes)
    assert len(m.files[DELTA_FILE].chunks) == -(-delta_bytes // 4096)
    loaded, tensors = reg.load("ctr", m.version, expected_fingerprint=FP)
    assert loaded == m
    assert_same_tensors(tensors, new)


def test_the_chain_is_bounded_by_max_chain(reg: Registry) -> None:
    current = _model(rows=200)
    m = publish(reg, weights=current)
    history: list[tuple[Manifest, dict[str, torch.Tensor]]] = [(m, current)]
    for i in range(1, 7):
        new = _changed(current, [i, 50 + i], seed=i)
        m = publish(reg, seed=i, weights=new, delta_from=(m.version, current), max_chain=2)
        history.append((m, new))
        current = new
    assert [(h.delta_of, h.chain) for h, _ in history] == [
        (None, 0),
        ("v00000001", 1),
        ("v00000002", 2),
        (None, 0),
        ("v00000004", 1),
        ("v00000005", 2),
        (None, 0),
    ]
    for manifest, tensors in history:
        assert_same_tensors(reg.load("ctr", manifest.version, expected_fingerprint=FP)[1], tensors)


def test_max_chain_zero_and_layout_changes_publish_full_versions(reg: Registry) -> None:
    parent = _model(rows=100)
    first = publish(reg, weights=parent)
    new = _changed(parent, [1])
    assert publish(reg, weights=new, delta_from=(first.version, parent), max_chain=0).chain == 0
    grown = {**new, "emb.weight": torch.zeros(101, 16)}
    m = publish(reg, weights=grown, delta_from=(first.version, parent))
    assert (m.delta_of, list(m.files)) == (None, [WEIGHTS_FILE])
    assert_same_tensors(reg.load("ctr", m.version, expected_fingerprint=FP)[1], grown)


def test_a_delta_no_smaller_than_the_full_version_is_published_full(reg: Registry) -> None:
    parent = _model(rows=20)
    first = publish(reg, weights=parent)
    new = {k: v + 1 for k, v in parent.items()}
    m = publish(reg, weights=new, delta_from=(first.version, parent))
    assert (m.delta_of, list(m.files)) == (None, [WEIGHTS_FILE])


def test_delta_from_must_name_a_published_version(reg: Registry) -> None:
    parent = _model(rows=10)
    with pytest.raises(
        ArtifactError,
        match=r"publish 'ctr': delta_from: expected a published version to build the delta on, "
        r"got 'v00000003' \(.*v00000003/manifest\.json: expected a manifest, got no such file\)",
    ):
        publish(reg, weights=parent, delta_from=("v00000003", parent))
    with pytest.raises(
        ArtifactError, match=r"publish 'ctr': max_chain: expected an int >= 0, got -1"
    ):
        publish(reg, weights=parent, max_chain=-1)
    assert reg.versions("ctr") == []


def _chain(reg: Registry, links: int = 3) -> list[tuple[Manifest, dict[str, torch.Tensor]]]:
    current = _model(rows=300)
    m = publish(reg, weights=current)
    out = [(m, current)]
    for i in range(1, links):
        new = _changed(current, [i], seed=i)
        m = publish(reg, seed=i, weights=new, delta_from=(m.version, current))
        out.append((m, new))
        current = new
    assert [h.chain for h, _ in out] == list(range(links))
    return out


def test_a_missing_parent_is_named(reg: Registry) -> None:
    chain = _chain(reg)
    shutil.rmtree(reg.root / "ctr" / "v00000002")
    with pytest.raises(
        ArtifactError,
        match=r"v00000003/manifest\.json: delta_of: expected version v00000002 of 'ctr' to apply "
        r"the delta to, got: .*v00000002/manifest\.json: expected a manifest, got no such file",
    ):
        reg.load("ctr", chain[-1][0].version, expected_fingerprint=FP)


def test_a_corrupt_link_is_named(reg: Registry) -> None:
    chain = _chain(reg)
    path = reg.root / "ctr" / "v00000001" / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(
        ArtifactError,
        match=r"v00000002/manifest\.json: delta_of: expected version v00000001 of 'ctr' to apply "
        r"the delta to, got: .*v00000001/weights\.safetensors: expected sha256",
    ):
        reg.load("ctr", chain[-1][0].version, expected_fingerprint=FP)


def test_an_unsigned_link_is_refused_by_a_verifier(tmp_path: Path) -> None:
    signer = Signer.generate()
    root = tmp_path / "registry"
    parent = _model(rows=300)
    first = publish(Registry(root), weights=parent)  # unsigned
    new = _changed(parent, [3])
    top = publish(Registry(root, signer=signer), weights=new, delta_from=(first.version, parent))
    reader = Registry(root, verifier=signer.verifier())
    with pytest.raises(
        ArtifactError,
        match=r"v00000002/manifest\.json: delta_of: expected version v00000001 of 'ctr' to apply "
        r"the delta to, got: .*v00000001/manifest\.json: unsigned: expected manifest\.sig",
    ):
        reader.load("ctr", top.version, expected_fingerprint=FP)


def test_wrong_parent_tensors_at_publish_are_caught_on_load(reg: Registry) -> None:
    parent = _model(rows=300)
    first = publish(reg, weights=parent)
    not_the_parent = _changed(parent, [7], seed=9)
    new = _changed(not_the_parent, [8])
    m = publish(reg, weights=new, delta_from=(first.version, not_the_parent))
    assert m.delta_of == first.version
    with pytest.raises(
        ArtifactError,
        match=r"v00000002/delta\.safetensors: expected the chain v00000002 <- v00000001 to "
        r"rebuild weights with sha256 \w+, got sha256 \w+",
    ):
        reg.load("ctr", m.version, expected_fingerprint=FP)


def test_an_inconsistent_chain_number_is_refused(reg: Registry) -> None:
    import json

    chain = _chain(reg)
    path = reg.root / "ctr" / "v00000003" / MANIFEST_FILE
    doc = json.loads(path.read_bytes())
    doc["chain"] = 5
    path.write_text(json.dumps(doc))
    with pytest.raises(
        ArtifactError,
        match=r"delta_of: expected version v00000002 of 'ctr' to apply the delta to, got: chain: "
        r"expected 4 \(the parent of a delta with chain 5\), got 1",
    ):
        reg.load("ctr", chain[-1][0].version, expected_fingerprint=FP)


def test_prune_keeps_the_versions_a_kept_delta_is_built_on(reg: Registry) -> None:
    current = _model(rows=300)
    m = publish(reg, weights=current)
    for i in range(1, 6):  # v2, v3 deltas; v4 full; v5 delta; v6 delta (max_chain 2)
        new = _changed(current, [i], seed=i)
        m = publish(reg, seed=i, weights=new, delta_from=(m.version, current), max_chain=2)
        current = new
    assert [reg.manifest("ctr", v).chain for v in reg.versions("ctr")] == [0, 1, 2, 0, 1, 2]
    assert reg.prune("ctr", keep=1) == ["v00000001", "v00000002", "v00000003"]
    assert reg.versions("ctr") == ["v00000004", "v00000005", "v00000006"]
    assert_same_tensors(reg.load("ctr", "v00000006", expected_fingerprint=FP)[1], current)
