"""AWQ (Lin et al., 2023): activation-aware scales before group-wise rounding.

Input channels that carry large activations matter most. AWQ multiplies each weight column by
``s_j = mean|x_j|^α`` (normalized) before rounding and divides the input by ``s_j``, so the
product is unchanged but the salient columns get a finer grid. ``α`` is searched on a grid
(0 = plain round-to-nearest, so the search never does worse on the calibration rows) for each
group of layers that read one input (q/k/v, gate/up), minimizing their output error on a sample
of real input rows. Then each layer's per-group clipping range is searched the same way.

Where the reference implementation folds ``1/s`` into the preceding norm or linear, here the
scale is kept in the layer (:class:`AWQLinear`: ``linear(x * input_scale, Ŵ)``), which works for
any architecture at the cost of one elementwise multiply per layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lighten.llm.rtn import dequantize, group_grid, grouped, quantize_with
from lighten.modules import register_module_type
from lighten.quant.weight_only import WeightOnlyLinear, int_range, range_grid

ALPHAS = tuple(i / 20 for i in range(20))  # 0, 0.05, ..., 0.95
CLIPS = tuple(1 - i / 20 for i in range(10))  # 1.0 .. 0.55 of each group's range


def _scales(absmean: torch.Tensor, alpha: float) -> torch.Tensor:
    s = absmean.clamp_min(1e-4).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def search_scale(weights: list[torch.Tensor], x: torch.Tensor, absmean: torch.Tensor, *,
                 bits: int, group_size: int, symmetric: bool) -> tuple[torch.Tensor, float]:
    """The input scale ``s`` (in,) and its ``α`` minimizing ``||x Wᵀ - (x/s) Q(W s)ᵀ||²`` over
    the layers ``weights`` that read the rows ``x`` (n, in).

    Memory: one padded float buffer of the group's weights is reused for every ``α`` (scaled,
    rounded and dequantized in place) instead of the half-dozen weight-sized temporaries of
    ``fake_quantize(w * s)``; the arithmetic is the same, so the errors are bit-identical."""
    rows, cols = sum(t.shape[0] for t in weights), weights[0].shape[1]
    ref = x @ torch.cat([t.float() for t in weights]).T  # (n, out_total); the copy is freed
    groups = -(-cols // group_size)
    buf = torch.zeros(rows, groups * group_size)  # padding columns are re-zeroed each time
    wq, padded = buf[:, :cols], buf.view(rows, groups, group_size)
    qmin, qmax = int_range(bits)
    best, best_err = torch.ones_like(absmean), float("inf")
    best_alpha = 0.0
    for alpha in ALPHAS:
        s = _scales(absmean, alpha)
        start = 0
        for t in weights:  # wq = W·diag(s), layer by layer into the shared buffer
            wq[start:start + len(t)].copy_(t).mul_(s)
            start += len(t)
        buf[:, cols:] = 0
        lo, hi = padded.amin(-1).clamp(max=0), padded.amax(-1).clamp(min=0)  # group_grid
        scale, zero = range_grid(lo, hi, bits=bits, symmetric=symmetric)
        scale, zero = scale[..., None], zero[..., None]
        padded.div_(scale).round_().add_(zero).clamp_(qmin, qmax)  # quantize_with
        padded.sub_(zero).mul_(scale)  # dequantize: Q(W s) in wq
        approx = (x / s) @ wq.T
        err = float(approx.sub_(ref).pow_(2).mean())
        if err < best_err:
            best, best_err, best_alpha = s, err, alpha
    return best, best_alpha


@torch.no_grad()
def search_clip(weight: torch.Tensor, x: torch.Tensor, *, bits: int, group_size: int,
                symmetric: bool, rows_at_once: int = 256) -> torch.Tensor:
    """Per-(row, group) range shrink ratio (from :data:`CLIPS`) minimizing each group's share
    of the output error on ``x`` (n, in): ``|x_g (w_g - Q(w_g))|²``."""
    out = weight.shape[0]
    xg = grouped(x, group_size)  # (n, groups, gs)
    best_clip = torch.ones(out, xg.shape[1])
    for start in range(0, out, rows_at_once):  # bounded memory: (n, rows, groups) at a time
        w = weight[start:start + rows_at_once].float()
        wg = grouped(w, group_size)
        ref = torch.einsum("ngk,rgk->nrg", xg, wg)
        best_err = torch.full(best_clip[start:start + len(w)].shape, float("inf"))
        for c in CLIPS:
            clip = torch.full_like(best_err, c)
            scale, zero = group_grid(w, bits=bits, group_size=group_size, symmetric=symmetric,
                                     clip=clip)
            q = quantize_with(w, scale, zero, bits=bits, group_size=group_size)
            deq = grouped(dequantize(q, scale, zero, group_size=group_size), group_size)
            err = (torch.einsum("ngk,rgk->nrg", xg, deq) - ref).pow(2).mean(0)  # (rows, groups)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_clip[start:start + len(w)][better] = c
    return best_clip


@register_module_type
class AWQLinear(WeightOnlyLinear):
    """A :class:`WeightOnlyLinear` whose input is multiplied by ``input_scale`` (= ``1/s``)
    first: the weights it holds are ``W·diag(s)`` rounded."""

    def __init__(self, in_features: int, out_features: int, **storage):
        super().__init__(in_features, out_features, **storage)
        self.register_buffer("input_scale", torch.ones(in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x * self.input_scale, self.dequantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", awq input scale"
