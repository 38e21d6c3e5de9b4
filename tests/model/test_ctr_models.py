"""Models: shapes, the parameter-name contract, exact outputs, init, groups, flat state dicts."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import safetensors.torch
import torch

from minutely.config import ModelConfig
from minutely.data.tensors import Jagged, TensorBatch
from minutely.errors import ConfigError, SchemaError, SchemaMismatchError
from minutely.model import (
    HOUR_LEVEL,
    OTHER,
    CtrModel,
    DeepFM,
    LogisticRegression,
    build_model,
    model_groups,
    synthetic_batch,
)
from minutely.schema import FeatureSpec, Schema, default_schema

BUCKETS = 64

# A small schema with every kind, including an hour-level sparse and an hour-level dense feature.
SMALL = Schema(
    features=(
        FeatureSpec("user", "sparse"),
        FeatureSpec("ad", "sparse"),
        FeatureSpec("ad_hour_bucket", "sparse", hour_level=True),
        FeatureSpec("tags", "multi_sparse"),
        FeatureSpec("age", "dense"),
        FeatureSpec("ctr_1h", "dense", hour_level=True),
        FeatureSpec("activity", "dense"),
    )
)


def cfg(arch: str = "deepfm", **kw: object) -> ModelConfig:
    base: dict[str, object] = {"arch": arch, "buckets": BUCKETS, "embedding_dim": 4}
    base["hidden"] = (8, 6)
    base.update(kw)
    return ModelConfig(**base)  # type: ignore[arg-type]


def hand_batch() -> TensorBatch:
    """Three rows; row 1 has an empty tag list, row 2 three tags (one repeated)."""
    ids = {"user": [1, 2, 3], "ad": [5, 5, 63], "ad_hour_bucket": [0, 7, 7]}
    sparse = {k: Jagged(torch.tensor(v), torch.arange(4)) for k, v in ids.items()}  # one id per row
    sparse["tags"] = Jagged(torch.tensor([4, 9, 9, 10]), torch.tensor([0, 1, 1, 4]))
    dense = torch.tensor([[0.5, 0.1, -1.0], [1.5, 0.2, 0.0], [-0.5, 0.3, 2.0]])
    return TensorBatch(
        sparse=sparse,
        dense=dense,
        labels=torch.tensor([0.0, 1.0, 0.0]),
        is_correction=torch.zeros(3, dtype=torch.bool),
        sample_ids=torch.arange(3),
        event_ts_ms=torch.zeros(3, dtype=torch.long),
        emit_ts_ms=torch.zeros(3, dtype=torch.long),
        label_ts_ms=torch.tensor([-1, 0, -1]),
    )


def randomize(model: CtrModel, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def pooled_row(model: CtrModel, batch: TensorBatch, name: str, row: int) -> torch.Tensor:
    """Reference pooling: the sum (single id) or mean (list; zeros if empty) of table rows."""
    table = model.embeddings[name].weight.detach()
    jag = batch.sparse[name]
    ids = jag.values[int(jag.offsets[row]) : int(jag.offsets[row + 1])].tolist()
    if not ids:
        return torch.zeros(table.shape[1])
    rows = torch.stack([table[i] for i in ids])
    return rows.mean(0) if model.schema.get(name).kind == "multi_sparse" else rows.sum(0)


# -- construction ---------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "cls"), [("lr", LogisticRegression), ("deepfm", DeepFM)])
def test_build_model_returns_the_architecture_and_logits_per_row(
    arch: str, cls: type[CtrModel]
) -> None:
    model = build_model(cfg(arch), SMALL)
    assert isinstance(model, cls)
    assert model.arch == arch
    batch = synthetic_batch(SMALL, 17, buckets=BUCKETS, seed=0)
    logits = model(batch)
    assert logits.shape == (17,)
    assert logits.dtype == torch.float32
    probs = model.predict(batch)
    assert not probs.requires_grad
    torch.testing.assert_close(probs, torch.sigmoid(logits.detach()))


def test_default_deepfm_parameter_names_and_shapes_are_the_artifact_contract() -> None:
    c = cfg("deepfm", buckets=128, embedding_dim=16, hidden=(128, 64))
    model = build_model(c, default_schema())
    shapes = {k: list(v.shape) for k, v in model.flat_state_dict().items()}
    sparse = [
        "user_id",
        "ad_id",
        "campaign_id",
        "advertiser_id",
        "category",
        "slot",
        "device",
        "hour_of_day",
        "user_interests",
    ]
    expected = {"bias": [1]}
    expected |= {f"embeddings.{f}.weight": [128, 17] for f in sparse}
    expected |= {
        "dense_linear.weight": [1, 2],
        "hour_dense_linear.weight": [1, 1],
        "mlp.from_embeddings.weight": [128, 9 * 16],
        "mlp.from_embeddings.bias": [128],
        "mlp.from_dense.weight": [128, 2],
        "mlp.from_hour_dense.weight": [128, 1],
        "mlp.hidden.0.weight": [64, 128],
        "mlp.hidden.0.bias": [64],
        "mlp.out.weight": [1, 64],
    }
    assert shapes == expected


def test_default_lr_parameter_names_and_shapes() -> None:
    model = build_model(cfg("lr", buckets=32), default_schema())
    shapes = {k: list(v.shape) for k, v in model.flat_state_dict().items()}
    assert shapes["bias"] == [1]
    assert shapes["embeddings.user_interests.weight"] == [32, 1]
    assert shapes["dense_linear.weight"] == [1, 2]
    assert shapes["hour_dense_linear.weight"] == [1, 1]
    assert len(shapes) == 1 + 9 + 2


def test_modules_without_input_have_no_key() -> None:
    no_dense = Schema(features=(FeatureSpec("a", "sparse"), FeatureSpec("b", "multi_sparse")))
    keys = set(build_model(cfg("deepfm"), no_dense).flat_state_dict())
    assert not any("dense" in k for k in keys)
    only_dense = Schema(features=(FeatureSpec("x", "dense"), FeatureSpec("y", "dense")))
    lr = build_model(cfg("lr"), only_dense)
    assert set(lr.flat_state_dict()) == {"bias", "dense_linear.weight"}
    batch = synthetic_batch(only_dense, 4, buckets=BUCKETS, seed=0)
    assert lr(batch).shape == (4,)


def test_init_is_deterministic_under_manual_seed_and_small() -> None:
    torch.manual_seed(11)
    a = build_model(cfg("deepfm", buckets=4096, embedding_dim=8), SMALL).flat_state_dict()
    torch.manual_seed(11)
    b = build_model(cfg("deepfm", buckets=4096, embedding_dim=8), SMALL).flat_state_dict()
    torch.manual_seed(12)
    c = build_model(cfg("deepfm", buckets=4096, embedding_dim=8), SMALL).flat_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["embeddings.user.weight"], c["embeddings.user.weight"])
    table = a["embeddings.user.weight"]
    assert torch.count_nonzero(table[:, 0]) == 0  # first-order weights start at zero
    assert table[:, 1:].std().item() == pytest.approx(0.01, rel=0.05)
    assert torch.count_nonzero(a["dense_linear.weight"]) == 0
    assert a["bias"].item() == 0.0


def test_initial_rate_sets_the_bias_to_its_logit() -> None:
    model = build_model(cfg("lr"), SMALL, initial_rate=0.03)
    batch = synthetic_batch(SMALL, 5, buckets=BUCKETS, seed=0)
    torch.testing.assert_close(model.predict(batch), torch.full((5,), 0.03))
    with pytest.raises(ValueError, match=r"expected initial_rate in \(0, 1\), got 1.0"):
        build_model(cfg("lr"), SMALL, initial_rate=1.0)


def test_bad_config_and_schema_are_refused() -> None:
    with pytest.raises(
        ConfigError, match=r"'models\[ctr\].arch': expected one of \['deepfm', 'lr'\]"
    ):
        build_model(cfg("dcn"), SMALL)
    with pytest.raises(ConfigError, match=r"'models\[ctr\].hidden': expected one or more layer"):
        build_model(cfg("deepfm", hidden=()), SMALL)
    with pytest.raises(ConfigError, match=r"got \(8, 0\)"):
        build_model(cfg("deepfm", hidden=(8, 0)), SMALL)
    only_dense = Schema(features=(FeatureSpec("x", "dense"),))
    with pytest.raises(SchemaError, match="deepfm model: expected at least one sparse feature"):
        build_model(cfg("deepfm"), only_dense)


# -- exact outputs --------------------------------------------------------------------------


def test_lr_logit_is_bias_plus_pooled_first_order_weights_plus_dense_terms() -> None:
    model = build_model(cfg("lr"), SMALL)
    randomize(model)
    batch = hand_batch()
    got = model(batch).detach()
    w_dense = model.dense_linear.weight.detach()[0]  # type: ignore[union-attr]
    w_hour = model.hour_dense_linear.weight.detach()[0]  # type: ignore[union-attr]
    for r in range(3):
        want = model.bias.detach()[0].clone()
        for name in model.sparse_names:
            want += pooled_row(model, batch, name, r)[0]
        want += batch.dense[r, 0] * w_dense[0] + batch.dense[r, 2] * w_dense[1]
        want += batch.dense[r, 1] * w_hour[0]
        torch.testing.assert_close(got[r], want)


def test_deepfm_logit_is_first_order_plus_pairwise_fm_plus_one_mlp_over_the_concatenation() -> None:
    model = build_model(cfg("deepfm"), SMALL)
    randomize(model)
    batch = hand_batch()
    got = model(batch).detach()
    mlp = model.mlp
    # The split first layer is one linear map over [embeddings, regular dense, hourly dense].
    w0 = torch.cat(
        [
            mlp.from_embeddings.weight,
            mlp.from_dense.weight,  # type: ignore[union-attr]
            mlp.from_hour_dense.weight,  # type: ignore[union-attr]
        ],
        1,
    ).detach()
    for r in range(3):
        rows = {n: pooled_row(model, batch, n, r) for n in model.sparse_names}
        first = model.bias.detach()[0] + sum(v[0] for v in rows.values())
        first += model.dense_linear(batch.dense[r, [0, 2]]).detach()[0]  # type: ignore[misc]
        first += model.hour_dense_linear(batch.dense[r, [1]]).detach()[0]  # type: ignore[misc]
        embs = [v[1:] for v in rows.values()]
        fm = sum(torch.dot(a, b) for a, b in itertools.combinations(embs, 2))
        x = torch.cat([*embs, batch.dense[r, [0, 2]], batch.dense[r, [1]]])
        h = torch.relu(w0 @ x + mlp.from_embeddings.bias.detach())
        h = torch.relu(mlp.hidden[0].weight.detach() @ h + mlp.hidden[0].bias.detach())
        deep = (mlp.out.weight.detach() @ h)[0]
        torch.testing.assert_close(got[r], first + fm + deep, rtol=1e-5, atol=1e-5)


def test_empty_batch_gives_empty_logits() -> None:
    for arch in ("lr", "deepfm"):
        model = build_model(cfg(arch), SMALL)
        assert model(synthetic_batch(SMALL, 0, buckets=BUCKETS, seed=0)).shape == (0,)


def test_gradients_of_tables_are_sparse() -> None:
    model = build_model(cfg("deepfm"), SMALL)
    model(synthetic_batch(SMALL, 8, buckets=BUCKETS, seed=0)).sum().backward()
    for name, p in model.embedding_parameters():
        assert p.grad is not None, name
        assert p.grad.is_sparse, name
    for name, p in model.dense_parameters():
        assert p.grad is not None, name
        assert not p.grad.is_sparse, name
    names = [n for n, _ in model.embedding_parameters()]
    assert names == [f"embeddings.{f.name}.weight" for f in SMALL.sparse]


# -- bad batches ----------------------------------------------------------------------------


def test_a_batch_without_a_feature_is_refused() -> None:
    model = build_model(cfg("lr"), SMALL)
    b = hand_batch()
    partial = dataclasses.replace(b, sparse={k: v for k, v in b.sparse.items() if k != "tags"})
    with pytest.raises(SchemaError, match=r"lr model: batch lacks sparse features \['tags'\]"):
        model(partial)


def test_a_batch_with_the_wrong_dense_width_is_refused() -> None:
    model = build_model(cfg("deepfm"), SMALL)
    b = dataclasses.replace(hand_batch(), dense=torch.zeros(3, 2))
    with pytest.raises(SchemaError, match=r"expected dense of shape \[3, 3\], got \[3, 2\]"):
        model(b)


def test_ids_outside_the_buckets_are_refused_naming_the_feature() -> None:
    model = build_model(cfg("deepfm"), SMALL)
    b = hand_batch()
    sparse = dict(b.sparse)
    sparse["ad"] = Jagged(torch.tensor([1, BUCKETS, 2]), torch.arange(4))
    with pytest.raises(SchemaError, match=r"feature 'ad': expected ids in \[0, 64\).*\[1, 64\]"):
        model(dataclasses.replace(b, sparse=sparse))


# -- groups ---------------------------------------------------------------------------------


def test_model_groups_split_every_parameter_by_hour_level() -> None:
    model = build_model(cfg("deepfm"), SMALL)
    groups = model_groups(model)
    assert groups[HOUR_LEVEL] == [
        "embeddings.ad_hour_bucket.weight",
        "hour_dense_linear.weight",
        "mlp.from_hour_dense.weight",
    ]
    names = [n for n, _ in model.named_parameters()]
    assert sorted(groups[HOUR_LEVEL] + groups[OTHER]) == sorted(names)
    assert not set(groups[HOUR_LEVEL]) & set(groups[OTHER])


@pytest.mark.parametrize(("zeroed", "silent"), [([1], "hour"), ([0, 2], "regular")])
def test_dense_weights_of_hour_level_features_live_in_their_own_modules(
    zeroed: list[int], silent: str
) -> None:
    """With one kind of dense column zeroed, only the other kind's modules get gradients."""
    model = build_model(cfg("deepfm"), SMALL)
    randomize(model)
    batch = hand_batch()
    dense = batch.dense.clone()
    dense[:, zeroed] = 0.0
    model(dataclasses.replace(batch, dense=dense)).sum().backward()
    by_kind = {
        "hour": ["hour_dense_linear.weight", "mlp.from_hour_dense.weight"],
        "regular": ["dense_linear.weight", "mlp.from_dense.weight"],
    }
    params = dict(model.named_parameters())
    for kind, names in by_kind.items():
        for name in names:
            grad = params[name].grad
            assert grad is not None
            assert (grad.abs().sum() == 0) == (kind == silent), name
    assert set(by_kind["hour"]) <= set(model_groups(model)[HOUR_LEVEL])
    assert set(by_kind["regular"]) <= set(model_groups(model)[OTHER])


def test_lr_groups_on_the_default_schema() -> None:
    groups = model_groups(build_model(cfg("lr"), default_schema()))
    assert groups[HOUR_LEVEL] == ["hour_dense_linear.weight"]


# -- flat state dicts -----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["lr", "deepfm"])
def test_flat_state_dict_round_trips_through_safetensors(arch: str) -> None:
    a = build_model(cfg(arch), SMALL)
    randomize(a, seed=5)
    blob = safetensors.torch.save(a.flat_state_dict())
    b = build_model(cfg(arch), SMALL)
    b.load_flat_state_dict(safetensors.torch.load(blob))
    batch = synthetic_batch(SMALL, 20, buckets=BUCKETS, seed=4)
    assert torch.equal(a.predict(batch), b.predict(batch))


def test_flat_state_dict_with_missing_or_unexpected_keys_is_refused() -> None:
    model = build_model(cfg("deepfm"), SMALL)
    tensors = model.flat_state_dict()
    del tensors["mlp.out.weight"]
    tensors["mlp.extra"] = torch.zeros(1)
    with pytest.raises(
        SchemaMismatchError,
        match=r"deepfm model weights: .*missing \['mlp.out.weight'\], unexpected \['mlp.extra'\]",
    ):
        model.load_flat_state_dict(tensors)


def test_flat_state_dict_with_a_wrong_shape_or_dtype_is_refused_and_changes_nothing() -> None:
    model = build_model(cfg("deepfm"), SMALL)
    before = {k: v.clone() for k, v in model.flat_state_dict().items()}
    other = build_model(cfg("deepfm", buckets=2 * BUCKETS), SMALL).flat_state_dict()
    with pytest.raises(
        SchemaMismatchError,
        match=r"key 'embeddings.user.weight': expected shape \[64, 5\], got \[128, 5\]",
    ):
        model.load_flat_state_dict(other)
    after = model.flat_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    halves = {k: v.half() for k, v in before.items()}
    with pytest.raises(SchemaMismatchError, match=r"key 'bias': expected dtype torch.float32"):
        model.load_flat_state_dict(halves)


# -- synthetic batches ----------------------------------------------------------------------


def test_synthetic_batches_are_reproducible_and_well_formed() -> None:
    a = synthetic_batch(default_schema(), 50, buckets=100, seed=9, vocab=1_000)
    b = synthetic_batch(default_schema(), 50, buckets=100, seed=9, vocab=1_000)
    assert torch.equal(a.labels, b.labels)
    assert torch.equal(a.dense, b.dense)
    for name, jag in a.sparse.items():
        assert torch.equal(jag.values, b.sparse[name].values)
        assert jag.offsets.shape == (51,)
        assert int(jag.offsets[-1]) == jag.values.numel()
        assert int(jag.values.max()) < 100
    assert set(a.labels.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match=r"expected batch_size >= 0.*got -1"):
        synthetic_batch(default_schema(), -1, buckets=100, seed=0)
