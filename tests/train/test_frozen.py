"""Frozen parameters: bit-identical after training, absent from every optimizer, checkpoints
that round trip, and the names that are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from minutely.config import ModelConfig, TrainConfig
from minutely.errors import CheckpointError
from minutely.model import CtrModel, build_model, model_groups, synthetic_batch
from minutely.schema import FeatureSpec, Schema, default_schema
from minutely.train import Trainer, frozen_names, load_latest_checkpoint, save_checkpoint

BUCKETS = 128
DEFAULT = default_schema()
# A schema with an hour-level id feature (an hourly CTR bucket) next to the dense one.
HOURLY_SPARSE = Schema(
    (
        FeatureSpec("user_id", "sparse"),
        FeatureSpec("ad_id", "sparse"),
        FeatureSpec("user_interests", "multi_sparse"),
        FeatureSpec("ad_ctr_bucket_1h", "sparse", hour_level=True),
        FeatureSpec("ad_age_hours", "dense"),
        FeatureSpec("ad_ctr_1h", "dense", hour_level=True),
    )
)
SCHEMAS = {"default": DEFAULT, "hourly_sparse": HOURLY_SPARSE}


def new_model(
    schema: Schema = DEFAULT, arch: str = "deepfm", seed: int = 0, *, freeze: bool = True
) -> CtrModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        arch=arch,  # type: ignore[arg-type]
        buckets=BUCKETS,
        embedding_dim=4,
        hidden=(8,),
        freeze_hour_level=freeze,
    )
    return build_model(cfg, schema)


def batches(schema: Schema, n: int, start: int = 0) -> list[object]:
    return [
        synthetic_batch(schema, 128, buckets=BUCKETS, seed=start + k, vocab=30) for k in range(n)
    ]


def optimizer_param_ids(trainer: Trainer) -> set[int]:
    return {id(p) for o in trainer.optimizers.values() for g in o.param_groups for p in g["params"]}


def test_frozen_names_are_the_hour_level_group_when_the_config_says_so() -> None:
    assert frozen_names(new_model()) == ["hour_dense_linear.weight", "mlp.from_hour_dense.weight"]
    assert frozen_names(new_model(arch="lr")) == ["hour_dense_linear.weight"]
    assert frozen_names(new_model(HOURLY_SPARSE)) == [
        "embeddings.ad_ctr_bucket_1h.weight",
        "hour_dense_linear.weight",
        "mlp.from_hour_dense.weight",
    ]
    assert frozen_names(new_model(freeze=False)) == []


@pytest.mark.parametrize("arch", ["lr", "deepfm"])
@pytest.mark.parametrize("schema_name", sorted(SCHEMAS))
def test_frozen_parameters_stay_bit_identical_while_the_rest_moves(
    schema_name: str, arch: str
) -> None:
    schema = SCHEMAS[schema_name]
    model = new_model(schema, arch)
    frozen = frozen_names(model)
    assert set(frozen) == set(model_groups(model)["hour_level"])
    trainer = Trainer(model, TrainConfig(lr=1e-2, embedding_lr=5e-2), frozen=frozen)
    assert trainer.frozen == frozenset(frozen)
    params = dict(model.named_parameters())
    assert all(not params[n].requires_grad for n in frozen)
    before = {k: v.clone() for k, v in model.flat_state_dict().items()}
    for b in batches(schema, 25):
        trainer.train_step(b)  # type: ignore[arg-type]
    after = model.flat_state_dict()
    for name in before:
        assert torch.equal(before[name], after[name]) == (name in frozen), name
    assert not {id(params[n]) for n in frozen} & optimizer_param_ids(trainer)
    for opt in trainer.optimizers.values():
        assert all(id(p) not in {id(params[n]) for n in frozen} for p in opt.state)
    for sd in trainer.optimizer_state_dicts().values():
        names = [n for g in sd["param_groups"] for n in g["param_names"]]
        assert not set(names) & set(frozen)
        assert len(sd["state"]) == len(names)  # every trained parameter has state


def test_a_frozen_hour_level_table_leaves_the_sparse_optimizer() -> None:
    model = new_model(HOURLY_SPARSE)
    trainer = Trainer(model, TrainConfig(), frozen=frozen_names(model))
    sparse = trainer.optimizer_state_dicts()["sparse"]
    assert sparse["param_groups"][0]["param_names"] == [
        "embeddings.user_id.weight",
        "embeddings.ad_id.weight",
        "embeddings.user_interests.weight",
    ]


def test_freezing_every_table_leaves_no_sparse_optimizer() -> None:
    model = new_model(arch="lr")
    tables = [n for n, _ in model.embedding_parameters()]
    trainer = Trainer(model, TrainConfig(), frozen=tables)
    assert set(trainer.optimizers) == {"dense"}
    before = {n: model.flat_state_dict()[n].clone() for n in tables}
    for b in batches(DEFAULT, 3):
        trainer.train_step(b)  # type: ignore[arg-type]
    assert all(torch.equal(before[n], model.flat_state_dict()[n]) for n in tables)


def test_unknown_frozen_names_are_refused_by_name() -> None:
    model = new_model(arch="lr")
    with pytest.raises(
        ValueError,
        match=r"frozen: expected parameter names of the lr model \(\['bias', .*\]\), "
        r"got unknown names \['mlp.nope', 'nope'\]",
    ):
        Trainer(model, TrainConfig(), frozen=["bias", "nope", "mlp.nope"])
    assert all(p.requires_grad for p in model.parameters())  # nothing was frozen
    with pytest.raises(
        ValueError, match=r"expected an iterable of parameter names, got the string"
    ):
        Trainer(model, TrainConfig(), frozen="bias")


@pytest.mark.parametrize("schema_name", sorted(SCHEMAS))
def test_a_checkpoint_with_frozen_parameters_round_trips(schema_name: str, tmp_path: Path) -> None:
    schema = SCHEMAS[schema_name]
    cfg = TrainConfig(lr=1e-2, embedding_lr=5e-2)
    model = new_model(schema, seed=1)
    trainer = Trainer(model, cfg, frozen=frozen_names(model))
    data = batches(schema, 8)
    for b in data[:5]:
        trainer.train_step(b)  # type: ignore[arg-type]
    save_checkpoint(tmp_path, model, trainer, {"x": b"1"})

    restored = new_model(schema, seed=2)
    again = Trainer(restored, cfg, frozen=frozen_names(restored))
    assert load_latest_checkpoint(tmp_path, restored, again) == {"x": b"1"}
    assert again.state() == trainer.state()
    want, got = model.flat_state_dict(), restored.flat_state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)
    for b in data[5:]:
        trainer.train_step(b)  # type: ignore[arg-type]
        again.train_step(b)  # type: ignore[arg-type]
    want, got = model.flat_state_dict(), restored.flat_state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_a_checkpoint_is_refused_by_a_trainer_with_other_frozen_parameters(
    tmp_path: Path,
) -> None:
    model = new_model(seed=1)
    trainer = Trainer(model, TrainConfig(), frozen=["dense_linear.weight"])
    trainer.train_step(batches(DEFAULT, 1)[0])  # type: ignore[arg-type]
    save_checkpoint(tmp_path, model, trainer)

    unfrozen = new_model(seed=2)
    with pytest.raises(CheckpointError, match=r"optimizer 'dense' state: expected param groups"):
        load_latest_checkpoint(tmp_path, unfrozen, Trainer(unfrozen, TrainConfig()))
    # Same number of parameters, other ones: refused by name.
    other = new_model(seed=3)
    before = {k: v.clone() for k, v in other.flat_state_dict().items()}
    with pytest.raises(
        CheckpointError,
        match=r"optimizer 'dense' state: expected the parameters \['bias', 'dense_linear.weight'"
        r".*got \['bias', 'hour_dense_linear.weight'",
    ):
        load_latest_checkpoint(
            tmp_path, other, Trainer(other, TrainConfig(), frozen=["hour_dense_linear.weight"])
        )
    assert all(torch.equal(before[k], v) for k, v in other.flat_state_dict().items())


def test_optimizer_states_without_parameter_names_are_still_restored() -> None:
    """States written before the groups listed their names are checked by count and shape."""
    model = new_model(seed=1)
    trainer = Trainer(model, TrainConfig(), frozen=frozen_names(model))
    trainer.train_step(batches(DEFAULT, 1)[0])  # type: ignore[arg-type]
    states = trainer.optimizer_state_dicts()
    for sd in states.values():
        for group in sd["param_groups"]:
            del group["param_names"]
    other = new_model(seed=2)
    again = Trainer(other, TrainConfig(), frozen=frozen_names(other))
    again.restore(trainer.state(), states)
    assert again.steps == 1
    mine = again.optimizer_state_dicts()
    assert mine["dense"]["param_groups"][0]["param_names"] == [
        n for n, _ in other.dense_parameters() if n not in frozen_names(other)
    ]
