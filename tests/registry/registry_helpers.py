"""What the registry tests share: tensors, a publish with defaults, raw access to a registry's
files on any backend (a folder, fsspec's memory store, a real S3 server)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec.core
import torch

from minutely.registry import Manifest, Registry
from minutely.schema import FeatureSpec, Schema

SCHEMA = Schema((FeatureSpec("user_id", "sparse"), FeatureSpec("x", "dense")))
FP = SCHEMA.fingerprint()


def tensors(seed: int = 0, rows: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "bias": torch.randn(1, generator=g),
        "first_order.user_id.weight": torch.randn(rows, 1, generator=g),
        "dense_linear.weight": torch.randn(1, 1, generator=g),
    }


def publish(
    reg: Registry,
    model: str = "ctr",
    seed: int = 0,
    weights: dict[str, torch.Tensor] | None = None,
    **kw: Any,
) -> Manifest:
    args: dict[str, Any] = {
        "created_ms": 1_000 + seed,
        "arch": "lr",
        "model_config": {"name": model, "arch": "lr", "hidden": (8, 4)},
        "schema": SCHEMA,
        "metrics": {"auc": 0.7},
        "samples_seen": 100 * seed,
    }
    args.update(kw)
    return reg.publish(model, tensors(seed) if weights is None else weights, **args)


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype, name
        assert torch.equal(got[name].view(-1).view(torch.uint8), t.view(-1).view(torch.uint8)), name


@dataclass
class Place:
    """A registry location and raw access to its files (paths relative to the root)."""

    kind: str
    root: Path | str
    storage_options: dict[str, Any] | None

    def registry(self, **kw: Any) -> Registry:
        return Registry(self.root, storage_options=self.storage_options, **kw)

    @property
    def fs(self) -> Any:
        return self._split()[0]

    def path(self, rel: str) -> str:
        return f"{self._split()[1]}/{rel}"

    def get(self, rel: str) -> bytes:
        return bytes(self.fs.cat_file(self.path(rel)))

    def put(self, rel: str, data: bytes) -> None:
        if self.kind == "local":
            Path(self.path(rel)).parent.mkdir(parents=True, exist_ok=True)
        self.fs.pipe_file(self.path(rel), data)

    def delete(self, rel: str) -> None:
        self.fs.rm_file(self.path(rel))

    def files(self, rel: str) -> list[str]:
        """Every file under ``rel``, relative to it, sorted."""
        base = self.path(rel)
        self.fs.invalidate_cache()
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return []
        return sorted(str(p)[len(base.rstrip("/")) + 1 :] for p in found)

    def _split(self) -> tuple[Any, str]:
        opts = self.storage_options or {}
        fs, path = fsspec.core.url_to_fs(str(self.root), **opts)
        return fs, str(path).rstrip("/")


def local_place(tmp_path: Path) -> Place:
    return Place("local", tmp_path / f"registry-{uuid.uuid4().hex[:8]}", None)


def memory_place() -> Place:
    return Place("memory", f"memory://minutely-tests/{uuid.uuid4().hex}", None)
