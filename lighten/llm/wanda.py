"""Wanda (Sun et al., 2023): prune by ``|W_ij| · ||X_j||₂`` — the weight's magnitude times the
norm of the input it multiplies — compared within each output row, with no weight update.

It needs only per-input-channel norms of the calibration activations (one forward pass), and
at 50% it lands close to SparseGPT without SparseGPT's Hessian inverse. Unstructured: the
``round(sparsity · cols)`` lowest scores of every row are zeroed (so every row, and the layer,
has the exact sparsity); N:M: the ``n`` lowest of every ``m`` consecutive inputs of a row.
"""

from __future__ import annotations

import torch

from lighten.errors import RecipeError


@torch.no_grad()
def wanda_mask(weight: torch.Tensor, input_norm: torch.Tensor, *, sparsity: float = 0.5,
               n: int | None = None, m: int | None = None) -> torch.Tensor:
    """Keep-mask (bool, like ``weight``) of Wanda's scores; ``input_norm`` is ``||X_j||₂``."""
    score = weight.detach().abs().float() * input_norm.float()[None, :]
    rows, cols = score.shape
    keep = torch.ones_like(score, dtype=torch.bool)
    if n is None:
        k = round(sparsity * cols)
        if k:
            keep.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, False)
        return keep
    if not 0 < n < m:
        raise RecipeError(f"N:M sparsity needs 0 < n < m, got n={n}, m={m}")
    whole = cols - cols % m  # a ragged tail of fewer than m inputs stays dense
    blocks = score[:, :whole].reshape(rows, -1, m)
    idx = torch.topk(blocks, n, dim=2, largest=False).indices
    mask = torch.ones_like(blocks, dtype=torch.bool).scatter_(2, idx, False)
    keep[:, :whole] = mask.reshape(rows, whole)
    return keep


def magnitude_mask(weight: torch.Tensor, *, sparsity: float = 0.5) -> torch.Tensor:
    """Per-row magnitude pruning (the data-free reference Wanda and SparseGPT are compared to)."""
    return wanda_mask(weight, torch.ones(weight.shape[1]), sparsity=sparsity)
