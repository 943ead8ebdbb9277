"""GPTQ (Frantar et al., 2022): quantize a weight matrix column by column, compensating each
column's rounding error on the columns not yet quantized, weighted by the inverse Hessian of the
layer's reconstruction loss ``||W X - Ŵ X||²`` (``H = 2 X Xᵀ / n``).

Plain round-to-nearest treats every weight alone; GPTQ lets correlated inputs absorb each other's
error, which is what keeps 4-bit and 3-bit weights close to float. Grids are group-wise: a group's
scale is fixed when its first column is reached, from the already-updated weights (as in the
reference implementation without ``static_groups``).
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


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, *, group_size: int, grid,
                  damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``weight`` (rows, cols) with error compensation.

    ``grid(block) -> (scale, zero_point, qmin, qmax)`` gives per-row parameters for a block of
    columns. Returns ``(q int32 (rows, cols), scale (rows, groups), zero_point (rows, groups))``.
    """
    w = weight.detach().double().clone()
    rows, cols = w.shape
    h = hessian.detach().double().clone()
    dead = torch.diag(h) == 0  # inputs that are always zero: their weights do not matter
    h[dead, dead] = 1
    w[:, dead] = 0
    u = _inverse_hessian_factor(h, damp)
    groups = -(-cols // group_size)
    q = torch.zeros(rows, cols, dtype=torch.int32)
    scales = torch.zeros(rows, groups)
    zeros = torch.zeros(rows, groups, dtype=torch.int32)
    for i in range(cols):
        g = i // group_size
        if i % group_size == 0:
            scale, zero, qmin, qmax = grid(w[:, i : i + group_size].float())
            scales[:, g], zeros[:, g] = scale, zero
        s, z = scales[:, g].double(), zeros[:, g].double()
        qi = torch.clamp(torch.round(w[:, i] / s) + z, qmin, qmax)
        q[:, i] = qi.to(torch.int32)
        err = (w[:, i] - (qi - z) * s) / u[i, i]  # (rows,)
        w[:, i + 1 :] -= torch.outer(err, u[i, i + 1 :])
    return q, scales, zeros


def _inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λI)⁻¹``; λ grows until H is numerically positive."""
    mean_diag = float(torch.diag(h).mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    for attempt in range(6):
        lam = damp * (10**attempt) * mean_diag
        try:
            lower = torch.linalg.cholesky(h + lam * eye)
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise UnsupportedError("GPTQ: the calibration Hessian is not positive definite even with "
                           "strong damping; use method: rtn or more calib_samples")
