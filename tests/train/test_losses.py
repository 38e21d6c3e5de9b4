"""The losses against their formulas, their unbiasedness on delayed feedback, the registry and
the calibrated probabilities of ``fnc`` models."""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable
from typing import cast

import pytest
import torch

from minutely.config import LossName, ModelConfig, TrainConfig
from minutely.data import instances_to_tensors
from minutely.data.tensors import TensorBatch
from minutely.errors import ConfigError
from minutely.model import CtrModel, build_model, synthetic_batch
from minutely.model.artifact import model_config_doc
from minutely.model.base import fnc_calibrate, fnc_probability
from minutely.registry import FileEntry, Manifest
from minutely.schema import default_schema
from minutely.serve.torch_predictor import TorchPredictor
from minutely.train import (
    BCELoss,
    FNCLoss,
    FNWLoss,
    PULoss,
    Trainer,
    bce_loss,
    loss_names,
    make_loss,
    model_loss,
    register_loss,
)
from minutely.train.losses import Loss

SCHEMA = default_schema()
NEG, POS, CORR = 0, 1, 2  # row kinds: negative, ordinary positive, correction


def naive_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits.double())
    return -(labels * torch.log(p) + (1 - labels) * torch.log(1 - p))


def rows(kinds: list[int]) -> TensorBatch:
    """A batch with one row per kind: labels and correction flags set accordingly."""
    n = len(kinds)
    base = synthetic_batch(SCHEMA, n, buckets=16, seed=0)
    k = torch.tensor(kinds, dtype=torch.long)
    return dataclasses.replace(base, labels=(k != NEG).to(torch.float32), is_correction=k == CORR)


def value_and_grad(
    loss: Loss, logits: torch.Tensor, batch: TensorBatch
) -> tuple[float, list[float]]:
    z = logits.detach().double().requires_grad_(True)
    out = loss(z, batch)
    (grad,) = torch.autograd.grad(out, z)
    return float(out.detach()), grad.tolist()


def per_row_grads(name: str, logits: torch.Tensor, kinds: list[int]) -> torch.Tensor:
    """Each row's gradient of its own term: the gradient of the batch loss times ``B``."""
    _, grad = value_and_grad(make_loss(name), logits, rows(kinds))
    return torch.tensor(grad, dtype=torch.float64) * len(kinds)


# -- value and gradient against the formula, written out ------------------------------------

KINDS = [NEG, POS, CORR, NEG, CORR, POS, NEG, NEG]
LOGITS = torch.tensor([-2.5, -1.0, -0.3, 0.0, 0.7, 1.5, 2.2, 4.0], dtype=torch.float64)


def formula(name: str, z: torch.Tensor, kinds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, gradient) of ``name`` in the docstrings' notation, in plain float64 arithmetic."""
    p = 1.0 / (1.0 + torch.exp(-z))
    k = torch.tensor(kinds)
    neg, pos, corr = k == NEG, k == POS, k == CORR
    y = (k != NEG).double()
    b = len(kinds)
    if name in ("bce", "fnc"):
        value = -(y * torch.log(p) + (1 - y) * torch.log(1 - p))
        grad = p - y
    elif name == "pu":
        value = torch.where(
            corr,
            -torch.log(p) + torch.log(1 - p),
            torch.where(pos, -torch.log(p), -torch.log(1 - p)),
        )
        grad = torch.where(corr, -torch.ones_like(p), torch.where(pos, p - 1, p))
    elif name == "fnw":
        value = torch.where(neg, -(1 - p) * (1 + p) * torch.log(1 - p), -(1 + p) * torch.log(p))
        # the weights are constants: d/dz of -log p is p - 1, of -log(1 - p) is p
        grad = torch.where(neg, (1 - p) * (1 + p) * p, (1 + p) * (p - 1))
    else:
        raise AssertionError(name)
    assert set(kinds) == {NEG, POS, CORR}, "the formulas are checked on every kind of row"
    return value.sum() / b, grad / b


@pytest.mark.parametrize("name", ["bce", "pu", "fnw", "fnc"])
def test_value_and_gradient_equal_the_formula(name: str) -> None:
    value, grad = value_and_grad(make_loss(name), LOGITS, rows(KINDS))
    want_value, want_grad = formula(name, LOGITS, KINDS)
    assert value == pytest.approx(float(want_value), rel=1e-12, abs=1e-12)
    torch.testing.assert_close(torch.tensor(grad, dtype=torch.float64), want_grad)


@pytest.mark.parametrize("name", ["bce", "pu", "fnw", "fnc"])
def test_float32_logits_give_the_float64_values(name: str) -> None:
    z32 = LOGITS.float().requires_grad_(True)
    out = make_loss(name)(z32, rows(KINDS))
    assert out.dtype == torch.float32
    want_value, _ = formula(name, LOGITS, KINDS)
    assert float(out.detach()) == pytest.approx(float(want_value), rel=1e-5)


@pytest.mark.parametrize("name", ["bce", "pu", "fnw", "fnc"])
def test_every_loss_is_finite_at_extreme_logits(name: str) -> None:
    kinds = [NEG, POS, CORR] * 2
    logits = torch.tensor([-300.0, -300.0, -300.0, 300.0, 300.0, 300.0])
    value, grad = value_and_grad(make_loss(name), logits, rows(kinds))
    assert math.isfinite(value)
    assert all(math.isfinite(g) for g in grad)
    assert all(abs(g) <= 1.0 / len(kinds) + 1e-12 for g in grad)  # each row's at most 1 / B


def test_pu_correction_term_is_minus_the_logit_and_unbounded_below() -> None:
    z = torch.tensor([50.0, 300.0], dtype=torch.float64)
    value, grad = value_and_grad(PULoss(), z, rows([CORR, CORR]))
    assert value == pytest.approx(-(50.0 + 300.0) / 2)
    assert grad == [-0.5, -0.5]


def test_bce_trains_corrections_as_ordinary_positives() -> None:
    batch = rows(KINDS)
    plain = dataclasses.replace(batch, is_correction=torch.zeros(len(KINDS), dtype=torch.bool))
    torch.testing.assert_close(BCELoss()(LOGITS, batch), BCELoss()(LOGITS, plain))


@pytest.mark.parametrize("name", ["bce", "pu", "fnw", "fnc"])
def test_an_empty_batch_gives_nan(name: str) -> None:
    assert math.isnan(float(make_loss(name)(torch.zeros(0), rows([]))))


# -- pu: a correction undoes its negative ----------------------------------------------------


def test_pu_negative_plus_its_correction_is_one_positive() -> None:
    for z in (-6.0, -1.3, 0.0, 0.4, 2.5, 9.0):
        pair = per_row_grads("pu", torch.tensor([z, z]), [NEG, CORR]).sum()
        one = per_row_grads("pu", torch.tensor([z]), [POS]).sum()
        assert float(pair) == pytest.approx(float(one), abs=1e-12)
        bce_pair = per_row_grads("bce", torch.tensor([z, z]), [NEG, CORR]).sum()
        assert float(bce_pair) != pytest.approx(float(one), abs=1e-3)  # bce keeps the negative


def expected_grads(
    name: str, q: torch.Tensor, late: torch.Tensor, z: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expected gradient per impression of ``name`` on the delayed stream, and of BCE on truth.

    An impression of true rate ``q`` is positive with probability ``q``; a positive arrives in
    its window with probability ``1 - late`` (one positive row) or after it (a negative row, then
    a correction). A negative is one negative row.
    """
    n = len(q)
    logits = z.repeat_interleave(3)
    g = per_row_grads(name, logits, [NEG, POS, CORR] * n).reshape(n, 3)
    stream = (1 - q + q * late) * g[:, 0] + q * (1 - late) * g[:, 1] + q * late * g[:, 2]
    truth_rows = per_row_grads("bce", logits, [NEG, POS, CORR] * n).reshape(n, 3)
    truth = (1 - q) * truth_rows[:, 0] + q * truth_rows[:, 1]
    return stream, truth


def test_pu_expected_gradient_equals_bce_on_true_labels_and_bce_is_biased() -> None:
    q = torch.tensor([0.01, 0.05, 0.2, 0.5, 0.8], dtype=torch.float64)
    late = torch.tensor([0.9, 0.3, 0.5, 0.0, 0.6], dtype=torch.float64)
    z = torch.tensor([-3.0, -0.5, 0.0, 1.0, 2.0], dtype=torch.float64)  # any logits
    pu, truth = expected_grads("pu", q, late, z)
    torch.testing.assert_close(pu, truth)
    bce, _ = expected_grads("bce", q, late, z)
    biased = (q * late) > 0
    assert ((bce - truth)[biased] > 1e-4).all()  # bce pushes up: late positives stay negatives
    torch.testing.assert_close(
        (bce - truth)[~biased], torch.zeros(int((~biased).sum()), dtype=torch.float64)
    )


def root(name: str, kinds: list[int]) -> float:
    """The probability at which the gradient of ``name`` over the rows, one shared logit, is 0."""
    batch = rows(kinds)
    loss = make_loss(name)
    lo, hi = -12.0, 12.0
    for _ in range(60):
        mid = (lo + hi) / 2
        z = torch.full((len(kinds),), mid, dtype=torch.float64, requires_grad=True)
        (grad,) = torch.autograd.grad(loss(z, batch), z)
        lo, hi = (mid, hi) if float(grad.sum()) < 0 else (lo, mid)
    return 1.0 / (1.0 + math.exp(-(lo + hi) / 2))


def delayed_stream(n: int, q: float, late: float, seed: int) -> tuple[list[int], int]:
    """Rows of ``n`` sampled impressions (window join with corrections), and the true positives."""
    rng = random.Random(seed)
    kinds: list[int] = []
    positives = 0
    for _ in range(n):
        if rng.random() < q:
            positives += 1
            kinds += [NEG, CORR] if rng.random() < late else [POS]
        else:
            kinds.append(NEG)
    return kinds, positives


def test_pu_learns_the_true_rate_from_a_sampled_delayed_stream() -> None:
    kinds, positives = delayed_stream(5_000, q=0.2, late=0.6, seed=1)
    true_rate = positives / 5_000
    assert root("pu", kinds) == pytest.approx(true_rate, abs=1e-9)
    corrections = kinds.count(CORR)
    biased = root("bce", kinds)
    assert biased == pytest.approx(positives / (5_000 + corrections), abs=1e-9)
    assert true_rate - biased > 0.01


def test_pu_refuses_a_correction_that_is_not_a_positive() -> None:
    batch = rows([NEG, CORR, CORR])
    bad = dataclasses.replace(batch, labels=torch.tensor([0.0, 1.0, 0.0]))
    with pytest.raises(
        ValueError, match=r"pu loss: expected label 1 on every correction row, got 0.0 at row 2"
    ):
        PULoss()(torch.zeros(3), bad)


@pytest.mark.parametrize("name", ["bce", "pu", "fnw", "fnc"])
def test_logits_of_the_wrong_shape_are_refused(name: str) -> None:
    with pytest.raises(
        ValueError,
        match=rf"{name} loss: expected logits of shape \[3\] \(one per row\), got \[3, 1\]",
    ):
        make_loss(name)(torch.zeros(3, 1), rows([NEG, POS, NEG]))


# -- fnw and fnc: the emit-at-once stream ----------------------------------------------------


def duplicate_scheme(name: str, q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Expected gradient per sample of rate ``q`` at probability ``p``: one negative row, and a
    positive duplicate with probability ``q``."""
    n = len(q)
    logits = torch.log(p / (1 - p)).repeat_interleave(2)
    g = per_row_grads(name, logits, [NEG, CORR] * n).reshape(n, 2)
    return g[:, 0] + q * g[:, 1]


def test_fnw_expected_gradient_vanishes_at_the_true_rate() -> None:
    q = torch.tensor([0.001, 0.02, 0.1, 0.3, 0.6, 0.9], dtype=torch.float64)
    at_truth = duplicate_scheme("fnw", q, q)
    torch.testing.assert_close(at_truth, torch.zeros_like(q), atol=1e-12, rtol=0)
    # it is (1 - p^2)(p - q): positive above the rate, negative below
    for p in (q * 0.5, torch.clamp(q * 1.5, max=0.99)):
        torch.testing.assert_close(duplicate_scheme("fnw", q, p), (1 - p**2) * (p - q))
    # plain bce on the same stream settles at q / (1 + q) instead
    torch.testing.assert_close(duplicate_scheme("bce", q, q), q**2)  # p (1 + q) - q at p = q
    torch.testing.assert_close(
        duplicate_scheme("bce", q, q / (1 + q)), torch.zeros_like(q), atol=1e-12, rtol=0
    )


def emit_at_once_stream(n: int, q: float, seed: int) -> tuple[list[int], int]:
    rng = random.Random(seed)
    kinds: list[int] = []
    positives = 0
    for _ in range(n):
        kinds.append(NEG)
        if rng.random() < q:
            positives += 1
            kinds.append(CORR)
    return kinds, positives


def test_fnw_and_calibrated_fnc_learn_the_true_rate_from_a_sampled_stream() -> None:
    kinds, positives = emit_at_once_stream(5_000, q=0.15, seed=2)
    true_rate = positives / 5_000
    assert root("fnw", kinds) == pytest.approx(true_rate, abs=1e-9)
    b = root("fnc", kinds)
    assert true_rate - b > 0.01  # the uncalibrated probability is biased low
    assert float(fnc_calibrate(torch.tensor(b, dtype=torch.float64))) == pytest.approx(
        true_rate, abs=1e-9
    )


def test_fnc_calibration_inverts_the_duplicate_bias() -> None:
    q = torch.tensor([0.0, 1e-4, 0.03, 0.25, 0.5, 0.99, 1.0], dtype=torch.float64)
    b = q / (1 + q)
    torch.testing.assert_close(fnc_calibrate(b), q)
    torch.testing.assert_close(fnc_probability(torch.log(b / (1 - b))), q)


def test_fnc_probability_is_the_clipped_calibration_of_the_sigmoid() -> None:
    z = torch.linspace(-30, 30, 121, dtype=torch.float64)
    torch.testing.assert_close(fnc_probability(z), fnc_calibrate(torch.sigmoid(z)))
    got = fnc_probability(torch.tensor([-1e30, -700.0, 0.0, 1e-3, 50.0, 1e30]))
    assert got.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    assert fnc_calibrate(torch.tensor([0.5, 0.75, 1.0])).tolist() == [1.0, 1.0, 1.0]
    assert torch.isnan(fnc_probability(torch.tensor([math.nan]))).all()


# -- probabilities used for scoring, training and serving ------------------------------------


def model_with(loss: str, seed: int = 0) -> CtrModel:
    window = 0 if loss in ("fnw", "fnc") else 600
    cfg = ModelConfig(arch="lr", buckets=64, loss=cast(LossName, loss), attribution_window_s=window)
    torch.manual_seed(seed)
    model = build_model(cfg, SCHEMA)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 1.0)
    return model


def expected_probabilities(loss: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return fnc_probability if loss == "fnc" else torch.sigmoid


@pytest.mark.parametrize("loss", ["bce", "pu", "fnw", "fnc"])
def test_predictions_are_calibrated_for_fnc_and_sigmoid_otherwise(loss: str) -> None:
    model = model_with(loss)
    batch = synthetic_batch(SCHEMA, 64, buckets=64, seed=3)
    with torch.no_grad():
        logits = model(batch)
    assert (logits > 0.5).any()  # both sides of the fnc clip at logit 0
    assert (logits < -0.5).any()
    want = expected_probabilities(loss)(logits)
    torch.testing.assert_close(model.predict(batch), want)
    trainer = Trainer(model, TrainConfig())
    torch.testing.assert_close(torch.from_numpy(trainer.predict(batch)), want)
    scored = trainer.evaluate_then_train(batch)  # scores with the weights before the update
    torch.testing.assert_close(torch.from_numpy(scored), want)
    if loss == "fnc":
        assert not torch.allclose(want, torch.sigmoid(logits))


@pytest.mark.parametrize("loss", ["bce", "fnc"])
def test_served_probabilities_follow_the_artifact_loss(loss: str) -> None:
    model = model_with(loss, seed=4)
    manifest = Manifest(
        manifest_version=1,
        model="ctr",
        version="v00000001",
        parent=None,
        base=None,
        created_ms=0,
        arch="lr",
        model_config=model_config_doc(model.cfg),
        feature_schema=SCHEMA.to_dict(),
        schema_fingerprint=SCHEMA.fingerprint(),
        metrics={},
        samples_seen=0,
        files={"weights.safetensors": FileEntry(sha256="", bytes=0)},
    )
    predictor = TorchPredictor.from_artifact(manifest, model.flat_state_dict())
    rng = random.Random(5)
    insts = [
        {
            f.name: (
                [rng.randrange(100) for _ in range(2)]
                if f.kind == "multi_sparse"
                else rng.random()
                if f.kind == "dense"
                else rng.randrange(100)
            )
            for f in SCHEMA.features
        }
        for _ in range(32)
    ]
    with torch.no_grad():
        logits = model(instances_to_tensors(insts, SCHEMA, 64))
    got = torch.tensor(predictor.predict(insts))
    torch.testing.assert_close(got, expected_probabilities(loss)(logits))


# -- building losses ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("loss", "cls"), [("bce", BCELoss), ("pu", PULoss), ("fnw", FNWLoss), ("fnc", FNCLoss)]
)
def test_trainer_uses_the_models_configured_loss(loss: str, cls: type) -> None:
    model = model_with(loss)
    assert isinstance(model_loss(model.cfg), cls)
    assert isinstance(Trainer(model, TrainConfig()).loss, cls)
    given = FNWLoss()
    assert Trainer(model, TrainConfig(), loss=given).loss is given


def test_trainer_trains_with_the_configured_loss() -> None:
    """The trainer's loss of a batch of corrections is the configured loss's: -z for pu."""
    batch = synthetic_batch(SCHEMA, 32, buckets=64, seed=6)
    corrections = dataclasses.replace(
        batch, labels=torch.ones(32), is_correction=torch.ones(32, dtype=torch.bool)
    )
    losses = {}
    for loss in ("pu", "bce"):
        model = model_with(loss, seed=7)
        losses[loss] = Trainer(model, TrainConfig()).train_step(corrections)
    with torch.no_grad():
        logits = model_with("pu", seed=7)(corrections)
    assert losses["pu"] == pytest.approx(float(-logits.mean()), rel=1e-5)
    assert losses["bce"] == pytest.approx(float(bce_loss(logits, torch.ones(32))), rel=1e-5)


def test_unknown_configured_loss_names_the_model_field() -> None:
    cfg = ModelConfig(name="cvr", loss="focal")  # type: ignore[arg-type]
    with pytest.raises(
        ConfigError,
        match=r"'models.cvr.loss': expected one of \['bce', 'fnc', 'fnw', 'pu'.*got 'focal'",
    ):
        model_loss(cfg)
    model = build_model(dataclasses.replace(cfg, arch="lr", buckets=16), SCHEMA)
    with pytest.raises(ConfigError, match=r"'models.cvr.loss'"):
        Trainer(model, TrainConfig())


def test_registry_builds_by_name_and_refuses_unknown_or_duplicate_names() -> None:
    assert {"bce", "pu", "fnw", "fnc"} <= set(loss_names())
    for name, cls in (("bce", BCELoss), ("pu", PULoss), ("fnw", FNWLoss), ("fnc", FNCLoss)):
        assert isinstance(make_loss(name), cls)
    with pytest.raises(
        ConfigError, match=r"'loss': expected one of \['bce', 'fnc', 'fnw', 'pu'.*got 'focal'"
    ):
        make_loss("focal")
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


# -- bce_loss ----------------------------------------------------------------------------------


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
