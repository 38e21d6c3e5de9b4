"""A model rebuilt from a registry version: what serving, rollback and warm starts share.

A version's manifest carries the model config and the feature schema it was trained with; the
model is built from those (never from the reader's own config) and the version's verified weights
are loaded into it, key set, shapes and dtypes checked.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from minutely.config import ModelConfig
from minutely.errors import ArtifactError, SchemaError
from minutely.model.base import CtrModel
from minutely.model.build import build_model
from minutely.registry import Manifest, Registry
from minutely.schema import Schema

_MODEL_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(ModelConfig))


def model_config_from_manifest(manifest: Manifest) -> ModelConfig:
    """The :class:`ModelConfig` an artifact was trained with; :class:`ArtifactError` if unusable.

    Unknown fields are refused rather than dropped: a server must not build a model that differs
    from the one that was trained. Fields the manifest lacks (written before they existed) take
    their defaults.
    """
    where = f"{manifest.model} {manifest.version}: model_config"
    doc = dict(manifest.model_config)
    unknown = sorted(set(doc) - _MODEL_CONFIG_FIELDS)
    if unknown:
        raise ArtifactError(
            f"{where}: expected fields of ModelConfig, got unknown fields {unknown}"
        )
    if isinstance(doc.get("hidden"), list):
        doc["hidden"] = tuple(doc["hidden"])
    try:
        cfg = ModelConfig(**doc)
    except TypeError as exc:
        raise ArtifactError(f"{where}: expected ModelConfig fields, got {doc} ({exc})") from exc
    if cfg.arch != manifest.arch:
        raise ArtifactError(
            f"{where}: arch {cfg.arch!r} differs from the manifest's arch {manifest.arch!r}"
        )
    return cfg


def schema_from_manifest(manifest: Manifest) -> Schema:
    """The feature schema recorded in ``manifest``; :class:`ArtifactError` if unusable."""
    try:
        return Schema.from_dict(manifest.feature_schema)
    except SchemaError as exc:
        raise ArtifactError(f"{manifest.model} {manifest.version}: {exc}") from exc


def model_from_artifact(manifest: Manifest, tensors: Mapping[str, torch.Tensor]) -> CtrModel:
    """Build the manifest's model and load ``tensors`` into it; returned in eval mode."""
    model = build_model(model_config_from_manifest(manifest), schema_from_manifest(manifest))
    model.load_flat_state_dict(tensors)
    return model.eval()


def load_model(
    registry: Registry, name: str, version: str, *, expected_fingerprint: str | None = None
) -> tuple[Manifest, CtrModel]:
    """Verify and load ``version`` of model ``name`` from ``registry`` (see
    :meth:`~minutely.registry.Registry.load`) and rebuild it."""
    manifest, tensors = registry.load(name, version, expected_fingerprint=expected_fingerprint)
    return manifest, model_from_artifact(manifest, tensors)
