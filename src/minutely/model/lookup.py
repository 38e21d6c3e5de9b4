"""The table lookup of a batch: each distinct id read once, gradients with unique rows.

A batch touches fewer distinct rows of a table than it has ids (a third of 4,096 Zipf-distributed
ids, in ``benchmarks/train.py``), and the optimizer's work is per distinct row. So a lookup first
deduplicates every sparse feature's ids, reads each distinct row once into a *row buffer*, and
expands the buffer to the batch by index:

1. :func:`plan_lookup` (NumPy, no autograd) sorts each feature's ids with their batch rows and
   returns the sorted distinct ids of every table, for each (batch row, feature) the buffer
   row holding its pooled row, and the inverse (which positions read each buffer row);
2. :class:`GatherRows` reads the distinct rows of every table into the buffer (column 0 the
   first-order weight, ``1:`` the embedding), about half the tables on a helper thread
   (:func:`minutely._parallel.run_split`). Its backward gives each table a sparse gradient over
   its distinct ids in increasing order, so the optimizer need not sum duplicates;
3. a feature that is not one id per row (a ``multi_sparse`` list, pooled by mean) is pooled by
   ``embedding_bag`` over the buffer, and its pooled rows are appended to it;
4. :class:`Interactions` expands the buffer to a DeepFM's inputs (first-order sum, pairs,
   the MLP's input) and, backward, sums the gradients per buffer row with ``embedding_bag``
   over the plan's segments, without building a ``[B, F, D]`` gradient for the pairs.

The result equals ``nn.EmbeddingBag`` pooling of each table (same sums, in another order of
addition, so equal up to float rounding), values and gradients alike.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor
from torch.autograd.function import once_differentiable

from minutely._parallel import run_split

Int64Array = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Bag:
    """A feature pooled by ``embedding_bag``: its ids as rows of the row buffer."""

    position: int  # the feature's index among the sparse features
    rows: Tensor  # int64 [n_ids]: the buffer row of each id, in the feature's id order
    offsets: Tensor  # int64 [B + 1]
    mode: str  # "sum" or "mean"


@dataclass(frozen=True)
class LookupPlan:
    """Which rows a batch reads, and where each (batch row, feature) finds its pooled row.

    The *row buffer* holds, first, the distinct rows read from the tables: ``ids[f]`` are the
    distinct ids looked up in feature ``f``'s table, increasing, at buffer rows
    ``spans[f][0]:spans[f][1]``; then, for the ``k``-th of ``bags``, its ``B`` pooled rows at
    ``distinct + k * B`` (``distinct`` is the number of distinct rows).
    ``index[b, f]`` is the buffer row holding feature ``f``'s pooled row for batch row ``b``.

    ``order`` and ``segments`` invert ``index``: the positions ``p`` of ``index.view(-1)``
    that read buffer row ``r`` are ``order[segments[r]:segments[r + 1]]``, and ``order_rows``
    are their batch rows (``order // n_sparse``). Backward passes sum gradients per buffer row
    with them (``embedding_bag`` over these segments).
    """

    ids: list[Tensor]
    spans: list[tuple[int, int]]
    distinct: int
    index: Tensor  # int64 [B, n_sparse]
    bags: list[Bag]
    order: Tensor  # int64 [B * n_sparse]
    order_rows: Tensor  # int64 [B * n_sparse]
    segments: Tensor  # int64 [buffer rows + 1]


def direct_plan(n: int, n_features: int, device: torch.device) -> LookupPlan:
    """The plan of a row buffer that holds every (batch row, feature)'s pooled row, ``[B * F]``
    in row-major order: no table is read through it (``ids`` is empty)."""
    positions = torch.arange(n * n_features, device=device)
    return LookupPlan(
        ids=[],
        spans=[],
        distinct=0,
        index=positions.view(n, n_features),
        bags=[],
        order=positions,
        order_rows=torch.div(positions, max(1, n_features), rounding_mode="floor"),
        segments=torch.arange(n * n_features + 1, device=device),
    )


class FeatureInputError(ValueError):
    """A feature's ids or offsets do not fit; ``position`` is the feature's index."""

    def __init__(self, position: int, detail: str) -> None:
        super().__init__(detail)
        self.position = position


@functools.lru_cache(maxsize=16)
def _arange(n: int) -> Int64Array:
    out = np.arange(n, dtype=np.int64)
    out.setflags(write=False)
    return out


def one_id_per_row(offsets: Tensor, n: int) -> bool:
    """Whether ``offsets`` is ``0, 1, ..., n``: every row holds exactly one id."""
    return offsets.numel() == n + 1 and bool(np.array_equal(offsets.numpy(), _arange(n + 1)))


def plan_lookup(
    values: list[Tensor],
    offsets: list[Tensor],
    sum_pooled: list[bool],
    buckets: int,
    n: int,
) -> LookupPlan:
    """The :class:`LookupPlan` of a batch of ``n >= 1`` rows (CPU tensors), features ``0 ..
    F - 1``.

    ``values[f]`` and ``offsets[f]`` are feature ``f``'s jagged ids (``n + 1`` offsets), and
    ``sum_pooled[f]`` says whether its rows are summed (else averaged). A sum-pooled feature
    with one id per row reads its row directly; any other goes through a :class:`Bag`. Raises
    :class:`FeatureInputError` for the first feature with an id outside ``[0, buckets)`` or
    offsets that do not delimit ``n`` rows of its ids.

    The single-id features are sorted together, as one ``[F, n]`` array sorted along rows
    (each entry ``id << s | batch row``, so one sort yields both), which gives the distinct
    ids, the index and its inverse with a few whole-array operations.
    """
    n_features = len(values)
    single = [
        f
        for f in range(n_features)
        if sum_pooled[f] and values[f].numel() == n and one_id_per_row(offsets[f], n)
    ]
    is_single = set(single)
    pooled = [f for f in range(n_features) if f not in is_single]
    n_single = len(single)
    spans: list[tuple[int, int]] = [(0, 0)] * n_features
    ids: list[Tensor] = [torch.empty(0, dtype=torch.int64)] * n_features
    index = np.empty((n, n_features), dtype=np.int64)
    orders: list[Int64Array] = []
    order_rows: list[Int64Array] = []
    starts: list[Int64Array] = []

    distinct = 0
    if single:
        raw = np.stack([values[f].numpy() for f in single]).astype(np.int64, copy=False)
        _check_range(raw, buckets, single)
        sorted_ids, sorted_rows = _sort_rows(raw, buckets)
        first = np.empty((n_single, n), dtype=np.bool_)
        first[:, 0] = True
        np.not_equal(sorted_ids[:, 1:], sorted_ids[:, :-1], out=first[:, 1:])
        flat_first = first.reshape(-1)
        group = np.cumsum(flat_first, dtype=np.int64)
        group -= 1
        distinct_ids = torch.from_numpy(sorted_ids.reshape(-1)[flat_first])
        bounds = np.zeros(n_single + 1, dtype=np.int64)
        np.cumsum(first.sum(axis=1), out=bounds[1:])
        for j, f in enumerate(single):
            s, e = int(bounds[j]), int(bounds[j + 1])
            spans[f] = (s, e)
            ids[f] = distinct_ids[s:e]
        distinct = int(bounds[-1])
        # inverse[j, b]: the buffer row of feature single[j] at batch row b.
        inverse = np.empty((n_single, n), dtype=np.int64)
        sorted_rows += (_arange(n_single) * n)[:, None]
        inverse.reshape(-1)[sorted_rows.reshape(-1)] = group
        sorted_rows -= (_arange(n_single) * n)[:, None]
        if n_single == n_features:
            index = np.ascontiguousarray(inverse.T)
        else:
            index[:, single] = inverse.T
        columns = np.asarray(single, dtype=np.int64)[:, None]
        orders.append((sorted_rows * n_features + columns).reshape(-1))
        order_rows.append(sorted_rows.reshape(-1))
        starts.append(np.flatnonzero(flat_first))

    bags = []
    for f in pooled:
        feature_ids = values[f].numpy().astype(np.int64, copy=False)
        _check_range(feature_ids.reshape(1, -1), buckets, [f])
        _check_offsets(offsets[f].numpy(), n, feature_ids.size, f)
        uniq, inverse_ids = np.unique(feature_ids, return_inverse=True)
        spans[f] = (distinct, distinct + uniq.size)
        ids[f] = torch.from_numpy(uniq.astype(np.int64, copy=False))
        rows = torch.from_numpy(inverse_ids.reshape(-1).astype(np.int64) + distinct)
        bags.append(Bag(f, rows, offsets[f], "sum" if sum_pooled[f] else "mean"))
        distinct += uniq.size
    if pooled:
        # The distinct rows of bag features are read by no position (their gradient comes
        # through embedding_bag); each appended pooled row by exactly one.
        n_bag_rows = distinct - sum(int(e - s) for s, e in (spans[f] for f in single))
        starts.append(np.full(n_bag_rows, n * n_single, dtype=np.int64))
        bag_columns = np.asarray(pooled, dtype=np.int64)
        index[:, pooled] = distinct + _arange(len(pooled)) * n + _arange(n)[:, None]
        orders.append((_arange(n)[None, :] * n_features + bag_columns[:, None]).reshape(-1))
        order_rows.append(np.tile(_arange(n), len(pooled)))
        starts.append(n * n_single + _arange(len(pooled) * n))
    starts.append(np.array([n * n_features], dtype=np.int64))
    return LookupPlan(
        ids=ids,
        spans=spans,
        distinct=distinct,
        index=torch.from_numpy(index),
        bags=bags,
        order=torch.from_numpy(np.concatenate(orders)),
        order_rows=torch.from_numpy(np.concatenate(order_rows)),
        segments=torch.from_numpy(np.concatenate(starts)),
    )


def _sort_rows(raw: Int64Array, buckets: int) -> tuple[Int64Array, Int64Array]:
    """Each row of ``raw`` ``[F, n]`` sorted (stable), and the column each entry came from.

    One in-place sort of ``id << s | column`` when both fit in 63 bits, else an argsort.
    """
    n = raw.shape[1]
    shift = max(1, (n - 1).bit_length())
    if max(1, buckets - 1).bit_length() + shift > 62:
        sorted_rows = np.argsort(raw, axis=1, kind="stable").astype(np.int64, copy=False)
        return np.take_along_axis(raw, sorted_rows, 1), sorted_rows
    packed = np.left_shift(raw, shift)
    np.bitwise_or(packed, _arange(n), out=packed)
    packed.sort(axis=1)
    sorted_ids = np.right_shift(packed, shift)
    return sorted_ids, np.bitwise_and(packed, (1 << shift) - 1, out=packed)


def _check_offsets(offsets: npt.NDArray[Any], n: int, n_ids: int, position: int) -> None:
    """Raise :class:`FeatureInputError` unless ``offsets`` delimit ``n`` rows of ``n_ids``."""
    fits = (
        offsets.shape == (n + 1,)
        and offsets[0] == 0
        and offsets[-1] == n_ids
        and bool(np.all(offsets[1:] >= offsets[:-1]))
    )
    if not fits:
        raise FeatureInputError(
            position, f"offsets must start at 0, never decrease and end at the {n_ids} ids"
        )


def _check_range(ids: npt.NDArray[Any], buckets: int, positions: list[int]) -> None:
    """Raise :class:`FeatureInputError` for the first row of ``ids`` (``[F, n]``, row ``j``
    feature ``positions[j]``) with an id outside ``[0, buckets)``."""
    if ids.size == 0 or (ids.min() >= 0 and ids.max() < buckets):
        return
    for j, f in enumerate(positions):
        row = ids[j]
        if row.size and (row.min() < 0 or row.max() >= buckets):
            raise FeatureInputError(f, "an id out of range")


class GatherRows(torch.autograd.Function):
    """``rows [U, 1 + dim]``: the plan's distinct rows of every table.

    ``apply(plan, *tables)``, one table ``[buckets, 1 + dim]`` per feature, in feature order.
    The backward gives each table that requires a gradient a sparse gradient whose indices are
    the plan's distinct ids of that table, increasing (its rows already summed and unique).
    """

    @staticmethod
    def forward(ctx: Any, plan: LookupPlan, *tables: Tensor) -> Tensor:
        rows = tables[0].new_empty(plan.distinct, tables[0].shape[1])
        run_split(
            [
                functools.partial(torch.index_select, table, 0, ids, out=rows[s:e])
                for table, ids, (s, e) in zip(tables, plan.ids, plan.spans, strict=True)
            ],
            [e - s for s, e in plan.spans],
        )
        ctx.plan = plan
        ctx.shapes = [tuple(t.shape) for t in tables]
        return rows

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        plan: LookupPlan = ctx.plan
        grad = grad.contiguous()
        grads: list[Tensor | None] = [None]
        for k, (ids, (s, e)) in enumerate(zip(plan.ids, plan.spans, strict=True)):
            if not ctx.needs_input_grad[1 + k]:
                grads.append(None)
                continue
            grads.append(
                torch.sparse_coo_tensor(
                    ids.unsqueeze(0),
                    grad[s:e],
                    ctx.shapes[k],
                    check_invariants=False,
                    is_coalesced=True,
                )
            )
        return tuple(grads)


class Interactions(torch.autograd.Function):
    """From the row buffer to a DeepFM's inputs: ``(first, fm, emb)`` per batch row.

    ``apply(rows [R, 1 + D], plan)``: ``first [B]`` is the sum of the features' first-order
    weights (column 0), ``emb [B, F * D]`` the features' embeddings (columns ``1:``) side by
    side, the MLP's input, and ``fm [B]`` the factorization machine's pairs, ``sum_{i<j} <e_i,
    e_j> = (|sum_i e_i|^2 - sum_i |e_i|^2) / 2``.

    The backward never builds a ``[B, F, D]`` gradient for the pairs: with ``g`` the gradient
    of ``fm``, buffer row ``r``, read at positions ``P_r``, gets ``sum_{p in P_r} g[b_p] *
    (sum_i e_i)[b_p] - e_r * sum_{p in P_r} g[b_p]``, both sums over the plan's segments by
    ``embedding_bag`` on ``[B, D]`` data; the MLP's gradient for ``emb`` and the gradient of
    ``first`` are summed per row the same way.
    """

    @staticmethod
    def forward(ctx: Any, rows: Tensor, plan: LookupPlan) -> tuple[Tensor, Tensor, Tensor]:
        n, n_features = plan.index.shape
        width = rows.shape[1]
        flat = plan.index.view(-1)
        emb = rows[:, 1:].index_select(0, flat)
        # Per buffer row [w, e, |e|^2], summed over each batch row's features in one pass.
        extended = rows.new_empty(rows.shape[0], width + 1)
        extended[:, :width] = rows
        torch.linalg.vecdot(rows[:, 1:], rows[:, 1:], out=extended[:, width])
        bounds = torch.arange(0, n * n_features + 1, n_features, device=rows.device)
        sums = F.embedding_bag(flat, extended, bounds, mode="sum", include_last_offset=True)
        total = sums[:, 1:width]
        fm = torch.linalg.vecdot(total, total).sub_(sums[:, width]).mul_(0.5)
        ctx.save_for_backward(rows, total)
        ctx.plan = plan
        return sums[:, 0], fm, emb.view(n, n_features * (width - 1))

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad_first: Tensor, grad_fm: Tensor, grad_emb: Tensor
    ) -> tuple[Tensor, None]:
        rows, total = ctx.saved_tensors
        plan: LookupPlan = ctx.plan
        dim = rows.shape[1] - 1
        # Per batch row: [grad_first, grad_fm, grad_fm * total], summed per buffer row.
        per_batch_row = torch.cat(
            [grad_first.unsqueeze(1), grad_fm.unsqueeze(1), total * grad_fm.unsqueeze(1)], 1
        )
        sums = _segment_sum(plan.order_rows, per_batch_row, plan.segments)
        grad_rows = rows.new_empty(rows.shape)
        grad_rows[:, 0] = sums[:, 0]
        emb = grad_rows[:, 1:]
        torch.add(
            _segment_sum(plan.order, grad_emb.reshape(-1, dim), plan.segments), sums[:, 2:], out=emb
        )
        emb.addcmul_(rows[:, 1:], sums[:, 1:2], value=-1.0)
        return grad_rows, None


def _segment_sum(index: Tensor, data: Tensor, segments: Tensor) -> Tensor:
    """``out[r] = sum over p in [segments[r], segments[r + 1]) of data[index[p]]``."""
    out: Tensor = F.embedding_bag(index, data, segments, mode="sum", include_last_offset=True)
    return out


def gather_rows(plan: LookupPlan, tables: list[Tensor]) -> Tensor:
    """:class:`GatherRows` of ``plan`` over ``tables``, typed."""
    rows: Tensor = GatherRows.apply(plan, *tables)  # type: ignore[no-untyped-call]
    return rows


def interactions(rows: Tensor, plan: LookupPlan) -> tuple[Tensor, Tensor, Tensor]:
    """:class:`Interactions` of the row buffer ``rows``: ``(first, fm, emb)``, typed."""
    first, fm, emb = Interactions.apply(rows, plan)  # type: ignore[no-untyped-call]
    return first, fm, emb
