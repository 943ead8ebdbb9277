"""``lowrank.tucker``: Tucker-2 of k x k Conv2d layers into 1x1 -> k x k -> 1x1 (Kim et al., ICLR
2016, "Compression of deep convolutional neural networks for fast and low power mobile
applications").

The kernel ``W (out, in, kh, kw)`` is approximated along its two channel modes only,
``W ~ G x_0 U_out x_1 U_in`` with a core ``G (r_out, r_in, kh, kw)``, and the layer becomes

    Conv2d(in, r_in, 1)            weight U_in^T         (at the input resolution)
    Conv2d(r_in, r_out, kh x kw)   weight G              (the layer's stride/padding/dilation)
    Conv2d(r_out, out, 1)          weight U_out, bias    (at the output resolution)

three standard layers in an ``nn.Sequential`` that artifacts rebuild from the edit log. Grouped
and depthwise convs (groups > 1) are left as they are (each group would need its own Tucker
core; a report row says so).

The decomposition is tensorly's ``partial_tucker`` (HOOI from an SVD start), chosen because it
is a maintained, tested library for exactly this: writing our own alternating least squares would
add code to keep right without adding anything. It runs on tensorly's numpy backend so the
global tensorly backend other code may set is never touched. At full ranks the factorization is
exact; truncated, the relative error of the kernel is reported per layer.

Ranks: ``vbmf`` (the default; :func:`lighten.lowrank.ranks.evbmf_rank` on the mode-0 and mode-1
unfoldings, as Kim et al. do), ``energy`` (each unfolding keeps that share of its squared
singular values), an int or ``[r_out, r_in]``, or ``target_macs`` (one energy threshold for all
layers, found by bisection, so the model's MACs meet the target). EVBMF reads a layer as
signal plus Gaussian noise; on a compact, weight-decayed net it calls most of a layer noise
(shipped ResNet-20: ranks 1-11 of 16-64 channels, about 20x fewer MACs, a large loss before
fine-tuning), so there prefer ``target_macs`` or ``energy``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from lighten.lowrank.common import (
    LowRankConfig,
    Proposal,
    Site,
    apply_to_target,
    example_inputs_of,
    find_sites,
    one_blas_thread,
    positions,
    relative_error,
)
from lighten.lowrank.ranks import (
    energy_rank,
    evbmf_rank,
    singular_values,
    threshold_for_target,
    unfold,
)
from lighten.registry import register_step
from lighten.step import StepContext

HOOI_SWEEPS = 20  # from the SVD start the kernel error settles in a few sweeps

__all__ = ["TuckerConfig", "conv_padding", "factorize_tucker_", "tucker2_layer"]


class TuckerConfig(LowRankConfig):
    ranks: int | list[int] | Literal["vbmf", "auto"] | None = Field(
        None, description="vbmf (auto, the default): EVBMF estimate on each channel unfolding; "
        "an int for both channel ranks or [r_out, r_in]")
    energy: float | None = Field(None, gt=0, le=1, description="each channel unfolding keeps "
                                 "this share of its squared singular values")
    target_macs: float | None = Field(None, gt=0, lt=1, description="the whole model's MACs "
                                      "after, as a share of before (one energy threshold for "
                                      "all convs, by bisection)")

    @model_validator(mode="after")
    def _one_rule(self):
        given = [k for k in ("ranks", "energy", "target_macs") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of ranks, energy, target_macs (got {', '.join(given)})")
        r = self.ranks
        if isinstance(r, list) and (len(r) != 2 or min(r) < 1):
            raise ValueError(f"ranks as a list is [r_out, r_in], both >= 1; got {r}")
        if isinstance(r, int) and r < 1:
            raise ValueError(f"ranks must be >= 1, vbmf or a list; got {r}")
        return self

    @property
    def rule(self) -> str:
        if self.energy is not None:
            return "energy"
        if self.target_macs is not None:
            return "target_macs"
        return "fixed" if isinstance(self.ranks, (int, list)) else "vbmf"


def conv_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """The conv's padding as two ints ('same' with an odd reach included); None: asymmetric."""
    p = conv.padding
    if p == "valid":
        return (0, 0)
    if p == "same":
        reach = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        return None if any(r % 2 for r in reach) else (reach[0] // 2, reach[1] // 2)
    return (int(p[0]), int(p[1]))


def _spatial(m: nn.Module) -> bool:
    return type(m) is nn.Conv2d and max(m.kernel_size) > 1


def why_not(conv: nn.Conv2d, what: str) -> str | None:
    """Why ``what`` leaves this k x k conv alone, or None."""
    if conv.groups != 1:
        return (f"grouped conv (groups={conv.groups}): {what} covers groups=1 convs only")
    if conv_padding(conv) is None:
        return f"padding 'same' with an even kernel reach is asymmetric; {what} skips it"
    return None


def _gram_svd(matrix, n_eigenvecs=None, **_):
    """Truncated SVD from the eigenvectors of the smaller Gram matrix. A conv's unfoldings are
    wide (``out x in*k*k``); tensorly's own ``symeig_svd`` (0.10) decomposes the larger Gram
    and its ``truncated_svd`` a full one, each ~100x slower here (tensorly uses it for the
    HOSVD start; its HOOI sweeps call ``truncated_svd`` on much smaller matrices). Only the left
    vectors are used (the mode's factor); they are orthonormal whatever the conditioning."""
    m = np.asarray(matrix)
    wide = m.shape[0] <= m.shape[1]
    s2, vecs = np.linalg.eigh(m @ m.T if wide else m.T @ m)
    s2, vecs = s2[::-1], vecs[:, ::-1]
    s = np.sqrt(np.clip(s2, 0, None))
    safe = np.where(s > 0, s, 1.0)
    if wide:
        u, v = vecs, (m.T @ vecs / safe).T
    else:
        v, u = vecs.T, m @ vecs / safe
    n = n_eigenvecs or len(s)
    return u[:, :n], s[:n], v[:n]


def tucker2(weight: torch.Tensor, ranks: tuple[int, int]) -> tuple[np.ndarray, np.ndarray,
                                                                   np.ndarray]:
    """``(core (r_out, r_in, kh, kw), U_out (out, r_out), U_in (in, r_in))`` by tensorly."""
    from tensorly.decomposition import partial_tucker

    w = weight.detach().double().cpu().numpy()
    with one_blas_thread():
        (core, (u_out, u_in)), _ = partial_tucker(w, rank=list(ranks), modes=[0, 1], init="svd",
                                                  n_iter_max=HOOI_SWEEPS, tol=1e-5,
                                                  svd=_gram_svd)
    return core, u_out, u_in


def tucker2_layer(conv: nn.Conv2d, ranks: tuple[int, int]) -> tuple[nn.Sequential, float]:
    """The 1x1 -> k x k -> 1x1 replacement of ``conv`` and the relative error of its kernel
    (a channel mode kept at full rank has no 1x1 conv: its factor is folded into the core)."""
    out_c, in_c = conv.out_channels, conv.in_channels
    r_out, r_in = max(1, min(ranks[0], out_c)), max(1, min(ranks[1], in_c))
    core, u_out, u_in = tucker2(conv.weight, (r_out, r_in))
    kw = {"device": conv.weight.device, "dtype": conv.weight.dtype}

    def t(a):
        return torch.as_tensor(np.ascontiguousarray(a)).to(**kw)

    approx = np.einsum("abhw,oa,ib->oihw", core, u_out, u_in)
    # a mode kept at full rank needs no 1x1 conv: its factor folds into the core
    if r_in == in_c:
        core = np.einsum("abhw,ib->aihw", core, u_in)
    if r_out == out_c:
        core = np.einsum("abhw,oa->obhw", core, u_out)
    layers = []
    if r_in < in_c:
        first = nn.Conv2d(in_c, r_in, 1, bias=False, **kw)
        first.weight.data.copy_(t(u_in.T)[:, :, None, None])
        layers.append(first)
    middle = nn.Conv2d(r_in, r_out, conv.kernel_size, stride=conv.stride,
                       padding=conv_padding(conv), dilation=conv.dilation,
                       bias=conv.bias is not None and r_out == out_c,
                       padding_mode=conv.padding_mode, **kw)
    middle.weight.data.copy_(t(core))
    layers.append(middle)
    if r_out < out_c:
        last = nn.Conv2d(r_out, out_c, 1, bias=conv.bias is not None, **kw)
        last.weight.data.copy_(t(u_out)[:, :, None, None])
        layers.append(last)
    if conv.bias is not None:
        layers[-1].bias.data.copy_(conv.bias.detach())
    return nn.Sequential(*layers), relative_error(torch.as_tensor(approx), conv.weight)


def tucker_macs(site: Site, ranks: tuple[int, int] | None) -> int:
    """MACs of the conv (``ranks`` None) or of its Tucker-2 form, per example."""
    conv = site.module
    k = conv.kernel_size[0] * conv.kernel_size[1]
    p_in, p_out = positions(site.in_shape, 0), positions(site.out_shape, 0)
    if ranks is None:
        return p_out * conv.out_channels * conv.in_channels * k
    r_out, r_in = ranks
    first = p_in * conv.in_channels * r_in if r_in < conv.in_channels else 0
    last = p_out * r_out * conv.out_channels if r_out < conv.out_channels else 0
    return first + p_out * r_in * r_out * k + last


def choose_ranks(sites: dict[str, Site], config: TuckerConfig, model_macs: int | None
                 ) -> tuple[dict[str, tuple[int, int]], str | None]:
    """``(r_out, r_in)`` per conv by the config's rule; a note when a MAC target is missed."""
    rule = config.rule
    if rule == "fixed":
        r = config.ranks
        pair = (r, r) if isinstance(r, int) else (r[0], r[1])
        return {n: (min(pair[0], s.module.out_channels), min(pair[1], s.module.in_channels))
                for n, s in sites.items()}, None
    if rule == "vbmf":
        return {n: (evbmf_rank(unfold(s.module.weight, 0)), evbmf_rank(unfold(s.module.weight, 1)))
                for n, s in sites.items()}, None
    spectra = {n: (singular_values(unfold(s.module.weight, 0)),
                   singular_values(unfold(s.module.weight, 1))) for n, s in sites.items()}

    def at(name: str, t: float) -> tuple[int, int]:
        s_out, s_in = spectra[name]
        return energy_rank(s_out, t), energy_rank(s_in, t)

    if rule == "energy":
        return {n: at(n, config.energy) for n in sites}, None
    others = model_macs - sum(tucker_macs(s, None) * s.calls for s in sites.values())

    def total(t: float) -> int:
        return others + sum(s.calls * min(tucker_macs(s, at(n, t)), tucker_macs(s, None))
                            for n, s in sites.items())

    t, met = threshold_for_target(total, config.target_macs * model_macs)
    note = None if met else (f"lowrank.tucker: target_macs {config.target_macs} cannot be met "
                             "by these convs (rank 1 everywhere is still above it)")
    return {n: at(n, t) for n in sites}, note


def candidates(model: nn.Module, example_inputs, ignore: list[str], what: str, ctx
               ) -> dict[str, Site]:
    """k x k Conv2d sites the step can factorize; the others get a 'keep' row with the reason."""
    sites = find_sites(model, example_inputs, _spatial, ignore)
    for name in list(sites):
        reason = why_not(sites[name].module, what)
        if reason is not None:
            if ctx is not None:
                ctx.layer(name, "keep", reason=reason)
            del sites[name]
    return sites


def factorize_tucker_(model: nn.Module, config: TuckerConfig, example_inputs,
                      ctx: StepContext | None = None) -> nn.Module:
    """Library call: replace k x k convs of ``model`` in place by their Tucker-2 form."""
    from lighten.measure import count_macs

    example_inputs = tuple(example_inputs)
    sites = candidates(model, example_inputs, config.ignore, "Tucker-2", ctx)
    model_macs = count_macs(model, example_inputs) if config.rule == "target_macs" else None
    ranks, note = choose_ranks(sites, config, model_macs)
    proposals = []
    for name, site in sites.items():
        module, error = tucker2_layer(site.module, ranks[name])
        core = next(m for m in module if m.kernel_size == site.module.kernel_size)
        rank = (core.out_channels, core.in_channels)
        proposals.append(Proposal(site, module, rank, error))
    return apply_to_target(model, proposals, config, ctx, "lowrank.tucker", example_inputs,
                           model_macs, note)


@register_step("lowrank.tucker", TuckerConfig,
               needs_data=lambda c: "example inputs (each layer's input shape)")
def lowrank_tucker(model: nn.Module, config: TuckerConfig, ctx: StepContext) -> nn.Module:
    """Tucker-2 of k x k convs into 1x1 -> k x k -> 1x1 (ranks: vbmf, energy, target MACs)."""
    return factorize_tucker_(model, config, example_inputs_of(ctx), ctx)
