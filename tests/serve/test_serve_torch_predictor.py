"""The default predictor: the artifact's real model, built from its manifest."""

from __future__ import annotations

import dataclasses
import doctest
import gc
import random
import warnings
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from starlette.exceptions import StarletteDeprecationWarning

import minutely.serve.torch_predictor as torch_predictor_mod
from minutely.clock import ReplayClock
from minutely.config import ModelConfig
from minutely.data import instances_to_tensors
from minutely.data.tensors import FeatureColumns, columns_from_instances
from minutely.errors import ArtifactError, SchemaError, SchemaMismatchError
from minutely.model import CtrModel, build_model
from minutely.model.artifact import (
    model_config_doc,
    model_config_from_manifest,
    model_from_artifact,
)
from minutely.registry import Manifest, Registry
from minutely.schema import Schema, default_schema
from minutely.serve import ModelHolder, Refusal, RegistryPoller, create_app, torch_factory
from minutely.serve.torch_predictor import TorchPredictor

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Using `httpx`", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

SCHEMA = default_schema()


def instances(n: int, seed: int = 0, schema: Schema = SCHEMA) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        inst: dict[str, Any] = {}
        for f in schema.features:
            if f.kind == "sparse":
                inst[f.name] = rng.randrange(10**9)
            elif f.kind == "multi_sparse":
                inst[f.name] = [rng.randrange(1000) for _ in range(rng.randrange(4))]
            else:
                inst[f.name] = rng.random()
        out.append(inst)
    return out


def trained_like(cfg: ModelConfig, seed: int) -> CtrModel:
    """A model with non-trivial weights (a fresh one starts at zero first-order weights)."""
    torch.manual_seed(seed)
    model = build_model(cfg, SCHEMA)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def publish(reg: Registry, cfg: ModelConfig, model: CtrModel) -> Manifest:
    return reg.publish(
        cfg.name,
        model.state_dict(),
        created_ms=0,
        arch=cfg.arch,
        model_config=model_config_doc(cfg),
        schema=SCHEMA,
        metrics={},
        samples_seen=0,
    )


@pytest.mark.parametrize("arch", ["lr", "deepfm"])
def test_artifact_predictions_match_the_trained_model(tmp_path: Path, arch: str) -> None:
    cfg = ModelConfig(arch=arch, buckets=256, embedding_dim=4, hidden=(8, 4))  # type: ignore[arg-type]
    model = trained_like(cfg, seed=1)
    reg = Registry(tmp_path)
    m = publish(reg, cfg, model)
    manifest, tensors = reg.load("ctr", m.version, expected_fingerprint=SCHEMA.fingerprint())
    predictor = torch_factory(manifest, tensors)
    batch = instances(64)
    got = predictor.predict(batch)
    want = model.predict(instances_to_tensors(batch, SCHEMA, cfg.buckets)).tolist()
    assert len(got) == 64
    assert got == pytest.approx(want, abs=1e-6)
    assert len({round(p, 6) for p in got}) > 10  # the weights matter


def test_bad_instance_names_index_and_feature(tmp_path: Path) -> None:
    cfg = ModelConfig(arch="lr", buckets=64)
    reg = Registry(tmp_path)
    m = publish(reg, cfg, trained_like(cfg, 0))
    predictor = torch_factory(*reg.load("ctr", m.version, expected_fingerprint=None))
    batch = instances(3)
    del batch[2]["ad_id"]
    with pytest.raises(SchemaError, match=r"instance 2: .*'ad_id'"):
        predictor.predict(batch)


def _manifest(cfg: ModelConfig, **changes: Any) -> Manifest:
    reg_manifest = Manifest(
        manifest_version=1,
        model="ctr",
        version="v00000001",
        parent=None,
        base=None,
        created_ms=0,
        arch=cfg.arch,
        model_config=model_config_doc(cfg),
        feature_schema=SCHEMA.to_dict(),
        schema_fingerprint=SCHEMA.fingerprint(),
        metrics={},
        samples_seen=0,
        files={},
    )
    return dataclasses.replace(reg_manifest, **changes)


def test_model_config_is_rebuilt_from_the_manifest() -> None:
    cfg = ModelConfig(name="cvr", label="conversion", arch="deepfm", buckets=128, hidden=(16, 8))
    m = _manifest(cfg, model_config={**model_config_doc(cfg), "hidden": [16, 8]})
    assert model_config_from_manifest(m) == cfg


def test_unknown_model_config_field_is_refused() -> None:
    cfg = ModelConfig(arch="lr")
    m = _manifest(cfg, model_config={**model_config_doc(cfg), "dropout": 0.1})
    with pytest.raises(
        ArtifactError,
        match=r"ctr v00000001: model_config: expected fields of ModelConfig, got unknown "
        r"fields \['dropout'\]",
    ):
        model_config_from_manifest(m)


def test_arch_disagreeing_with_model_config_is_refused() -> None:
    m = _manifest(ModelConfig(arch="lr"), arch="deepfm")
    with pytest.raises(ArtifactError, match=r"arch 'lr' differs from the manifest's arch 'deepfm'"):
        model_config_from_manifest(m)


def test_malformed_feature_schema_is_refused() -> None:
    m = _manifest(ModelConfig(arch="lr"), feature_schema={"features": 3})
    with pytest.raises(ArtifactError, match=r"ctr v00000001: schema: malformed schema document"):
        TorchPredictor.from_artifact(m, {})


def test_weights_of_another_shape_are_refused() -> None:
    cfg = ModelConfig(arch="lr", buckets=64)
    tensors = build_model(dataclasses.replace(cfg, buckets=32), SCHEMA).state_dict()
    with pytest.raises(SchemaMismatchError, match=r"expected shape \[64, 1\], got \[32, 1\]"):
        TorchPredictor.from_artifact(_manifest(cfg), tensors)


def test_app_with_the_default_factory_serves_the_real_model(tmp_path: Path) -> None:
    cfg = ModelConfig(arch="deepfm", buckets=256, embedding_dim=4, hidden=(8,))
    model = trained_like(cfg, seed=2)
    reg = Registry(tmp_path)
    publish(reg, cfg, model)
    app = create_app(reg.root, ["ctr"], SCHEMA, poll_interval_s=3600)
    batch = instances(16, seed=5)
    with TestClient(app) as c:
        r = c.post("/v1/models/ctr:predict", json={"instances": batch})
        bad = c.post("/v1/models/ctr:predict", json={"instances": [{"user_id": 1}]})
    assert r.status_code == 200
    want = model.predict(instances_to_tensors(batch, SCHEMA, cfg.buckets)).tolist()
    assert r.json()["predictions"] == pytest.approx(want, abs=1e-6)
    assert bad.status_code == 400
    assert bad.json()["error"].startswith("instance 0: ")


def test_docstring_example_runs() -> None:
    result = doctest.testmod(torch_predictor_mod)
    assert result.attempted > 0
    assert result.failed == 0


# --- loading without initialising, warm-up, the collector ------------------------------------


def test_meta_device_load_equals_a_copy_into_a_fresh_model_bit_for_bit(tmp_path: Path) -> None:
    cfg = ModelConfig(arch="deepfm", buckets=256, embedding_dim=4, hidden=(8, 4))
    reg = Registry(tmp_path)
    m = publish(reg, cfg, trained_like(cfg, seed=4))
    manifest, tensors = reg.load("ctr", m.version, expected_fingerprint=None)
    copied = build_model(cfg, SCHEMA)
    copied.load_flat_state_dict({k: v.clone() for k, v in tensors.items()})
    rng = torch.get_rng_state()
    assigned = model_from_artifact(manifest, tensors)
    assert torch.equal(torch.get_rng_state(), rng)  # no random initialisation ran
    own = dict(assigned.named_parameters())
    assert own.keys() == dict(copied.named_parameters()).keys()
    for name, param in copied.named_parameters():
        assert own[name].device.type == "cpu"
        assert own[name].dtype == param.dtype
        assert torch.equal(own[name], param), name
        assert own[name].data_ptr() == tensors[name].data_ptr()  # assigned, not copied
    for (name, a), (_, b) in zip(assigned.named_buffers(), copied.named_buffers(), strict=True):
        assert a.device.type == "cpu"
        assert torch.equal(a, b), name
    batch = instances_to_tensors(instances(32, seed=9), SCHEMA, cfg.buckets)
    assert torch.equal(assigned.predict(batch), copied.predict(batch))


def test_meta_device_load_refuses_wrong_weights_naming_the_key() -> None:
    cfg = ModelConfig(arch="deepfm", buckets=64, embedding_dim=4, hidden=(8,))
    tensors = build_model(cfg, SCHEMA).flat_state_dict()
    tensors["mlp.out.weight"] = torch.zeros(1, 9)
    with pytest.raises(SchemaMismatchError, match=r"'mlp.out.weight': expected shape \[1, 8\]"):
        model_from_artifact(_manifest(cfg), tensors)
    del tensors["mlp.out.weight"]
    with pytest.raises(SchemaMismatchError, match=r"missing \['mlp.out.weight'\]"):
        model_from_artifact(_manifest(cfg), tensors)


class Recorder:
    """A predictor that records whether it was live when warmed up."""

    def __init__(self, holder: ModelHolder, version: str, fail: bool = False) -> None:
        self.holder, self.version, self.fail = holder, version, fail
        self.live_at_warm_up: bool | None = None

    def predict_columns(self, columns: FeatureColumns) -> list[float]:
        return [0.0] * len(columns)

    def warm_up(self) -> None:
        current = self.holder.current
        self.live_at_warm_up = current is not None and current.version == self.version
        if self.fail:
            raise RuntimeError("no kernel for that")


def _poller(reg: Registry, holder: ModelHolder, factory: Any, **kw: Any) -> RegistryPoller:
    return RegistryPoller(
        reg,
        {"ctr": holder},
        expected_fingerprint=SCHEMA.fingerprint(),
        factory=factory,
        clock=ReplayClock(),
        interval_s=3600,
        **kw,
    )


def test_a_version_is_warmed_up_before_it_goes_live(tmp_path: Path) -> None:
    cfg = ModelConfig(arch="lr", buckets=64)
    reg = Registry(tmp_path)
    holder = ModelHolder("ctr")
    built: list[Recorder] = []

    def factory(manifest: Manifest, tensors: dict[str, torch.Tensor]) -> Recorder:
        built.append(Recorder(holder, manifest.version, fail=manifest.version == "v00000002"))
        return built[-1]

    poller = _poller(reg, holder, factory)
    publish(reg, cfg, trained_like(cfg, 0))
    poller.poll_once()
    publish(reg, cfg, trained_like(cfg, 1))
    poller.poll_once()
    publish(reg, cfg, trained_like(cfg, 2))
    poller.poll_once()
    assert [r.live_at_warm_up for r in built] == [False, False, False]
    current = holder.current
    assert current is not None
    assert current.version == "v00000003"
    assert holder.refusals == (Refusal("v00000002", "warm-up: RuntimeError: no kernel for that"),)


def test_the_default_predictor_warms_up_on_synthetic_rows(tmp_path: Path) -> None:
    cfg = ModelConfig(arch="deepfm", buckets=64, embedding_dim=4, hidden=(8,))
    reg = Registry(tmp_path)
    m = publish(reg, cfg, trained_like(cfg, 0))
    predictor = torch_factory(*reg.load("ctr", m.version, expected_fingerprint=None))
    predictor.warm_up()  # runs the model: raises if it cannot score the synthetic rows
    assert isinstance(predictor, TorchPredictor)
    out = predictor.predict_columns(columns_from_instances(instances(3), SCHEMA))
    assert out.shape == (3,)


def test_swaps_freeze_the_heap_and_a_swapped_out_model_is_freed(tmp_path: Path) -> None:
    cfg = ModelConfig(arch="deepfm", buckets=64, embedding_dim=4, hidden=(8,))
    reg = Registry(tmp_path)
    holder = ModelHolder("ctr")
    poller = _poller(reg, holder, torch_factory, freeze=True)
    publish(reg, cfg, trained_like(cfg, 0))
    gc.unfreeze()
    try:
        poller.poll_once()
        assert gc.get_freeze_count() > 0
        current = holder.current
        assert current is not None
        old = weakref.ref(current.predictor)
        del current
        publish(reg, cfg, trained_like(cfg, 1))
        gc.disable()  # freed by reference counting alone: no cycle keeps a model
        poller.poll_once()
        assert old() is None
    finally:
        gc.enable()
        gc.unfreeze()
