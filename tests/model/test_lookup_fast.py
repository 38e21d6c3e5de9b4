"""The deduplicating lookup equals per-table EmbeddingBag pooling, values and gradients."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import Tensor

from minutely.config import ModelConfig, TrainConfig
from minutely.data.tensors import Jagged, TensorBatch
from minutely.errors import SchemaError
from minutely.model import CtrModel, build_model, synthetic_batch
from minutely.model.lookup import _sort_rows, plan_lookup
from minutely.schema import FeatureSpec, Schema
from minutely.train import Trainer

BUCKETS = 50

SCHEMA = Schema(
    features=(
        FeatureSpec("user", "sparse"),
        FeatureSpec("tags", "multi_sparse"),
        FeatureSpec("ad", "sparse"),
        FeatureSpec("ad_hour", "sparse", hour_level=True),
        FeatureSpec("topics", "multi_sparse"),
        FeatureSpec("age", "dense"),
        FeatureSpec("ctr_1h", "dense", hour_level=True),
    )
)
SINGLE_ONLY = Schema(features=tuple(FeatureSpec(f"f{i}", "sparse") for i in range(5)))


def model(arch: str, schema: Schema = SCHEMA, seed: int = 0, buckets: int = BUCKETS) -> CtrModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(arch=arch, buckets=buckets, embedding_dim=3, hidden=(6, 4))
    m = build_model(cfg, schema)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m


def batch(schema: Schema, n: int, seed: int, vocab: int = 12) -> TensorBatch:
    """Few distinct ids (many duplicates) and lists of 0 to 4 ids (some empty)."""
    return synthetic_batch(schema, n, buckets=BUCKETS, seed=seed, vocab=vocab, max_list=4)


def reference_rows(m: CtrModel, b: TensorBatch) -> Tensor:
    """What every table's nn.EmbeddingBag pools: ``[B, F, 1 + dim]``."""
    return torch.stack(
        [m.embeddings[n](b.sparse[n].values, b.sparse[n].offsets) for n in m.sparse_names], 1
    )


def reference_logits(m: CtrModel, b: TensorBatch) -> Tensor:
    """The model's function written with the reference pooling and autograd throughout."""
    rows = reference_rows(m, b)
    regular, hourly = m.dense_parts(b)
    first = m.first_order_logit(rows, regular, hourly)
    if m.arch == "lr":
        return first
    emb = rows[:, :, 1:]
    total = emb.sum(1)
    fm = 0.5 * (total * total - (emb * emb).sum(1)).sum(1)
    deep: Tensor = m.mlp(emb.flatten(1), regular, hourly)  # type: ignore[operator]
    return first + fm + deep


def grads(m: CtrModel) -> dict[str, Tensor]:
    out = {}
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        out[name] = p.grad.to_dense() if p.grad.is_sparse else p.grad.clone()
    return out


@pytest.mark.parametrize("buckets", [50, 1 << 58], ids=["packed_sort", "argsort"])
def test_rows_are_sorted_stably_with_the_column_of_each_id(buckets: int) -> None:
    rng = np.random.default_rng(0)
    raw = rng.integers(0, min(buckets, 1 << 40), (6, 300), dtype=np.int64)
    raw[:, :50] = 7  # ties
    sorted_ids, columns = _sort_rows(raw, buckets)
    want = np.argsort(raw, axis=1, kind="stable")
    assert np.array_equal(columns, want)
    assert np.array_equal(sorted_ids, np.take_along_axis(raw, want, 1))


@pytest.mark.parametrize("schema", [SCHEMA, SINGLE_ONLY], ids=["mixed", "single_ids"])
@pytest.mark.parametrize("n", [1, 2, 37])
def test_lookup_equals_embedding_bag_pooling_in_values_and_gradients(
    schema: Schema, n: int
) -> None:
    fast, ref = model("deepfm", schema), model("deepfm", schema)
    b = batch(schema, n, seed=n)
    got, want = fast.lookup(b), reference_rows(ref, b)
    torch.testing.assert_close(got, want)
    weights = torch.randn(want.shape, generator=torch.Generator().manual_seed(5))
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    g_fast, g_ref = grads_of_tables(fast), grads_of_tables(ref)
    for name in g_ref:
        torch.testing.assert_close(g_fast[name], g_ref[name])


def test_a_large_batch_read_on_two_threads_equals_embedding_bag_pooling() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        buckets = 20_000
        fast, ref = (
            model("deepfm", SINGLE_ONLY, buckets=buckets),
            model("deepfm", SINGLE_ONLY, buckets=buckets),
        )
        b = synthetic_batch(SINGLE_ONLY, 3000, buckets=buckets, seed=1, vocab=buckets)
        got, want = fast.lookup(b), reference_rows(ref, b)
        torch.testing.assert_close(got, want)
        got.sum().backward()
        want.sum().backward()
        g_fast, g_ref = grads_of_tables(fast), grads_of_tables(ref)
        for name in g_ref:
            torch.testing.assert_close(g_fast[name], g_ref[name])
    finally:
        torch.set_num_threads(before)


def grads_of_tables(m: CtrModel) -> dict[str, Tensor]:
    out = {}
    for name, p in m.embedding_parameters():
        assert p.grad is not None, name
        assert p.grad.is_sparse, name
        out[name] = p.grad.to_dense()
    return out


@pytest.mark.parametrize("arch", ["deepfm", "lr"])
@pytest.mark.parametrize(("schema", "n"), [(SCHEMA, 64), (SCHEMA, 1), (SINGLE_ONLY, 300)])
def test_model_logits_and_every_gradient_equal_the_reference(
    arch: str, schema: Schema, n: int
) -> None:
    fast, ref = model(arch, schema), model(arch, schema)
    b = batch(schema, n, seed=3)
    got, want = fast(b), reference_logits(ref, b)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    target = torch.randn(n, generator=torch.Generator().manual_seed(9))
    ((got - target) ** 2).sum().backward()
    ((want - target) ** 2).sum().backward()
    g_fast, g_ref = grads(fast), grads(ref)
    assert g_fast.keys() == g_ref.keys()
    for name in g_ref:
        torch.testing.assert_close(g_fast[name], g_ref[name], rtol=1e-4, atol=1e-5)


def test_table_gradients_hold_each_touched_row_once_in_order() -> None:
    m = model("deepfm")
    b = batch(SCHEMA, 200, seed=4)
    m(b).sum().backward()
    for name, p in m.embedding_parameters():
        grad = p.grad
        assert grad is not None
        rows = grad._indices()[0]
        feature = name.split(".")[1]
        assert torch.equal(rows, b.sparse[feature].values.unique())
        assert grad._values().shape == (rows.numel(), m.table_width)


def test_empty_lists_pool_to_zero_and_get_no_gradient() -> None:
    m = model("deepfm")
    b = batch(SCHEMA, 6, seed=1)
    empty = Jagged(torch.zeros(0, dtype=torch.long), torch.zeros(7, dtype=torch.long))
    some = Jagged(torch.tensor([3, 3, 8]), torch.tensor([0, 0, 0, 2, 2, 3, 3]))
    b = dataclasses.replace(b, sparse={**b.sparse, "tags": empty, "topics": some})
    rows = m.lookup(b)
    names = list(m.sparse_names)
    assert torch.count_nonzero(rows[:, names.index("tags")]) == 0
    topics = m.embeddings["topics"].weight.detach()
    torch.testing.assert_close(rows[2, names.index("topics")], topics[3])  # mean of [3, 3]
    torch.testing.assert_close(rows[4, names.index("topics")], topics[8])
    assert torch.count_nonzero(rows[[0, 1, 3, 5], names.index("topics")]) == 0
    m(b).sum().backward()
    tags = m.embeddings["tags"].weight.grad
    assert tags is not None
    assert tags._nnz() == 0
    topics_grad = m.embeddings["topics"].weight.grad
    assert topics_grad is not None
    assert topics_grad._indices()[0].tolist() == [3, 8]


def test_a_single_id_feature_with_other_offsets_is_summed_per_row() -> None:
    m = model("deepfm")
    b = batch(SCHEMA, 4, seed=2)
    two_in_row_one = Jagged(torch.tensor([1, 2, 2, 7]), torch.tensor([0, 1, 3, 3, 4]))
    b = dataclasses.replace(b, sparse={**b.sparse, "user": two_in_row_one})
    ref = model("deepfm")
    torch.testing.assert_close(m.lookup(b), reference_rows(ref, b))
    torch.testing.assert_close(m(b), reference_logits(ref, b), rtol=1e-5, atol=1e-5)


def test_frozen_tables_get_no_gradient_and_stay_put_in_training() -> None:
    m = model("deepfm")
    frozen = m.embeddings["ad_hour"].weight
    frozen.requires_grad_(False)
    before = frozen.detach().clone()
    trainer = Trainer(m, TrainConfig())
    for seed in range(3):
        trainer.train_step(batch(SCHEMA, 32, seed=seed))
    assert frozen.grad is None
    assert torch.equal(frozen, before)
    user = m.embeddings["user"].weight
    assert user.grad is not None
    assert user.grad._nnz() > 0


def test_all_tables_frozen_as_for_a_teacher_still_scores() -> None:
    m = model("deepfm")
    for p in m.parameters():
        p.requires_grad_(False)
    b = batch(SCHEMA, 16, seed=6)
    out = m(b)
    assert not out.requires_grad
    torch.testing.assert_close(out, reference_logits(model("deepfm"), b).detach())
    with torch.inference_mode():
        torch.testing.assert_close(m(b), out)


@pytest.mark.parametrize(
    ("feature", "ids", "got"),
    [("ad", [1, BUCKETS, 2], rf"\[1, {BUCKETS}\]"), ("tags", [0, -3, 4], r"\[-3, 4\]")],
)
def test_ids_outside_the_buckets_are_refused_naming_the_feature(
    feature: str, ids: list[int], got: str
) -> None:
    m = model("deepfm")
    b = batch(SCHEMA, 3, seed=0)
    bad = Jagged(torch.tensor(ids), torch.arange(4))
    with pytest.raises(
        SchemaError,
        match=rf"feature '{feature}': expected ids in \[0, {BUCKETS}\) and 4 offsets, "
        rf"got ids in {got} and 4 offsets \(an id out of range\)",
    ):
        m(dataclasses.replace(b, sparse={**b.sparse, feature: bad}))


@pytest.mark.parametrize(
    ("feature", "offsets"),
    [
        ("topics", [0, 2, 1, 2]),  # decreasing
        ("topics", [0, 1, 2]),  # one row short
        ("topics", [1, 1, 2, 2]),  # not starting at 0
        ("user", [0, 1, 2]),  # a single-id feature, one row short
    ],
)
def test_offsets_that_do_not_fit_the_batch_are_refused_naming_the_feature(
    feature: str, offsets: list[int]
) -> None:
    m = model("deepfm")
    b = batch(SCHEMA, 3, seed=0)
    bad = Jagged(torch.tensor([1, 2]), torch.tensor(offsets))
    with pytest.raises(
        SchemaError,
        match=rf"feature '{feature}': expected ids in \[0, 50\) and 4 offsets, "
        rf"got ids in \[1, 2\] and {len(offsets)} offsets \(offsets must start at 0, never "
        r"decrease and end at the 2 ids\)",
    ):
        m(dataclasses.replace(b, sparse={**b.sparse, feature: bad}))


def test_plan_rows_and_segments_invert_the_index() -> None:
    b = batch(SCHEMA, 25, seed=8)
    m = model("deepfm")
    jags = [b.sparse[n] for n in m.sparse_names]
    plan = plan_lookup(
        [j.values for j in jags],
        [j.offsets for j in jags],
        [f.kind == "sparse" for f in SCHEMA.sparse],
        BUCKETS,
        len(b),
    )
    flat = plan.index.view(-1)
    n_rows = plan.segments.numel() - 1
    assert sorted(plan.order.tolist()) == list(range(flat.numel()))
    for r in range(n_rows):
        positions = plan.order[int(plan.segments[r]) : int(plan.segments[r + 1])]
        assert torch.all(flat[positions] == r)
    assert torch.equal(plan.order_rows, plan.order // len(m.sparse_names))
    for t, name in enumerate(m.sparse_names):
        assert torch.equal(plan.ids[t], b.sparse[name].values.unique())
