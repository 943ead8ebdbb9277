"""GPTQ with activation ordering (``act_order``): columns quantized in order of decreasing
Hessian diagonal, so the inputs with the most energy are rounded first, while the most columns
are still left to absorb their error.

Groups stay contiguous in the original column order (the reference's ``static_groups``): each
group's grid is fitted to the float weights before the loop, so the stored layout is the plain
one of :class:`lighten.quant.weight_only.WeightOnlyLinear` (no per-column group index).
Without ``act_order`` :func:`lighten.quant.gptq.gptq_quantize` is used as is.
"""

from __future__ import annotations

import torch

from lighten.llm.rtn import group_grid
from lighten.quant.gptq import _inverse_hessian_factor
from lighten.quant.weight_only import int_range


@torch.no_grad()
def gptq_act_order(weight: torch.Tensor, hessian: torch.Tensor, *, bits: int, group_size: int,
                   symmetric: bool, damp: float = 0.01, block: int = 128,
                   clip: torch.Tensor | None = None):
    """``(q int32 (rows, cols), scale (rows, groups), zero (rows, groups))``; ``clip``
    (rows, groups) shrinks each group's range (:func:`lighten.llm.rtn.search_range`)."""
    w = weight.detach().double().clone()
    rows, cols = w.shape
    h = hessian.detach().double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    scale, zero = group_grid(w.float(), bits=bits, group_size=group_size, symmetric=symmetric,
                             clip=clip)
    perm = torch.argsort(torch.diag(h), descending=True)
    w, h = w[:, perm], h[perm][:, perm]
    u = _inverse_hessian_factor(h, damp)
    group = perm // group_size
    s, z = scale[:, group].double(), zero[:, group].double()  # (rows, cols), permuted
    qmin, qmax = int_range(bits)
    q = torch.zeros(rows, cols, dtype=torch.int32)
    for i1 in range(0, cols, block):  # lazy batch updates: columns beyond the block at once
        i2 = min(i1 + block, cols)
        w1, err1 = w[:, i1:i2].clone(), torch.zeros(rows, i2 - i1, dtype=w.dtype)
        for j in range(i2 - i1):
            i = i1 + j
            qi = torch.clamp(torch.round(w1[:, j] / s[:, i]) + z[:, i], qmin, qmax)
            err = (w1[:, j] - (qi - z[:, i]) * s[:, i]) / u[i, i]
            w1[:, j + 1:] -= torch.outer(err, u[i, i + 1:i2])
            err1[:, j] = err
            q[:, i] = qi.to(torch.int32)
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    out = torch.empty_like(q)
    out[:, perm] = q
    return out, scale, zero
