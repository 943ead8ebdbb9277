"""SparseGPT (Frantar & Alistarh, 2023): prune a layer to a given sparsity and update the
remaining weights so the layer's output on calibration inputs moves as little as possible.

Columns are processed left to right in blocks of ``block`` columns. Within a block the weights
to prune are chosen by the OBS saliency ``w² / [H⁻¹]_jj²`` (lowest first): the block's share of
the layer's exact count for unstructured sparsity, or the ``n`` lowest of every ``m``
consecutive columns of a row for N:M. Each pruned (or kept) column's error is then spread over
the columns not yet processed through the upper Cholesky factor of ``(H + λI)⁻¹``, exactly as
GPTQ spreads rounding errors (:mod:`lighten.quant.gptq`).
"""

from __future__ import annotations

import torch

from lighten.errors import RecipeError
from lighten.quant.gptq import _inverse_hessian_factor


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, *, sparsity: float = 0.5,
                    n: int | None = None, m: int | None = None, block: int = 128,
                    damp: float = 0.01) -> torch.Tensor:
    """The pruned and updated weight (rows, cols), float32, with exact zeros where pruned."""
    if (n is None) != (m is None) or (n is not None and not 0 < n < m):
        raise RecipeError(f"N:M sparsity needs 0 < n < m, got n={n}, m={m}")
    if n is not None and block % m:
        block = block - block % m or m
    w = weight.detach().double().clone()
    rows, cols = w.shape
    h = hessian.detach().double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    u = _inverse_hessian_factor(h, damp)
    target = round(sparsity * rows * cols) if n is None else 0
    pruned_so_far = 0
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        prune = torch.zeros_like(w1, dtype=torch.bool)
        if n is None:  # this block's share of the exact count
            k = round(sparsity * rows * i2) - pruned_so_far
            k = max(0, min(k, target - pruned_so_far, w1.numel()))
            if k:
                score = (w1**2 / torch.diag(u1)[None, :] ** 2).flatten()
                prune.view(-1)[torch.topk(score, k, largest=False).indices] = True
            pruned_so_far += k
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            if n is not None and i % m == 0 and i + m <= i2 - i1:
                score = w1[:, i:i + m] ** 2 / torch.diag(u1)[i:i + m][None, :] ** 2
                idx = torch.topk(score, n, dim=1, largest=False).indices
                prune[:, i:i + m].scatter_(1, idx, True)
            col = w1[:, i]
            new = torch.where(prune[:, i], torch.zeros_like(col), col)
            err = (col - new) / u1[i, i]
            w1[:, i] = new
            w1[:, i + 1:] -= torch.outer(err, u1[i, i + 1:])
            err1[:, i] = err
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return w.float()
