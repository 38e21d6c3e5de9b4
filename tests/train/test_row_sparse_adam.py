"""RowSparseAdam is torch.optim.SparseAdam, bit for bit, with interchangeable state."""

from __future__ import annotations

import copy

import pytest
import torch

from minutely.train import RowSparseAdam

ROWS = 50


def make_bags(seed: int) -> list[torch.nn.EmbeddingBag]:
    torch.manual_seed(seed)
    return [
        torch.nn.EmbeddingBag(ROWS, 3, mode="sum", sparse=True, include_last_offset=True),
        torch.nn.EmbeddingBag(ROWS, 1, mode="mean", sparse=True, include_last_offset=True),
    ]


def step(bags: list[torch.nn.EmbeddingBag], opt: torch.optim.Optimizer, k: int) -> None:
    g = torch.Generator().manual_seed(100 + k)
    ids = torch.randint(0, ROWS // 2, (16,), generator=g)  # many duplicates
    offsets = torch.tensor([0, 3, 3, 7, 12, 16])  # an empty bag too
    target = torch.randn(5, generator=g)
    out = sum(b(ids, offsets).sum(1) for b in bags)
    opt.zero_grad(set_to_none=True)
    ((out - target) ** 2).mean().backward()
    opt.step()


@pytest.mark.parametrize("maximize", [False, True])
def test_updates_are_bitwise_those_of_torch_sparse_adam(maximize: bool) -> None:
    a, b = make_bags(0), make_bags(0)
    opt_a = torch.optim.SparseAdam([x.weight for x in a], lr=0.05, maximize=maximize)
    opt_b = RowSparseAdam([x.weight for x in b], lr=0.05, maximize=maximize)
    for k in range(6):
        step(a, opt_a, k)
        step(b, opt_b, k)
    moved = False
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.weight, y.weight)
        moved |= not torch.equal(x.weight, make_bags(0)[a.index(x)].weight)
    assert moved
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    for i in sa:
        assert sa[i]["step"] == sb[i]["step"] == 6
        assert torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"])
        assert torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"])


def test_state_dicts_move_between_the_two() -> None:
    a, b = make_bags(1), make_bags(1)
    opt_a = torch.optim.SparseAdam([x.weight for x in a], lr=0.05)
    for k in range(3):
        step(a, opt_a, k)
    with torch.no_grad():
        for x, y in zip(a, b, strict=True):
            y.weight.copy_(x.weight)
    opt_b = RowSparseAdam([x.weight for x in b], lr=0.05)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    for k in range(3, 6):
        step(a, opt_a, k)
        step(b, opt_b, k)
    assert all(torch.equal(x.weight, y.weight) for x, y in zip(a, b, strict=True))


def test_untouched_rows_and_params_without_grad_stay_put() -> None:
    bags = make_bags(2)
    before = [x.weight.detach().clone() for x in bags]
    opt = RowSparseAdam([x.weight for x in bags], lr=0.05)
    step(bags, opt, 0)
    assert torch.equal(bags[0].weight[ROWS // 2 :], before[0][ROWS // 2 :])
    bags[1].weight.requires_grad_(False)
    frozen = bags[1].weight.detach().clone()
    step(bags, opt, 1)
    assert torch.equal(bags[1].weight, frozen)


def test_a_dense_gradient_is_refused() -> None:
    p = torch.nn.Parameter(torch.zeros(4, 2))
    opt = RowSparseAdam([p], lr=0.1)
    p.grad = torch.ones(4, 2)
    with pytest.raises(RuntimeError, match=r"expected sparse gradients .* got a dense gradient"):
        opt.step()
