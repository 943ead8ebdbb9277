"""AdaRound (Nagel et al., 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization").

Round-to-nearest picks each weight's rounding direction alone. AdaRound keeps the RTN grid
(scales and zero points) but learns, per weight, whether to round down or up so that the
layer's *output* on calibration inputs stays close to float: it minimizes

    ||W X - W~ X||²  +  λ Σ (1 - |2 h(V) - 1|^β),     W~ = s (clamp(floor(W/s) + h(V) + z) - z)

where ``h(V) = clip(sigmoid(V) (ζ - γ) + γ, 0, 1)`` is the rectified sigmoid. The regularizer
is off for a warm-up, then β anneals from 20 to 2 so ``h`` is pushed to exactly 0 or 1; the
final rounding is up where ``h >= 0.5``. Codes therefore differ from RTN by at most one step,
and the result is stored exactly like RTN / GPTQ (integer codes + group scales).

A pruned layer's zeros (``mask``) stay exactly 0: they are fixed at the zero point, left out
of the soft weight and the regularizer, so only the kept weights' rounding is learned.

Inputs are the im2col rows the weight sees (:func:`lighten.quant.gptq.weight_inputs`), so a
convolution's reconstruction is a matrix product, subsampled to keep CPU steps cheap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from lighten.errors import DataError
from lighten.quant.gptq import weight_inputs
from lighten.task import batch_inputs

ZETA, GAMMA = 1.1, -0.1  # stretch of the rectified sigmoid, as in the paper
BETA_START, BETA_END = 20.0, 2.0
WARMUP = 0.2  # fraction of iterations without the rounding regularizer
LR = 1e-2
MAX_ROWS = 16384  # im2col rows cached per layer (a random subset of all positions)
BATCH_ROWS = 1024  # rows per optimization step


class InputRows:
    """A forward pre-hook that keeps a random subset of the rows ``layer``'s weight sees."""

    def __init__(self, layer: nn.Module, *, per_batch: int, seed: int = 0):
        self.per_batch = per_batch
        self.rows: list[torch.Tensor] = []
        self._gen = torch.Generator().manual_seed(seed)
        self._handle = layer.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args) -> None:
        rows = weight_inputs(module, args[0].detach()).float()  # (N, cols)
        if rows.shape[0] > self.per_batch:
            rows = rows[torch.randperm(rows.shape[0], generator=self._gen)[: self.per_batch]]
        self.rows.append(rows.clone())

    def remove(self) -> None:
        self._handle.remove()


@torch.no_grad()
def collect_rows(model: nn.Module, layer: nn.Module, batches: Sequence[torch.Tensor], *,
                 max_rows: int = MAX_ROWS, seed: int = 0) -> torch.Tensor:
    """Run ``batches`` through ``model``; return up to ``max_rows`` input rows of ``layer``."""
    hook = InputRows(layer, per_batch=max(1, math.ceil(max_rows / max(len(batches), 1))),
                     seed=seed)
    try:
        for x in batches:
            model(*batch_inputs(x))  # one tensor, or Inputs of several
    finally:
        hook.remove()
    if not hook.rows:
        raise DataError("adaround needs calibration inputs that reach the layer; pass "
                        "calibration_batches or use method: rtn")
    return torch.cat(hook.rows)


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """``h(V)`` in [0, 1], reaching 0 and 1 exactly (unlike a plain sigmoid)."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def _inverse_rectified_sigmoid(h: torch.Tensor) -> torch.Tensor:
    """``V`` with ``h(V) == h`` for ``h`` in [0, 1)."""
    p = (h - GAMMA) / (ZETA - GAMMA)
    return torch.log(p / (1 - p))


def beta_at(step: int, iters: int) -> float | None:
    """Regularizer exponent at ``step``: None during warm-up, then linear 20 -> 2."""
    warm = int(WARMUP * iters)
    if step < warm:
        return None
    rel = (step - warm) / max(iters - warm - 1, 1)
    return BETA_END + (BETA_START - BETA_END) * max(0.0, 1.0 - rel)


def adaround_quantize(weight: torch.Tensor, rows: torch.Tensor, *, group_size: int, grid,
                      iters: int = 500, reg: float = 0.01, batch_rows: int = BATCH_ROWS,
                      seed: int = 0, desc: str = "adaround", mask: torch.Tensor | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Learn the rounding of ``weight`` (out, cols) on input ``rows`` (N, cols).

    ``grid(block) -> (scale, zero_point, qmin, qmax)`` as for RTN; the scales are RTN's.
    ``mask`` (bool, like ``weight``; None = dense): weights outside it stay exactly 0.
    Returns ``(q int32 (out, cols), scale (out, groups), zero_point (out, groups))``.
    """
    from lighten.quant.weight_only import rtn_quantize  # weight_only imports this module

    if rows.ndim != 2 or rows.shape[0] == 0 or rows.shape[1] != weight.shape[1]:
        raise DataError(f"adaround needs calibration rows of shape (N, {weight.shape[1]}), got "
                        f"{tuple(rows.shape)}; pass calibration inputs the layer can take")
    w = weight.detach().float()
    keep = torch.ones_like(w) if mask is None else mask.reshape(w.shape).float()
    w = w * keep
    _, scales, zeros = rtn_quantize(w, group_size=group_size, grid=grid)
    _, _, qmin, qmax = grid(w[:1, :1])
    cols = w.shape[1]
    s = scales.repeat_interleave(group_size, dim=1)[:, :cols]  # (out, cols)
    z = zeros.float().repeat_interleave(group_size, dim=1)[:, :cols]
    base = torch.floor(w / s)
    v = nn.Parameter(_inverse_rectified_sigmoid(w / s - base))
    x = rows.float()
    target = x @ w.T  # (N, out): the float layer on its own inputs (bias cancels)

    def soft_weight() -> torch.Tensor:
        return keep * s * (torch.clamp(base + rectified_sigmoid(v) + z, qmin, qmax) - z)

    opt = torch.optim.Adam([v], lr=LR)
    gen = torch.Generator().manual_seed(seed)
    for step in _progress(range(iters), desc):
        idx = torch.randint(0, x.shape[0], (min(batch_rows, x.shape[0]),), generator=gen)
        loss = (x[idx] @ soft_weight().T - target[idx]).pow(2).sum(dim=1).mean()
        beta = beta_at(step, iters)
        if beta is not None and reg > 0:
            loss = loss + reg * (keep * (1 - (2 * rectified_sigmoid(v) - 1).abs().pow(beta))
                                 ).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        up = (rectified_sigmoid(v) >= 0.5).float()
        q = torch.clamp(base + up + z, qmin, qmax)
        q = torch.where(keep.bool(), q, z).to(torch.int32)  # a pruned weight: its zero point
    return q, scales, zeros


def _progress(steps: range, desc: str):
    from tqdm.auto import tqdm

    # disable=None: a bar on a terminal, silent in logs and tests
    return tqdm(steps, desc=desc, unit="it", leave=False, disable=None)
