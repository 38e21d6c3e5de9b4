"""RowSparseAdam on the lookup's unique-row gradients: SparseAdam's results, without coalesce."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor
from torch.profiler import profile

from minutely.config import ModelConfig, TrainConfig
from minutely.data.tensors import TensorBatch
from minutely.model import CtrModel, build_model, synthetic_batch
from minutely.schema import FeatureSpec, Schema
from minutely.train import RowSparseAdam, Trainer

BUCKETS = 40
SCHEMA = Schema(
    features=(
        FeatureSpec("user", "sparse"),
        FeatureSpec("ad", "sparse"),
        FeatureSpec("tags", "multi_sparse"),
        FeatureSpec("age", "dense"),
    )
)


def model(seed: int = 0) -> CtrModel:
    torch.manual_seed(seed)
    return build_model(
        ModelConfig(arch="deepfm", buckets=BUCKETS, embedding_dim=4, hidden=(8,)), SCHEMA
    )


def batch(k: int) -> TensorBatch:
    return synthetic_batch(SCHEMA, 48, buckets=BUCKETS, seed=k, vocab=15)


def sparse_step(m: CtrModel, opt: torch.optim.Optimizer, k: int) -> None:
    opt.zero_grad(set_to_none=True)
    b = batch(k)
    F.binary_cross_entropy_with_logits(m(b), b.labels).backward()
    opt.step()


def tables(m: CtrModel) -> list[torch.nn.Parameter]:
    return [p for _, p in m.embedding_parameters()]


def assert_same_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer, steps: int) -> None:
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    assert sa
    for i in sa:
        assert sa[i]["step"] == sb[i]["step"] == steps
        assert torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"])
        assert torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"])


@pytest.mark.parametrize("maximize", [False, True])
def test_steps_on_lookup_gradients_are_bitwise_those_of_sparse_adam(maximize: bool) -> None:
    a, b = model(), model()
    opt_a = torch.optim.SparseAdam(tables(a), lr=0.05, maximize=maximize)
    opt_b = RowSparseAdam(tables(b), lr=0.05, maximize=maximize)
    start = [p.detach().clone() for p in tables(a)]
    for k in range(5):
        sparse_step(a, opt_a, k)
        sparse_step(b, opt_b, k)
    for x, y, s in zip(tables(a), tables(b), start, strict=True):
        assert torch.equal(x, y)
        assert not torch.equal(x, s)
    assert_same_state(opt_a, opt_b, 5)


def test_gradients_with_sorted_unique_rows_are_not_coalesced_again() -> None:
    m = model()
    opt = RowSparseAdam(tables(m), lr=0.05)
    b = batch(0)
    F.binary_cross_entropy_with_logits(m(b), b.labels).backward()
    with profile() as prof:
        opt.step()
    names = {e.name for e in prof.events()}
    assert "aten::_coalesce" not in names
    assert "aten::index_copy_" in names  # the step ran


def sparse_grad(rows: list[int], width: int, seed: int) -> Tensor:
    values = torch.randn(len(rows), width, generator=torch.Generator().manual_seed(seed))
    return torch.sparse_coo_tensor(
        torch.tensor([rows]), values, (BUCKETS, width), check_invariants=True
    )


@pytest.mark.parametrize(
    "rows",
    [[7, 2, 30, 5], [3, 9, 3, 3, 1], [4], [], [0, 1, 2, 39]],
    ids=["unsorted", "duplicates", "one_row", "empty", "sorted"],
)
def test_any_row_layout_gives_sparse_adam_results(rows: list[int]) -> None:
    torch.manual_seed(0)
    p_a = torch.nn.Parameter(torch.randn(BUCKETS, 3))
    p_b = torch.nn.Parameter(p_a.detach().clone())
    opt_a = torch.optim.SparseAdam([p_a], lr=0.1)
    opt_b = RowSparseAdam([p_b], lr=0.1)
    for k in range(4):
        p_a.grad = sparse_grad(rows, 3, k)
        p_b.grad = sparse_grad(rows, 3, k)
        opt_a.step()
        opt_b.step()
    assert torch.equal(p_a, p_b)
    assert_same_state(opt_a, opt_b, 4)


def test_large_updates_split_over_two_threads_stay_bitwise_those_of_sparse_adam() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rows, width = 6000, 3
        torch.manual_seed(3)
        start = [torch.randn(rows, width) for _ in range(3)]
        a = [torch.nn.Parameter(t.clone()) for t in start]
        b = [torch.nn.Parameter(t.clone()) for t in start]
        opt_a = torch.optim.SparseAdam(a, lr=0.01)
        opt_b = RowSparseAdam(b, lr=0.01)
        g = torch.Generator().manual_seed(4)
        for _ in range(3):
            for x, y in zip(a, b, strict=True):
                ids = torch.randint(0, rows, (4000,), generator=g)  # duplicates, unsorted
                values = torch.randn(4000, width, generator=g)
                x.grad = torch.sparse_coo_tensor(
                    ids[None], values, (rows, width), check_invariants=True
                )
                y.grad = torch.sparse_coo_tensor(
                    ids[None], values, (rows, width), check_invariants=True
                )
            opt_a.step()
            opt_b.step()
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
        assert_same_state(opt_a, opt_b, 3)
    finally:
        torch.set_num_threads(before)


def test_tables_with_different_step_counts_and_states_moved_between_the_two() -> None:
    a, b = model(1), model(1)
    opt_a = torch.optim.SparseAdam(tables(a), lr=0.05)
    for k in range(2):
        sparse_step(a, opt_a, k)
    a.embeddings["ad"].weight.requires_grad_(False)  # skipped for two steps
    for k in range(2, 4):
        sparse_step(a, opt_a, k)
    a.embeddings["ad"].weight.requires_grad_(True)
    with torch.no_grad():
        for x, y in zip(tables(a), tables(b), strict=True):
            y.copy_(x)
    opt_b = RowSparseAdam(tables(b), lr=0.05)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    for k in range(4, 7):
        sparse_step(a, opt_a, k)
        sparse_step(b, opt_b, k)
    assert all(torch.equal(x, y) for x, y in zip(tables(a), tables(b), strict=True))
    steps = [s["step"] for s in opt_b.state_dict()["state"].values()]
    assert sorted(steps) == [5, 7, 7]
    back = torch.optim.SparseAdam(tables(b), lr=0.05)
    back.load_state_dict(copy.deepcopy(opt_b.state_dict()))
    sparse_step(a, opt_a, 7)
    sparse_step(b, back, 7)
    assert all(torch.equal(x, y) for x, y in zip(tables(a), tables(b), strict=True))


def test_trainer_steps_equal_a_plain_embedding_bag_loop_up_to_rounding() -> None:
    """The trainer against nn.EmbeddingBag pooling + SparseAdam + Adam, step for step."""
    fast = model(2)
    plain = model(2)
    trainer = Trainer(fast, TrainConfig(lr=0.01, embedding_lr=0.02))
    table_ids = {id(p) for p in tables(plain)}
    sparse = torch.optim.SparseAdam(tables(plain), lr=0.02)
    dense = torch.optim.Adam([p for p in plain.parameters() if id(p) not in table_ids], lr=0.01)
    for k in range(6):
        b = batch(k)
        got = trainer.train_step(b)
        sparse.zero_grad(set_to_none=True)
        dense.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy_with_logits(plain_logits(plain, b), b.labels)
        loss.backward()
        sparse.step()
        dense.step()
        assert got == pytest.approx(float(loss.detach()), rel=1e-5)
    for (name, x), (_, y) in zip(fast.named_parameters(), plain.named_parameters(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=name)


def plain_logits(m: CtrModel, b: TensorBatch) -> Tensor:
    rows = torch.stack(
        [m.embeddings[n](b.sparse[n].values, b.sparse[n].offsets) for n in m.sparse_names], 1
    )
    regular, hourly = m.dense_parts(b)
    emb = rows[:, :, 1:]
    total = emb.sum(1)
    fm = 0.5 * (total * total - (emb * emb).sum(1)).sum(1)
    deep: Tensor = m.mlp(emb.flatten(1), regular, hourly)  # type: ignore[operator]
    return m.first_order_logit(rows, regular, hourly) + fm + deep
