"""The trainer: learning, test-then-train, optimizers, counters, bad batches, freezing."""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import pytest
import torch

from minutely.config import ModelConfig, TrainConfig
from minutely.errors import CheckpointError, ConfigError
from minutely.evaluate import AUC, LogLoss
from minutely.model import HOUR_LEVEL, CtrModel, build_model, model_groups, synthetic_batch
from minutely.schema import default_schema
from minutely.train import DENSE, SPARSE, RowSparseAdam, Trainer, TrainerState

SCHEMA = default_schema()
BUCKETS = 512


def new_model(arch: str = "deepfm", seed: int = 0) -> CtrModel:
    torch.manual_seed(seed)
    return build_model(
        ModelConfig(arch=arch, buckets=BUCKETS, embedding_dim=4, hidden=(16,)), SCHEMA
    )


def batch(seed: int, n: int = 256) -> object:
    return synthetic_batch(SCHEMA, n, buckets=BUCKETS, seed=seed, vocab=40)


@pytest.mark.parametrize("arch", ["lr", "deepfm"])
def test_trainer_learns_the_hidden_signal(arch: str) -> None:
    trainer = Trainer(new_model(arch), TrainConfig(lr=1e-2, embedding_lr=5e-2))
    for k in range(40):
        trainer.train_step(batch(k))
    held_out = synthetic_batch(SCHEMA, 4000, buckets=BUCKETS, seed=999, vocab=40)
    preds = trainer.predict(held_out)
    labels = held_out.labels.numpy()
    auc, ll = AUC(), LogLoss()
    auc.update(preds, labels)
    ll.update(preds, labels)
    base = labels.mean()
    constant_ll = -(base * math.log(base) + (1 - base) * math.log(1 - base))
    assert auc.get() > 0.75
    assert ll.get() < constant_ll - 0.05


def test_evaluate_then_train_returns_the_predictions_made_before_the_update() -> None:
    trainer = Trainer(new_model(), TrainConfig())
    trainer.train_step(batch(0))
    b = batch(1)
    before = trainer.predict(b)
    got = trainer.evaluate_then_train(b)
    after = trainer.predict(b)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, before)
    assert not np.array_equal(after, before)
    assert trainer.steps == 2
    assert trainer.samples_seen == 2 * len(b)  # type: ignore[arg-type]


def test_train_step_returns_the_loss_before_the_update() -> None:
    model = new_model("lr")
    trainer = Trainer(model, TrainConfig())
    b = batch(3)
    want = torch.nn.functional.binary_cross_entropy_with_logits(model(b).detach(), b.labels)  # type: ignore[attr-defined]
    assert trainer.train_step(b) == pytest.approx(want.item(), rel=1e-6)


def test_tables_go_to_sparse_adam_and_the_rest_to_adam_with_their_rates() -> None:
    model = new_model()
    cfg = TrainConfig(lr=3e-3, embedding_lr=7e-2)
    opts = Trainer(model, cfg).optimizers
    assert set(opts) == {SPARSE, DENSE}
    assert isinstance(opts[SPARSE], RowSparseAdam)
    assert type(opts[DENSE]) is torch.optim.Adam
    tables = {id(p) for _, p in model.embedding_parameters()}
    sparse_params = {id(p) for g in opts[SPARSE].param_groups for p in g["params"]}
    dense_params = {id(p) for g in opts[DENSE].param_groups for p in g["params"]}
    assert sparse_params == tables
    assert dense_params == {id(p) for p in model.parameters()} - tables
    assert opts[SPARSE].param_groups[0]["lr"] == 7e-2
    assert opts[DENSE].param_groups[0]["lr"] == 3e-3


def test_a_step_touches_only_the_table_rows_the_batch_looked_up() -> None:
    model = new_model()
    trainer = Trainer(model, TrainConfig())
    before = model.embeddings["ad_id"].weight.detach().clone()
    b = synthetic_batch(SCHEMA, 64, buckets=BUCKETS, seed=0, vocab=10)
    trainer.train_step(b)
    after = model.embeddings["ad_id"].weight.detach()
    changed = (after != before).any(1).nonzero().flatten().tolist()
    assert changed
    assert set(changed) <= set(b.sparse["ad_id"].values.tolist())


def test_embedding_lr_zero_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"'train.embedding_lr': expected float > 0"):
        Trainer(new_model(), TrainConfig(embedding_lr=0.0))


def test_empty_batch_changes_nothing() -> None:
    trainer = Trainer(new_model(), TrainConfig())
    empty = synthetic_batch(SCHEMA, 0, buckets=BUCKETS, seed=0)
    assert math.isnan(trainer.train_step(empty))
    assert trainer.evaluate_then_train(empty).shape == (0,)
    assert trainer.predict(empty).shape == (0,)
    assert (trainer.steps, trainer.samples_seen) == (0, 0)


def test_a_batch_with_a_non_finite_loss_is_skipped_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = new_model()
    trainer = Trainer(model, TrainConfig())
    b = batch(0)
    dense = b.dense.clone()  # type: ignore[attr-defined]
    dense[5, 0] = float("nan")
    before = {k: v.clone() for k, v in model.flat_state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="minutely.train.trainer"):
        loss = trainer.train_step(dataclasses.replace(b, dense=dense))  # type: ignore[type-var]
    assert math.isnan(loss)
    assert "skipped a batch of 256 rows: loss is nan" in caplog.text
    assert trainer.state() == TrainerState(steps=0, samples_seen=0, skipped_batches=1)
    after = model.flat_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    trainer.train_step(b)
    assert trainer.steps == 1


def test_freezing_the_hour_level_group_keeps_it_at_its_values() -> None:
    model = new_model()
    trainer = Trainer(model, TrainConfig())
    params = dict(model.named_parameters())
    hourly = model_groups(model)[HOUR_LEVEL]
    for name in hourly:
        params[name].requires_grad_(False)
    before = {k: v.clone() for k, v in model.flat_state_dict().items()}
    for k in range(3):
        trainer.train_step(batch(k))
    after = model.flat_state_dict()
    for name in before:
        assert torch.equal(before[name], after[name]) == (name in hourly), name


def test_check_restore_refuses_states_of_other_optimizers() -> None:
    trainer = Trainer(new_model(), TrainConfig())
    trainer.train_step(batch(0))
    states = trainer.optimizer_state_dicts()
    with pytest.raises(CheckpointError, match=r"expected \['dense', 'sparse'\], got \['dense'\]"):
        trainer.check_restore({DENSE: states[DENSE]})
    lr_states = Trainer(new_model("lr"), TrainConfig()).optimizer_state_dicts()
    with pytest.raises(CheckpointError, match=r"optimizer 'dense' state: expected param groups"):
        trainer.check_restore({SPARSE: states[SPARSE], DENSE: lr_states[DENSE]})
    sparse = dict(states[SPARSE])
    sparse["state"] = {0: {"step": 1, "exp_avg": torch.zeros(3, 5)}}
    with pytest.raises(
        CheckpointError, match=r"param 0 'exp_avg': expected shape \[512, 5\], got \[3, 5\]"
    ):
        trainer.check_restore({SPARSE: sparse, DENSE: states[DENSE]})
    with pytest.raises(CheckpointError, match=r"expected 'param_groups' \(list\) and 'state'"):
        trainer.check_restore({SPARSE: {}, DENSE: states[DENSE]})


def test_restore_keeps_the_configured_learning_rates() -> None:
    a = Trainer(new_model(), TrainConfig(lr=1e-3, embedding_lr=1e-2))
    a.train_step(batch(0))
    b = Trainer(new_model(), TrainConfig(lr=5e-4, embedding_lr=3e-2))
    b.restore(TrainerState(1, 256, 0), a.optimizer_state_dicts())
    assert b.optimizers[DENSE].param_groups[0]["lr"] == 5e-4
    assert b.optimizers[SPARSE].param_groups[0]["lr"] == 3e-2
    assert (b.steps, b.samples_seen) == (1, 256)
