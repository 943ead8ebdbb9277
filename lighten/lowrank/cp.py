"""``lowrank.cp``: CP decomposition of k x k Conv2d layers into 1x1 -> depthwise kh x 1 ->
depthwise 1 x kw -> 1x1 (Lebedev et al., ICLR 2015, "Speeding-up convolutional neural networks
using fine-tuned CP-decomposition").

The kernel ``W (out, in, kh, kw)`` is approximated by a sum of R rank-one tensors
``sum_r a_r (x) b_r (x) c_r (x) d_r`` (tensorly's ``parafac``: alternating least squares from an
SVD start, a maintained library rather than our own ALS), and the layer becomes

    Conv2d(in, R, 1)                            weights b_r
    Conv2d(R, R, (kh, 1), groups=R)             weights c_r   (vertical stride/padding/dilation)
    Conv2d(R, R, (1, kw), groups=R)             weights d_r   (horizontal stride/padding/...)
    Conv2d(R, out, 1)                           weights a_r, the bias

Each factor's columns are normalized and the CP weights spread evenly (``lambda^(1/4)``) over
the four layers, so no layer carries a scale orders of magnitude off the others.

``rank: auto`` takes the smallest R (bisection up to the rank where MACs stop falling) whose
relative kernel error is at most ``max_error``.

Numerical caveats, which the per-layer ``error`` row makes visible:

* CP-ALS is non-convex: the result depends on the start (fixed here: SVD init, seed 0) and the
  error need not fall monotonically in R, so ``auto`` finds *a* small rank meeting the target,
  not the smallest.
* A best rank-R approximation may not exist (de Silva and Lim, 2008): ALS can then drift to
  "degenerate" solutions whose rank-one terms grow large and cancel; such factors lose accuracy
  in float32 and fine-tune poorly (Lebedev et al. saw this and fine-tuned with a small learning
  rate). Prefer Tucker-2 (orthogonal factors, stable) unless the CP form is much faster.
* A full-rank exact CP may need R > max(in, out), where it no longer saves MACs; unlike SVD and
  Tucker there is no "full rank is exact" point short of that.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from lighten.lowrank.common import (
    LowRankConfig,
    Proposal,
    Site,
    apply_proposals,
    example_inputs_of,
    finish,
    one_blas_thread,
    positions,
    relative_error,
)
from lighten.lowrank.tucker import candidates, conv_padding
from lighten.registry import register_step
from lighten.step import StepContext

__all__ = ["CPConfig", "cp_layer", "factorize_cp_"]


class CPConfig(LowRankConfig):
    rank: int | Literal["auto"] = Field("auto", description="CP rank R of every conv, or auto: "
                                        "the smallest R found whose kernel error is at most "
                                        "max_error")
    max_error: float = Field(0.3, gt=0, lt=1, description="rank: auto: largest relative "
                             "Frobenius error of a conv's kernel")
    iterations: int = Field(100, ge=1, description="ALS iterations at most per decomposition")


def cp4(weight: torch.Tensor, rank: int, iterations: int = 100
        ) -> tuple[list[np.ndarray], float]:
    """Balanced CP factors ``[A (out, R), B (in, R), C (kh, R), D (kw, R)]`` of ``weight``
    (the CP weights spread over the four) and the relative error of the approximation."""
    import warnings

    from tensorly.cp_tensor import cp_normalize, cp_to_tensor
    from tensorly.decomposition import parafac

    w = weight.detach().double().cpu().numpy()
    with warnings.catch_warnings(), one_blas_thread():  # warning: SVD init rank > a mode
        warnings.simplefilter("ignore", UserWarning)
        cp = parafac(w, rank=rank, init="svd", n_iter_max=iterations, tol=1e-10,
                     random_state=0)
    lam, factors = cp_normalize(cp)
    approx = cp_to_tensor((lam, factors))
    spread = np.abs(lam) ** 0.25
    balanced = [f * spread[None, :] for f in factors]
    balanced[0] = balanced[0] * np.sign(lam)[None, :]
    error = relative_error(torch.as_tensor(approx), weight)
    return balanced, error


def cp_layer(conv: nn.Conv2d, rank: int, iterations: int = 100
             ) -> tuple[nn.Sequential, float]:
    """The 4-layer CP replacement of ``conv`` at ``rank`` and the relative kernel error."""
    (a, b, c, d), error = cp4(conv.weight, rank, iterations)
    kw = {"device": conv.weight.device, "dtype": conv.weight.dtype}
    (kh, kwid), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    ph, pw = conv_padding(conv)
    mode = conv.padding_mode

    def t(x):
        return torch.as_tensor(np.ascontiguousarray(x)).to(**kw)

    first = nn.Conv2d(conv.in_channels, rank, 1, bias=False, **kw)
    vertical = nn.Conv2d(rank, rank, (kh, 1), stride=(sh, 1), padding=(ph, 0), dilation=(dh, 1),
                         groups=rank, bias=False, padding_mode=mode, **kw)
    horizontal = nn.Conv2d(rank, rank, (1, kwid), stride=(1, sw), padding=(0, pw),
                           dilation=(1, dw), groups=rank, bias=False, padding_mode=mode, **kw)
    last = nn.Conv2d(rank, conv.out_channels, 1, bias=conv.bias is not None, **kw)
    first.weight.data.copy_(t(b.T)[:, :, None, None])  # (R, in, 1, 1)
    vertical.weight.data.copy_(t(c.T)[:, None, :, None])  # (R, 1, kh, 1)
    horizontal.weight.data.copy_(t(d.T)[:, None, None, :])  # (R, 1, 1, kw)
    last.weight.data.copy_(t(a)[:, :, None, None])  # (out, R, 1, 1)
    if conv.bias is not None:
        last.bias.data.copy_(conv.bias.detach())
    return nn.Sequential(first, vertical, horizontal, last), error


def cp_macs(site: Site, rank: int | None) -> int:
    """MACs of the conv (``rank`` None) or of its rank-R CP form, per example."""
    conv = site.module
    kh, kw = conv.kernel_size
    p_in, p_out = positions(site.in_shape, 0), positions(site.out_shape, 0)
    if rank is None:
        return p_out * conv.out_channels * conv.in_channels * kh * kw
    h_mid, w_in = site.out_shape[-2], site.in_shape[-1]  # after the vertical conv
    return rank * (p_in * conv.in_channels + h_mid * w_in * kh + p_out * kw
                   + p_out * conv.out_channels)


def break_even_rank(site: Site) -> int:
    """The largest R whose CP form still has fewer MACs than the conv (0: none)."""
    per_rank = cp_macs(site, 1)
    return max(0, (cp_macs(site, None) - 1) // per_rank)


def auto_rank(conv: nn.Conv2d, max_rank: int, max_error: float, iterations: int
              ) -> tuple[int, float]:
    """Smallest R in [1, max_rank] found by bisection with kernel error <= ``max_error``
    (``(max_rank, its error)`` when none meets it)."""
    low, high = 1, max_rank
    errors: dict[int, float] = {}

    def err(r: int) -> float:
        if r not in errors:
            errors[r] = cp4(conv.weight, r, iterations)[1]
        return errors[r]

    if err(high) > max_error:
        return high, errors[high]
    while low < high:
        mid = (low + high) // 2
        if err(mid) <= max_error:
            high = mid
        else:
            low = mid + 1
    return high, err(high)


def factorize_cp_(model: nn.Module, config: CPConfig, example_inputs,
                  ctx: StepContext | None = None) -> nn.Module:
    """Library call: replace k x k convs of ``model`` in place by their CP form."""
    example_inputs = tuple(example_inputs)
    sites = candidates(model, example_inputs, config.ignore, "CP", ctx)
    proposals = []
    for _, site in sites.items():
        conv = site.module
        extra = {}
        if config.rank == "auto":
            top = break_even_rank(site)
            if top < 1:
                if ctx is not None:
                    ctx.layer(site.name, "keep", reason="no CP rank saves MACs on this conv")
                continue
            rank, error = auto_rank(conv, top, config.max_error, config.iterations)
            if error > config.max_error:
                extra["note"] = (f"error {error:.3g} above max_error {config.max_error} at the "
                                 f"break-even rank {top}")
        else:
            rank = config.rank
        module, error = cp_layer(conv, rank, config.iterations)
        proposal = Proposal(site, module, rank, error, extra=extra)
        if "note" in extra:
            proposal.reason = extra["note"]
        proposals.append(proposal)
    apply_proposals(model, proposals, config, ctx, step="lowrank.cp")
    return finish(model, config, ctx, "lowrank.cp", example_inputs)


@register_step("lowrank.cp", CPConfig,
               needs_data=lambda c: "example inputs (each layer's input shape)")
def lowrank_cp(model: nn.Module, config: CPConfig, ctx: StepContext) -> nn.Module:
    """CP decomposition of k x k convs into 1x1 -> kx1 -> 1xk -> 1x1 (Lebedev et al.)."""
    return factorize_cp_(model, config, example_inputs_of(ctx), ctx)
