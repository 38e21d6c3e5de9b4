"""``SparseAdam`` with its update done by index operations.

:class:`RowSparseAdam` is :class:`torch.optim.SparseAdam`, bit for bit (same algorithm, same
arithmetic order, same state layout, so state dicts move freely between the two): Adam moments
and weights are updated only on the rows a batch looked up ("lazy" Adam), with one global step
count per table. torch's version builds sparse tensors and intersects them (``sparse_mask``)
three times per table; gathering and scattering the touched rows instead makes a step about
twice as fast, which matters because the tables' update is most of a training step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


class RowSparseAdam(torch.optim.SparseAdam):
    """:class:`torch.optim.SparseAdam` (same constructor) with a faster :meth:`step`."""

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            eps = float(group["eps"])
            lr = float(group["lr"])
            maximize = bool(group.get("maximize", False))
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise RuntimeError(
                        "RowSparseAdam: expected sparse gradients (an EmbeddingBag with "
                        f"sparse=True), got a dense gradient of shape {list(p.grad.shape)}"
                    )
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                # The update is not linear in the gradient: duplicate ids must be summed first.
                grad = p.grad.coalesce()
                values = -grad._values() if maximize else grad._values()
                if values.numel() == 0:
                    continue
                rows = grad._indices()[0]
                exp_avg: torch.Tensor = state["exp_avg"]
                exp_avg_sq: torch.Tensor = state["exp_avg_sq"]
                old_avg = exp_avg.index_select(0, rows)
                old_sq = exp_avg_sq.index_select(0, rows)
                # old + (1 - b) * (new - old): the arithmetic of torch.optim.SparseAdam.
                avg = values.sub(old_avg).mul_(1 - beta1).add_(old_avg)
                sq = values.pow(2).sub_(old_sq).mul_(1 - beta2).add_(old_sq)
                exp_avg.index_copy_(0, rows, avg)
                exp_avg_sq.index_copy_(0, rows, sq)
                step = state["step"]
                step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
                p.index_add_(0, rows, avg.div_(sq.sqrt_().add_(eps)).mul_(-step_size))
        return loss
