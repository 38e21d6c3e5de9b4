"""The default predictor: the artifact's real model, built from its manifest."""

from __future__ import annotations

import dataclasses
import doctest
import random
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from starlette.exceptions import StarletteDeprecationWarning

import minutely.serve.torch_predictor as torch_predictor_mod
from minutely.config import ModelConfig
from minutely.data import instances_to_tensors
from minutely.errors import ArtifactError, SchemaError, SchemaMismatchError
from minutely.model import CtrModel, build_model
from minutely.model.artifact import model_config_from_manifest
from minutely.registry import Manifest, Registry
from minutely.schema import Schema, default_schema
from minutely.serve import create_app, torch_factory
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
        model_config=dataclasses.asdict(cfg),
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
        model_config=dataclasses.asdict(cfg),
        feature_schema=SCHEMA.to_dict(),
        schema_fingerprint=SCHEMA.fingerprint(),
        metrics={},
        samples_seen=0,
        files={},
    )
    return dataclasses.replace(reg_manifest, **changes)


def test_model_config_is_rebuilt_from_the_manifest() -> None:
    cfg = ModelConfig(name="cvr", label="conversion", arch="deepfm", buckets=128, hidden=(16, 8))
    m = _manifest(cfg, model_config={**dataclasses.asdict(cfg), "hidden": [16, 8]})
    assert model_config_from_manifest(m) == cfg


def test_unknown_model_config_field_is_refused() -> None:
    cfg = ModelConfig(arch="lr")
    m = _manifest(cfg, model_config={**dataclasses.asdict(cfg), "dropout": 0.1})
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
