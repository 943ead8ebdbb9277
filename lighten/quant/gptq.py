"""GPTQ (Frantar et al., 2022): quantize a weight matrix column by column, compensating each
column's rounding error on the columns not yet quantized, weighted by the inverse Hessian of the
layer's reconstruction loss ``||W X - Ŵ X||²`` (``H = 2 X Xᵀ / n``).

Plain round-to-nearest treats every weight alone; GPTQ lets correlated inputs absorb each other's
error, which is what keeps 4-bit and 3-bit weights close to float. Grids are group-wise: a group's
scale is fixed when its first column is reached, from the already-updated weights (as in the
reference implementation without ``static_groups``).

A pruned layer (``mask``: some weights exactly 0, see :func:`lighten.training.pruned_mask`) keeps
its zeros: a pruned weight is fixed at 0 and takes no part in the compensation. Each row is
quantized against the Hessian restricted to its own kept columns, ``(H_kk + λI)⁻¹`` (the exact
masked OBS update; SparseGPT's shared-factor trick instead sends the error of zeroing a weight
to later columns). Rows of one mask share one factor. Where one factor per distinct row mask
costs more than :data:`EXACT_BUDGET` flops, the shared factor is used: pruned weights are set
to 0 when their column is reached and that error is compensated on the later kept weights
(SparseGPT, Frantar & Alistarh 2023). Either way pruned weights end exactly 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lighten.errors import UnsupportedError


class InputStats:
    """Hessian ``2 X Xᵀ / n`` and mean of a layer's inputs as the weight sees them (im2col for
    convolutions), accumulated over calibration batches by a forward pre-hook."""

    def __init__(self, layer: nn.Module, *, hessian: bool):
        self.layer, self.want_hessian = layer, hessian
        cols = layer.weight[0].numel()
        self.xtx = torch.zeros(cols, cols, dtype=torch.float64) if hessian else None
        self.total = torch.zeros(cols, dtype=torch.float64)
        self.rows = 0
        self._handle = layer.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args) -> None:
        rows = weight_inputs(module, args[0].detach()).double()  # (N, cols)
        self.rows += rows.shape[0]
        self.total += rows.sum(dim=0)
        if self.xtx is not None:
            self.xtx += rows.T @ rows

    def remove(self) -> None:
        self._handle.remove()

    @property
    def hessian(self) -> torch.Tensor:
        return (2 * self.xtx / max(self.rows, 1)).float()

    @property
    def mean(self) -> torch.Tensor:
        return (self.total / max(self.rows, 1)).float()


def weight_inputs(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows each output is a dot product with: ``(N, in)`` for Linear, im2col for Conv2d."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                    stride=layer.stride)  # (B, C*kh*kw, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def im2col_supported(layer: nn.Module) -> str | None:
    """Why GPTQ cannot use this layer's im2col matrix, or None when it can."""
    if isinstance(layer, nn.Linear):
        return None
    if layer.groups != 1:
        return f"grouped conv (groups={layer.groups})"
    if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
        return f"padding {layer.padding!r}/{layer.padding_mode}"
    return None


# flops allowed for one inverse-Hessian factor per distinct row mask (rows * cols^3): about
# a few seconds on two CPU cores; beyond it a masked layer uses the shared factor
EXACT_BUDGET = 2e10
_CHUNK_ELEMENTS = 1 << 23  # float64 factor entries per chunk of rows (64 MiB)


def exact_masked(mask: torch.Tensor | None) -> bool:
    """Whether :func:`gptq_quantize` gives ``mask`` (rows, cols) one factor per row mask."""
    if mask is None:
        return True
    distinct = torch.unique(mask, dim=0).shape[0]
    return distinct * float(mask.shape[1]) ** 3 <= EXACT_BUDGET


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, *, group_size: int, grid,
                  damp: float = 0.01, mask: torch.Tensor | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``weight`` (rows, cols) with error compensation.

    ``grid(block) -> (scale, zero_point, qmin, qmax)`` gives per-row parameters for a block of
    columns. ``mask`` (bool, like ``weight``; None = dense) marks the kept weights: the others
    get the zero point (dequantized exactly 0) and no compensation. Returns
    ``(q int32 (rows, cols), scale (rows, groups), zero_point (rows, groups))``.
    """
    w = weight.detach().double().clone()
    rows, cols = w.shape
    h = hessian.detach().double().clone()
    dead = torch.diag(h) == 0  # inputs that are always zero: their weights do not matter
    h[dead, dead] = 1
    w[:, dead] = 0
    keep = None if mask is None else mask.reshape(rows, cols).bool()
    if keep is not None:
        w[~keep] = 0
    groups = -(-cols // group_size)
    q = torch.zeros(rows, cols, dtype=torch.int32)
    scales = torch.zeros(rows, groups)
    zeros = torch.zeros(rows, groups, dtype=torch.int32)
    if keep is not None and exact_masked(keep):
        patterns, which = torch.unique(keep, dim=0, return_inverse=True)
        chunk = max(1, _CHUNK_ELEMENTS // (cols * cols))  # per-row factors held at once
        for start in range(0, len(patterns), chunk):
            part = patterns[start : start + chunk]
            u = _inverse_hessian_factor(_restricted(h, part), damp)  # (patterns, cols, cols)
            sel = ((which >= start) & (which < start + len(part))).nonzero().flatten()
            local = which[sel] - start
            _quantize_columns(w, sel, u[local], part[local], group_size, grid, q, scales,
                              zeros)
        return q, scales, zeros
    u = _inverse_hessian_factor(h, damp)
    _quantize_columns(w, torch.arange(rows), u, keep, group_size, grid, q, scales, zeros)
    return q, scales, zeros


def _restricted(h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """One ``H`` per keep-mask row of ``keep`` (patterns, cols) with the pruned inputs
    decoupled: its factor is that of ``H_kk`` on the kept indices and diagonal on the pruned
    ones (so they get no update and cause none)."""
    both = (keep[:, :, None] & keep[:, None, :]).double()
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    return h * both + eye * (~keep).double()[:, None, :] * torch.diag(h).mean()


def _quantize_columns(w: torch.Tensor, sel: torch.Tensor, u: torch.Tensor,
                      keep: torch.Tensor | None, group_size: int, grid, q, scales, zeros) -> None:
    """GPTQ's column loop over the rows ``sel`` of ``w`` with factor ``u``, writing ``q`` etc."""
    ws = w[sel]
    cols = ws.shape[1]
    for i in range(cols):
        g = i // group_size
        if i % group_size == 0:
            block = ws[:, i : i + group_size]
            if keep is not None:
                block = block * keep[:, i : i + group_size]
            scale, zero, qmin, qmax = grid(block.float())
            scales[sel, g], zeros[sel, g] = scale, zero
        s, z = scales[sel, g].double(), zeros[sel, g].double()
        qi = torch.clamp(torch.round(ws[:, i] / s) + z, qmin, qmax)
        if keep is not None:
            qi = torch.where(keep[:, i], qi, z)  # a pruned weight is the zero point: exactly 0
        q[sel, i] = qi.to(torch.int32)
        if u.dim() == 3:  # one factor per row
            err = (ws[:, i] - (qi - z) * s) / u[:, i, i]
            ws[:, i + 1 :] -= err[:, None] * u[:, i, i + 1 :]
        else:
            err = (ws[:, i] - (qi - z) * s) / u[i, i]  # (rows,)
            ws[:, i + 1 :] -= torch.outer(err, u[i, i + 1 :])


def _inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` (batched over leading dims); λ grows until H is
    numerically positive."""
    mean_diag = h.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None]  # (..., 1, 1)
    eye = torch.eye(h.shape[-1], dtype=h.dtype)
    for attempt in range(6):
        lam = damp * (10**attempt) * mean_diag
        try:
            lower = torch.linalg.cholesky(h + lam * eye)
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise UnsupportedError("GPTQ: the calibration Hessian is not positive definite even with "
                           "strong damping; use method: rtn or more calib_samples")
