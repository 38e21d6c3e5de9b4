"""Distillation from a frozen teacher: the formula, its composition with every loss, alpha at
its ends, a teacher that never changes, and the teachers that are refused."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from minutely.config import LossName, ModelConfig, TrainConfig
from minutely.data.tensors import TensorBatch
from minutely.errors import ConfigError, SchemaMismatchError
from minutely.model import CtrModel, build_model, synthetic_batch
from minutely.schema import FeatureSpec, Schema, default_schema
from minutely.train import DistilledLoss, Trainer, make_loss

SCHEMA = default_schema()
BUCKETS = 128


def new_model(
    seed: int,
    *,
    arch: str = "deepfm",
    loss: LossName = "bce",
    alpha: float = 0.3,
    schema: Schema = SCHEMA,
    buckets: int = BUCKETS,
) -> CtrModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        arch=arch,  # type: ignore[arg-type]
        loss=loss,
        buckets=buckets,
        embedding_dim=4,
        hidden=(8,),
        distill_alpha=alpha,
    )
    model = build_model(cfg, schema)
    with torch.no_grad():  # weights far from the initial zeros, so logits spread out
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def batch(seed: int, n: int = 64, *, corrections: int = 0) -> TensorBatch:
    """A synthetic batch whose first ``corrections`` rows are corrections (label 1)."""
    b = synthetic_batch(SCHEMA, n, buckets=BUCKETS, seed=seed, vocab=50)
    if not corrections:
        return b
    is_correction = torch.arange(n) < corrections
    labels = torch.where(is_correction, 1.0, b.labels)
    return dataclasses.replace(b, labels=labels, is_correction=is_correction)


def hand_bce(z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-row binary cross-entropy of logits ``z`` against a (soft) target, written out."""
    return -(target * F.logsigmoid(z) + (1 - target) * F.logsigmoid(-z))


@pytest.mark.parametrize("alpha", [0.25, 0.8])
def test_bce_distillation_value_and_gradient_follow_the_formula(alpha: float) -> None:
    student, teacher = new_model(0), new_model(1)
    b = batch(0)
    z = student(b).detach().double().requires_grad_(True)
    loss = DistilledLoss(make_loss("bce"), teacher, alpha)
    got = loss(z, b)
    (grad,) = torch.autograd.grad(got, z)

    with torch.no_grad():
        t = torch.sigmoid(teacher(b).double())
    y = b.labels.double()
    zd = z.detach()
    n = len(b)
    want = (1 - alpha) * hand_bce(zd, y).mean() + alpha * hand_bce(zd, t).mean()
    # d/dz BCE(z, q) = sigmoid(z) - q, per row, divided by B for the mean.
    want_grad = ((1 - alpha) * (torch.sigmoid(zd) - y) + alpha * (torch.sigmoid(zd) - t)) / n
    assert not torch.allclose(t, y)  # the teacher's target is not the labels
    torch.testing.assert_close(got.detach(), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-14)


def test_distillation_composes_with_pu_corrections() -> None:
    """A correction row keeps pu's constant gradient -1 in the base term."""
    alpha = 0.4
    student, teacher = new_model(2, loss="pu"), new_model(3, loss="pu")
    b = batch(1, corrections=10)
    z = student(b).detach().double().requires_grad_(True)
    got = DistilledLoss(make_loss("pu"), teacher, alpha)(z, b)
    (grad,) = torch.autograd.grad(got, z)

    with torch.no_grad():
        t = torch.sigmoid(teacher(b).double())
    zd, y, corr, n = z.detach(), b.labels.double(), b.is_correction, len(b)
    pu_rows = torch.where(corr, -zd, hand_bce(zd, y))
    want = (1 - alpha) * pu_rows.sum() / n + alpha * hand_bce(zd, t).mean()
    base_grad = torch.where(corr, torch.full_like(zd, -1.0), torch.sigmoid(zd) - y)
    want_grad = ((1 - alpha) * base_grad + alpha * (torch.sigmoid(zd) - t)) / n
    torch.testing.assert_close(got.detach(), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", ["bce", "pu", "fnw", "fnc"])
def test_distillation_mixes_any_base_loss_with_the_teacher_term(name: LossName) -> None:
    alpha = 0.3
    student, teacher = new_model(4, loss=name), new_model(5, loss=name)
    b = batch(2, corrections=6 if name == "pu" else 0)
    z = student(b).detach().double().requires_grad_(True)
    base = make_loss(name)
    got = DistilledLoss(base, teacher, alpha)(z, b)
    (grad,) = torch.autograd.grad(got, z)

    zb = z.detach().clone().requires_grad_(True)
    base_value = base(zb, b)
    (base_grad,) = torch.autograd.grad(base_value, zb)
    with torch.no_grad():
        t = torch.sigmoid(teacher(b).double())
    zd = z.detach()
    want = (1 - alpha) * base_value.detach() + alpha * hand_bce(zd, t).mean()
    want_grad = (1 - alpha) * base_grad + alpha * (torch.sigmoid(zd) - t) / len(b)
    torch.testing.assert_close(got.detach(), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-14)


def test_the_trainer_trains_the_distilled_loss_of_its_teacher() -> None:
    teacher = new_model(9)
    with_teacher = Trainer(new_model(8), TrainConfig())
    with_teacher.set_teacher(teacher)
    explicit = Trainer(
        new_model(8), TrainConfig(), loss=DistilledLoss(make_loss("bce"), teacher, 0.3)
    )
    plain = Trainer(new_model(8), TrainConfig())
    first = batch(10)
    with torch.no_grad():
        z = with_teacher.model(first)
        t = torch.sigmoid(teacher(first))
    want = 0.7 * hand_bce(z, first.labels).mean() + 0.3 * hand_bce(z, t).mean()
    assert with_teacher.train_step(first) == pytest.approx(float(want), rel=1e-5)
    explicit.train_step(first)
    plain.train_step(first)
    for k in range(11, 15):
        for trainer in (with_teacher, explicit, plain):
            trainer.train_step(batch(k))
    a = with_teacher.model.flat_state_dict()
    b = explicit.model.flat_state_dict()
    c = plain.model.flat_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_teacher_logits_given_by_the_caller_train_as_the_teachers_own() -> None:
    teacher = new_model(9)
    own = Trainer(new_model(8), TrainConfig())
    own.set_teacher(teacher)
    given = Trainer(new_model(8), TrainConfig())
    given.set_teacher(teacher)
    ignored = Trainer(new_model(8), TrainConfig())  # no teacher: given logits change nothing
    plain = Trainer(new_model(8), TrainConfig())
    for k in range(10, 15):
        b = batch(k)
        with torch.no_grad():
            z = teacher(b)
        p_own = own.evaluate_then_train(b)
        p_given = given.evaluate_then_train(b, z)
        assert (p_own == p_given).all()
        ignored.evaluate_then_train(b, z)
        plain.evaluate_then_train(b)
    a, g = own.model.flat_state_dict(), given.model.flat_state_dict()
    assert all(torch.equal(a[k], g[k]) for k in a)
    i, c = ignored.model.flat_state_dict(), plain.model.flat_state_dict()
    assert all(torch.equal(i[k], c[k]) for k in i)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_alpha_zero_trains_exactly_the_base_loss() -> None:
    distilled = Trainer(new_model(6, alpha=0.0), TrainConfig())
    distilled.set_teacher(new_model(7, alpha=0.0))
    plain = Trainer(new_model(6, alpha=0.0), TrainConfig())
    assert distilled.objective is distilled.loss
    for k in range(5):
        b = batch(20 + k)
        assert distilled.train_step(b) == plain.train_step(b)
    a, c = distilled.model.flat_state_dict(), plain.model.flat_state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_alpha_zero_loss_is_the_base_value_and_never_runs_the_teacher() -> None:
    def teacher(_: TensorBatch) -> torch.Tensor:
        raise AssertionError("the teacher ran")

    b = batch(3, corrections=5)
    z = new_model(0, loss="pu")(b).detach()
    base = make_loss("pu")
    assert torch.equal(DistilledLoss(base, teacher, 0.0)(z, b), base(z, b))


def test_alpha_one_with_the_student_as_teacher_gives_zero_gradient() -> None:
    student = new_model(10, alpha=1.0)
    trainer = Trainer(student, TrainConfig())
    trainer.set_teacher(copy.deepcopy(student))
    b = batch(30)
    loss = trainer.objective(student(b), b)
    names = [n for n, _ in student.named_parameters()]
    grads = torch.autograd.grad(loss, [p for _, p in student.named_parameters()])
    for name, g in zip(names, grads, strict=True):
        dense = g.to_dense() if g.is_sparse else g
        assert torch.count_nonzero(dense) == 0, name
    before = {k: v.clone() for k, v in student.flat_state_dict().items()}
    trainer.train_step(b)
    after = student.flat_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # The same step without the teacher moves the weights: the zero is the teacher's doing.
    trainer.set_teacher(None)
    trainer.train_step(b)
    assert not all(torch.equal(before[k], student.flat_state_dict()[k]) for k in before)


def test_the_teacher_never_changes_and_gets_no_gradient() -> None:
    teacher = new_model(12)
    original = {k: v.clone() for k, v in teacher.flat_state_dict().items()}
    trainer = Trainer(new_model(11), TrainConfig(lr=1e-2, embedding_lr=5e-2))
    trainer.set_teacher(teacher)
    kept = trainer.teacher
    assert kept is not None
    assert kept is not teacher
    assert not kept.training
    assert all(not p.requires_grad for p in kept.parameters())
    for k in range(30):
        trainer.train_step(batch(40 + k))
    for model in (teacher, kept):
        now = model.flat_state_dict()
        assert all(torch.equal(original[k], now[k]) for k in original)
        assert all(p.grad is None for p in model.parameters())
    moved = trainer.model.flat_state_dict()
    assert not torch.equal(moved["bias"], original["bias"])


def test_the_teacher_is_the_model_as_it_was_when_set() -> None:
    teacher = new_model(13)
    trainer = Trainer(new_model(14), TrainConfig())
    trainer.set_teacher(teacher)
    b = batch(50)
    with torch.no_grad():
        want = teacher(b)
        teacher.bias.add_(5.0)
    kept = trainer.teacher
    assert kept is not None
    with torch.no_grad():
        assert torch.equal(kept(b), want)


def test_no_teacher_and_clearing_it_train_the_base_loss() -> None:
    trainer = Trainer(new_model(15), TrainConfig())
    assert trainer.teacher is None
    assert trainer.objective is trainer.loss
    trainer.set_teacher(new_model(16))
    assert isinstance(trainer.objective, DistilledLoss)
    trainer.set_teacher(None)
    assert trainer.teacher is None
    assert trainer.objective is trainer.loss


def test_teachers_of_another_arch_schema_buckets_or_logit_space_are_refused() -> None:
    trainer = Trainer(new_model(0), TrainConfig())
    with pytest.raises(SchemaMismatchError, match=r"teacher: .*arch: expected 'deepfm', got 'lr'"):
        trainer.set_teacher(new_model(1, arch="lr"))
    other = Schema((*SCHEMA.features, FeatureSpec("extra", "dense")))
    with pytest.raises(
        SchemaMismatchError,
        match=rf"schema fingerprint: expected '{SCHEMA.fingerprint()}', "
        rf"got '{other.fingerprint()}'",
    ):
        trainer.set_teacher(new_model(1, schema=other))
    with pytest.raises(SchemaMismatchError, match=r"buckets: expected 128, got 64"):
        trainer.set_teacher(new_model(1, buckets=64))
    with pytest.raises(
        SchemaMismatchError,
        match=r"loss: expected one with true-rate logits like 'bce', got 'fnc' "
        r"\(biased-rate logits\)",
    ):
        trainer.set_teacher(new_model(1, loss="fnc"))
    with pytest.raises(SchemaMismatchError, match=r"arch: .*; schema fingerprint: .*; loss: "):
        trainer.set_teacher(new_model(1, arch="lr", schema=other, loss="fnc"))
    assert trainer.teacher is None
    # Losses of one logit space mix: a pu day model teaches a bce online model.
    trainer.set_teacher(new_model(1, loss="pu"))
    assert trainer.teacher is not None


def test_the_student_itself_is_refused_as_its_teacher() -> None:
    trainer = Trainer(new_model(0), TrainConfig())
    with pytest.raises(ValueError, match=r"expected a model other than the one this trainer"):
        trainer.set_teacher(trainer.model)


def test_an_alpha_outside_zero_one_is_refused() -> None:
    trainer = Trainer(new_model(0, alpha=1.5), TrainConfig())
    with pytest.raises(
        ConfigError, match=r"'models.ctr.distill_alpha': expected a number in \[0, 1\], got 1.5"
    ):
        trainer.set_teacher(new_model(1))
    with pytest.raises(ValueError, match=r"DistilledLoss: expected alpha in \[0, 1\], got -0.1"):
        DistilledLoss(make_loss("bce"), new_model(1), -0.1)
    with pytest.raises(ValueError, match=r"expected alpha in \[0, 1\], got nan"):
        DistilledLoss(make_loss("bce"), new_model(1), float("nan"))


def test_teacher_logits_of_another_shape_are_refused() -> None:
    b = batch(0)
    loss = DistilledLoss(make_loss("bce"), lambda x: torch.zeros(len(x) + 1), 0.5)
    with pytest.raises(
        ValueError, match=r"expected teacher logits of the student's shape \[64\], got \[65\]"
    ):
        loss(torch.zeros(64), b)
