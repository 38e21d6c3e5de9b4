"""Warm start and rollback: learned state by parameter name, exact continuation, its bytes,
and every state that does not fit."""

from __future__ import annotations

import json
import struct

import pytest
import safetensors.torch
import torch

from minutely.config import LossName, ModelConfig, TrainConfig
from minutely.data.tensors import TensorBatch
from minutely.errors import CheckpointError
from minutely.model import CtrModel, build_model, synthetic_batch
from minutely.schema import FeatureSpec, Schema, default_schema
from minutely.train import DENSE, SPARSE, Trainer, TrainingState, frozen_names

SCHEMA = default_schema()
BUCKETS = 128
CFG = TrainConfig(lr=1e-2, embedding_lr=5e-2)


def new_model(
    seed: int,
    arch: str = "deepfm",
    *,
    loss: LossName = "bce",
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
    )
    return build_model(cfg, schema)


def batch(seed: int) -> TensorBatch:
    return synthetic_batch(SCHEMA, 128, buckets=BUCKETS, seed=seed, vocab=30)


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.flat_state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def trained(seed: int, steps: int, arch: str = "deepfm", cfg: TrainConfig = CFG) -> Trainer:
    trainer = Trainer(new_model(seed, arch), cfg)
    for k in range(steps):
        trainer.train_step(batch(100 * seed + k))
    return trainer


@pytest.mark.parametrize("arch", ["lr", "deepfm"])
def test_a_warm_started_trainer_steps_exactly_as_its_source(arch: str) -> None:
    source = trained(1, 6, arch)
    target = trained(2, 3, arch)  # its own weights, optimizer state and counters
    target.warm_start(source)
    assert same(weights(target), weights(source))
    assert (target.steps, target.samples_seen) == (3, 3 * 128)
    for k in range(4):
        b = batch(500 + k)
        assert target.train_step(b) == source.train_step(b)
    assert same(weights(target), weights(source))
    assert (target.steps, target.samples_seen) == (7, 7 * 128)
    mine, theirs = target.snapshot().optimizer, source.snapshot().optimizer
    assert mine.keys() == theirs.keys()
    for name in mine:
        for key, value in mine[name].items():
            other = theirs[name][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


def test_a_warm_start_keeps_this_trainers_learning_rates() -> None:
    source = trained(1, 2)
    target = Trainer(new_model(2), TrainConfig(lr=5e-4, embedding_lr=2e-3))
    target.warm_start(source)
    assert target.optimizers[DENSE].param_groups[0]["lr"] == 5e-4
    assert target.optimizers[SPARSE].param_groups[0]["lr"] == 2e-3
    assert source.optimizers[DENSE].param_groups[0]["lr"] == CFG.lr


def test_a_warm_start_drops_the_state_of_parameters_frozen_here() -> None:
    source = trained(1, 5)
    model = new_model(2)
    frozen = frozen_names(model)
    target = Trainer(model, CFG, frozen=frozen)
    target.warm_start(source)
    start = weights(source)
    assert same(weights(target), start)  # frozen ones too: they keep the source's values
    assert not set(target.snapshot().optimizer) & set(frozen)
    assert set(target.snapshot().optimizer) == set(source.snapshot().optimizer) - set(frozen)
    b = batch(900)
    target.train_step(b)
    source.train_step(b)
    now, theirs = weights(target), weights(source)
    for name in now:
        if name in frozen:
            assert torch.equal(now[name], start[name]), name
            assert not torch.equal(theirs[name], start[name]), name
        else:  # the first step reads the same weights, so it is the source's step
            assert torch.equal(now[name], theirs[name]), name


def test_parameters_frozen_in_the_source_start_afresh_here() -> None:
    model = new_model(1)
    source = Trainer(model, CFG, frozen=frozen_names(model))
    for k in range(3):
        source.train_step(batch(k))
    target = trained(2, 2)
    target.warm_start(source)
    state = target.snapshot().optimizer
    assert not set(state) & set(frozen_names(model))
    target.train_step(batch(50))
    assert float(target.snapshot().optimizer["hour_dense_linear.weight"]["step"]) == 1.0
    assert float(target.snapshot().optimizer["bias"]["step"]) == 4.0


def test_rollback_to_a_snapshot_replays_the_same_steps() -> None:
    trainer = trained(3, 4)
    snap = trainer.snapshot()
    copy = trainer.snapshot()
    for k in range(3):
        trainer.train_step(batch(700 + k))
    first = weights(trainer)
    assert same(dict(snap.weights), dict(copy.weights))  # training did not reach the snapshot
    trainer.load_state(snap)
    assert same(weights(trainer), dict(copy.weights))
    for k in range(3):
        trainer.train_step(batch(700 + k))
    assert same(weights(trainer), first)
    trainer.load_state(snap)  # loadable again: loading copied it
    assert same(weights(trainer), dict(copy.weights))
    assert trainer.steps == 10  # the counters count on


def test_the_bytes_of_a_state_round_trip() -> None:
    source = trained(4, 3)
    state = source.snapshot()
    back = TrainingState.from_bytes(state.to_bytes())
    assert (back.arch, back.schema_fingerprint, back.loss) == (
        "deepfm",
        SCHEMA.fingerprint(),
        "bce",
    )
    assert same(dict(back.weights), dict(state.weights))
    assert back.optimizer.keys() == state.optimizer.keys()
    table = back.optimizer["embeddings.ad_id.weight"]
    assert type(table["step"]) is int
    assert table["step"] == 3
    assert isinstance(back.optimizer["bias"]["step"], torch.Tensor)  # Adam's tensor step
    target = Trainer(new_model(5), CFG)
    target.load_state(back)
    b = batch(1000)
    target.train_step(b)
    source.train_step(b)
    assert same(weights(target), weights(source))


def test_a_state_of_another_model_is_refused_and_changes_nothing() -> None:
    target = trained(6, 1)
    before = weights(target)
    cases: list[tuple[Trainer, str]] = [
        (Trainer(new_model(1, "lr"), CFG), r"arch: expected 'deepfm', got 'lr'"),
        (
            Trainer(
                new_model(1, schema=Schema((*SCHEMA.features, FeatureSpec("x", "dense")))), CFG
            ),
            r"schema fingerprint: expected '[0-9a-f]{16}', got '[0-9a-f]{16}'",
        ),
        (Trainer(new_model(1, loss="fnc"), CFG), r"loss: expected one with true-rate logits"),
        (
            Trainer(new_model(1, buckets=64), CFG),
            r"key 'embeddings.user_id.weight': expected shape \[128, 5\], got \[64, 5\]",
        ),
    ]
    for source, message in cases:
        with pytest.raises(CheckpointError, match=r"training state: .*" + message):
            target.warm_start(source)
    assert same(weights(target), before)
    target.warm_start(Trainer(new_model(1, loss="pu"), CFG))  # one logit space: accepted


def state_with(**changes: object) -> TrainingState:
    """A valid state of ``trained(7, 2)`` with its optimizer entries changed."""
    state = trained(7, 2).snapshot()
    optimizer = {k: dict(v) for k, v in state.optimizer.items()}
    for name, per_param in changes.items():
        if per_param is None:
            optimizer.pop(name.replace("__", "."), None)
        else:
            optimizer[name.replace("__", ".")] = per_param  # type: ignore[assignment]
    return TrainingState(state.arch, state.schema_fingerprint, state.loss, state.weights, optimizer)


def test_optimizer_state_that_does_not_fit_is_refused_by_name() -> None:
    target = trained(8, 1)
    before = weights(target)
    good = trained(7, 2).snapshot().optimizer["bias"]
    cases: list[tuple[TrainingState, str]] = [
        (state_with(nope=dict(good)), r"state of unknown parameters \['nope'\]"),
        (
            state_with(bias={"step": 1, "exp_avg": torch.zeros(1)}),
            r"state of 'bias': expected keys \['exp_avg', 'exp_avg_sq', 'step'\], "
            r"got \['exp_avg', 'step'\]",
        ),
        (
            state_with(bias={**good, "exp_avg": torch.zeros(3)}),
            r"state of 'bias' 'exp_avg': expected shape \[1\], got shape \[3\]",
        ),
        (
            state_with(bias={**good, "exp_avg_sq": 0.5}),
            r"state of 'bias' 'exp_avg_sq': expected shape \[1\], got float",
        ),
        (
            state_with(bias={**good, "exp_avg": torch.zeros(1, dtype=torch.long)}),
            r"'exp_avg': expected a floating-point tensor, got torch.int64",
        ),
        (state_with(bias={**good, "step": -2}), r"'step': expected a whole step >= 0, got -2.0"),
        (
            state_with(bias={**good, "step": torch.ones(2)}),
            r"'step': expected a scalar step, got a tensor of shape \[2\]",
        ),
    ]
    for state, message in cases:
        with pytest.raises(CheckpointError, match=r"training state: .*" + message):
            target.load_state(state)
    assert same(weights(target), before)
    # State of a frozen parameter is dropped, whatever it holds.
    model = new_model(9)
    frozen = Trainer(model, CFG, frozen=["bias"])
    frozen.load_state(state_with(bias={"anything": 1}))
    assert "bias" not in frozen.snapshot().optimizer


def test_missing_weights_are_refused() -> None:
    state = trained(7, 1).snapshot()
    partial = {k: v for k, v in state.weights.items() if k != "bias"}
    bad = TrainingState(state.arch, state.schema_fingerprint, state.loss, partial, state.optimizer)
    with pytest.raises(CheckpointError, match=r"training state: .*missing \['bias'\]"):
        trained(8, 0).load_state(bad)


def test_bytes_that_are_not_a_state_are_refused() -> None:
    with pytest.raises(CheckpointError, match=r"expected a safetensors file with .* got 5 bytes"):
        TrainingState.from_bytes(b"hello")
    plain = safetensors.torch.save({"weights/bias": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"'minutely.training_state' metadata, got \d+ bytes"):
        TrainingState.from_bytes(plain)
    other = safetensors.torch.save(
        {"weights/bias": torch.zeros(1)},
        metadata={"minutely.training_state": json.dumps({"format": 2})},
    )
    with pytest.raises(
        CheckpointError, match=r"expected metadata of format 1 .* got \{'format': 2\}"
    ):
        TrainingState.from_bytes(other)
    meta = {"format": 1, "arch": "lr", "schema_fingerprint": "f", "loss": "bce", "numbers": {}}
    stray = safetensors.torch.save(
        {"misc": torch.zeros(1)}, metadata={"minutely.training_state": json.dumps(meta)}
    )
    with pytest.raises(CheckpointError, match=r"expected tensors named .* got 'misc'"):
        TrainingState.from_bytes(stray)
    data = trained(7, 1).snapshot().to_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    with pytest.raises(CheckpointError, match=r"training state: unreadable tensors"):
        TrainingState.from_bytes(data[: 8 + n + 4])  # header intact, tensor data cut


def test_a_state_value_that_is_not_a_tensor_or_number_cannot_be_written() -> None:
    state = TrainingState("lr", "f", "bce", {"bias": torch.zeros(1)}, {"bias": {"step": "x"}})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match=r"state of 'bias' 'step': expected a tensor or a number"):
        state.to_bytes()
    slashed = TrainingState("lr", "f", "bce", {"bias": torch.zeros(1)}, {"bias": {"a/b": 1}})
    with pytest.raises(ValueError, match=r"expected state keys without '/', got 'a/b'"):
        slashed.to_bytes()
