"""BCE against its definition; the loss registry."""

from __future__ import annotations

import math

import pytest
import torch

from minutely.errors import ConfigError
from minutely.model import synthetic_batch
from minutely.schema import default_schema
from minutely.train import BCELoss, bce_loss, loss_names, make_loss, register_loss
from minutely.train.losses import Loss


def naive_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits.double())
    return -(labels * torch.log(p) + (1 - labels) * torch.log(1 - p))


def test_bce_matches_the_definition_on_moderate_logits() -> None:
    logits = torch.linspace(-6, 6, 25)
    labels = (torch.arange(25) % 3 == 0).float()
    want = naive_bce(logits, labels).mean()
    torch.testing.assert_close(bce_loss(logits, labels).double(), want, rtol=1e-5, atol=1e-6)


def test_bce_is_finite_and_exact_at_extreme_logits() -> None:
    logits = torch.tensor([-200.0, 200.0, 200.0, -200.0])
    labels = torch.tensor([0.0, 1.0, 0.0, 1.0])
    loss = bce_loss(logits, labels)
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(100.0)  # two rows at 0, two at 200
    logits.requires_grad_(True)
    bce_loss(logits, labels).backward()
    assert logits.grad is not None
    assert torch.isfinite(logits.grad).all()


def test_bce_weights_give_a_weighted_mean() -> None:
    logits = torch.tensor([0.3, -1.2, 2.0])
    labels = torch.tensor([1.0, 0.0, 0.0])
    weights = torch.tensor([2.0, 0.0, 1.0])
    per_row = naive_bce(logits, labels)
    want = (per_row * weights.double()).sum() / 3.0
    torch.testing.assert_close(bce_loss(logits, labels, weights).double(), want)


def test_bce_refuses_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"expected logits, labels .* got \[3\], \[2\]"):
        bce_loss(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match=r"got \[2\], \[2\], \[3\]"):
        bce_loss(torch.zeros(2), torch.zeros(2), torch.ones(3))


def test_bce_loss_trains_corrections_as_ordinary_positives() -> None:
    batch = synthetic_batch(default_schema(), 6, buckets=64, seed=0)
    corrected = batch.__class__(
        **{**batch.__dict__, "labels": torch.ones(6), "is_correction": torch.ones(6, dtype=bool)}
    )
    logits = torch.linspace(-1, 1, 6)
    loss: Loss = BCELoss()
    torch.testing.assert_close(loss(logits, corrected), bce_loss(logits, torch.ones(6)))


def test_registry_builds_by_name_and_refuses_unknown_or_duplicate_names() -> None:
    assert "bce" in loss_names()
    assert isinstance(make_loss("bce"), BCELoss)
    with pytest.raises(ConfigError, match=r"'train.loss': expected one of \['bce'.*got 'pu'"):
        make_loss("pu")
    with pytest.raises(ValueError, match=r"expected a new name, got 'bce'"):
        register_loss("bce", BCELoss)


def test_registered_loss_is_built_with_its_arguments() -> None:
    class Scaled:
        def __init__(self, scale: float) -> None:
            self.scale = scale

        def __call__(self, logits: torch.Tensor, batch: object) -> torch.Tensor:
            return self.scale * logits.sum()

    register_loss("scaled_for_test", Scaled)
    built = make_loss("scaled_for_test", scale=3.0)
    assert isinstance(built, Scaled)
    assert built.scale == 3.0
    assert "scaled_for_test" in loss_names()
