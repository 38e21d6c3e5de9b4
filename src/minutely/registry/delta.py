"""Sparse deltas between two sets of tensors: what changed since the parent version, bit for bit.

Online training touches few rows of the big embedding tables between two exports, so a version
can be shipped as the change from its parent. :func:`make_delta` encodes it as plain tensors
(stored as ``delta.safetensors``):

- an unchanged tensor is absent;
- a tensor with ``ndim >= 2`` of which fewer than half the rows changed is
  ``"<name>::rows"`` (the int64 indices of the changed rows, ascending) and
  ``"<name>::values"`` (those rows);
- any other changed tensor is ``"<name>"`` in full.

"Changed" compares bits, not values: ``-0.0`` and ``0.0`` differ, a NaN equals the same NaN,
so :func:`apply_delta` rebuilds the new tensors exactly. When the two sets differ in names,
shapes or dtypes (or a name contains ``::``) there is no delta: :func:`make_delta` returns
``None`` and the version is published in full.

>>> import torch
>>> parent = {"emb": torch.zeros(4, 2), "bias": torch.zeros(1)}
>>> new = {"emb": parent["emb"].clone(), "bias": torch.ones(1)}
>>> new["emb"][2] = 5.0
>>> delta = make_delta(parent, new)
>>> sorted(delta), delta["emb::rows"].tolist()
(['bias', 'emb::rows', 'emb::values'], [2])
>>> all(torch.equal(apply_delta(parent, delta)[k], new[k]) for k in new)
True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from minutely.errors import ArtifactError

ROWS_SUFFIX = "::rows"
VALUES_SUFFIX = "::values"
_SEP = "::"


def make_delta(
    parent: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor] | None:
    """The delta that turns ``parent`` into ``new`` (see the module); ``None`` when the two do
    not have the same names, shapes and dtypes."""
    import torch

    if set(parent) != set(new) or any(_SEP in name for name in new):
        return None
    out: dict[str, torch.Tensor] = {}
    for name in sorted(new):
        a = parent[name].detach().to("cpu").contiguous()
        b = new[name].detach().to("cpu").contiguous()
        if a.shape != b.shape or a.dtype != b.dtype:
            return None
        if b.numel() == 0:
            continue  # same shape, no elements: nothing can differ
        if b.ndim >= 2:
            changed = (_row_bits(a) != _row_bits(b)).any(dim=1)
            rows = changed.nonzero().flatten().to(torch.int64)
            if rows.numel() == 0:
                continue
            if 2 * rows.numel() < b.shape[0]:
                out[name + ROWS_SUFFIX] = rows
                out[name + VALUES_SUFFIX] = b[rows].clone()
                continue
            out[name] = b.clone()
        elif not torch.equal(_flat_bits(a), _flat_bits(b)):
            out[name] = b.clone()
    return out


def apply_delta(
    parent: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A new dict: ``parent`` with ``delta`` applied (``parent`` and its tensors untouched).

    :class:`ArtifactError` naming the entry when the delta does not fit the parent (a tensor it
    does not have, another shape or dtype, row indices out of range, a ``::rows`` without its
    ``::values``).
    """
    out = dict(parent)
    for key in sorted(delta):
        value = delta[key]
        if key.endswith(VALUES_SUFFIX):
            if key[: -len(VALUES_SUFFIX)] + ROWS_SUFFIX not in delta:
                raise ArtifactError(
                    f"delta {key!r}: expected it with {key[: -len(VALUES_SUFFIX)] + ROWS_SUFFIX!r},"
                    " got no row indices"
                )
            continue
        if key.endswith(ROWS_SUFFIX):
            name = key[: -len(ROWS_SUFFIX)]
            out[name] = _apply_rows(name, _parent_tensor(parent, name, key), value, delta)
            continue
        if _SEP in key:
            raise ArtifactError(
                f"delta {key!r}: expected a tensor name, '<name>{ROWS_SUFFIX}' or "
                f"'<name>{VALUES_SUFFIX}', got another '{_SEP}' suffix"
            )
        base = _parent_tensor(parent, key, key)
        if value.shape != base.shape or value.dtype != base.dtype:
            raise ArtifactError(
                f"delta {key!r}: expected {_describe(base)} like the parent's, got "
                f"{_describe(value)}"
            )
        out[key] = value
    return out


def _apply_rows(
    name: str, base: torch.Tensor, rows: torch.Tensor, delta: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    import torch

    key = name + ROWS_SUFFIX
    values = delta.get(name + VALUES_SUFFIX)
    if values is None:
        raise ArtifactError(f"delta {key!r}: expected it with {name + VALUES_SUFFIX!r}, got none")
    if base.ndim < 2:
        raise ArtifactError(
            f"delta {key!r}: expected a parent tensor with ndim >= 2, got {_describe(base)}"
        )
    if rows.dtype != torch.int64 or rows.ndim != 1:
        raise ArtifactError(f"delta {key!r}: expected a 1-d int64 tensor, got {_describe(rows)}")
    want = (rows.shape[0], *base.shape[1:])
    if tuple(values.shape) != want or values.dtype != base.dtype:
        raise ArtifactError(
            f"delta {name + VALUES_SUFFIX!r}: expected shape {list(want)} {base.dtype}, got "
            f"{_describe(values)}"
        )
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= base.shape[0]):
        raise ArtifactError(
            f"delta {key!r}: expected row indices in [0, {base.shape[0]}), got "
            f"[{int(rows.min())}, {int(rows.max())}]"
        )
    out = base.clone()
    out[rows] = values
    return out


def _parent_tensor(parent: Mapping[str, torch.Tensor], name: str, key: str) -> torch.Tensor:
    try:
        return parent[name]
    except KeyError:
        raise ArtifactError(
            f"delta {key!r}: expected a tensor {name!r} in the parent, got none "
            f"(it has {len(parent)} tensors)"
        ) from None


def _row_bits(t: torch.Tensor) -> torch.Tensor:
    """Each row of ``t`` as raw bytes (a 2-d uint8 tensor)."""
    import torch

    return t.reshape(t.shape[0], -1).view(torch.uint8)


def _flat_bits(t: torch.Tensor) -> torch.Tensor:
    import torch

    return t.reshape(-1).view(torch.uint8)


def _describe(t: torch.Tensor) -> str:
    return f"shape {list(t.shape)} {t.dtype}"
