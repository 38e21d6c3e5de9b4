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

# How samples reach the trainer is no part of the model a version holds.
_TRANSPORT_FIELDS = frozenset({"samples"})
_MODEL_CONFIG_FIELDS = (
    frozenset(f.name for f in dataclasses.fields(ModelConfig)) - _TRANSPORT_FIELDS
)


def model_config_doc(cfg: ModelConfig) -> dict[str, object]:
    """The fields of ``cfg`` a version records as its ``model_config`` (what builds the model;
    not how its samples travel).

    >>> sorted(model_config_doc(ModelConfig()))[:3]
    ['arch', 'attribution_window_s', 'buckets']
    """
    return {
        f.name: getattr(cfg, f.name)
        for f in dataclasses.fields(ModelConfig)
        if f.name in _MODEL_CONFIG_FIELDS
    }


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
    """Build the manifest's model with ``tensors`` as its weights; returned in eval mode.

    The model is built on the meta device (shapes and dtypes, no memory, no random
    initialisation: most of the cost of a fresh model) and ``tensors``, once checked against it,
    become its parameters without a copy. The model owns them from then on: the caller must not
    change them (pass copies of tensors that something else keeps updating). A ``tensors`` on
    another device than the CPU is copied to it.
    """
    cfg, schema = model_config_from_manifest(manifest), schema_from_manifest(manifest)
    with torch.device("meta"):
        model = build_model(cfg, schema)
    cpu = {name: t if t.device.type == "cpu" else t.cpu() for name, t in tensors.items()}
    model.load_flat_state_dict(cpu, assign=True)
    return model.eval()


def load_model(
    registry: Registry, name: str, version: str, *, expected_fingerprint: str | None = None
) -> tuple[Manifest, CtrModel]:
    """Verify and load ``version`` of model ``name`` from ``registry`` (see
    :meth:`~minutely.registry.Registry.load`) and rebuild it."""
    manifest, tensors = registry.load(name, version, expected_fingerprint=expected_fingerprint)
    return manifest, model_from_artifact(manifest, tensors)
