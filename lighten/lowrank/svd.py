"""``lowrank.svd``: truncated SVD of Linear and 1x1 Conv2d layers into two thinner layers.

``W (out, in) = U S V^T`` keeps its first r singular triplets and becomes
``Linear(in, r, bias=False)`` with weight ``sqrt(S_r) V_r^T`` followed by ``Linear(r, out)``
with weight ``U_r sqrt(S_r)`` and the original bias (a 1x1 conv: the same with 1x1 convs, the
stride and padding on the first). The split is balanced (``sqrt(S)`` on each side) so both
factors have the same scale, which fine-tuning and a later quantization prefer. The error of
the weight is exactly the discarded singular values: ``||W - W_r||_F = sqrt(sum_{i>r} s_i^2)``
(Eckart-Young), so ``energy: e`` bounds the relative error by ``sqrt(1 - e)``.

A layer is replaced only where it cuts MACs, i.e. ``r (in + out) < in out``, and (with
``measure_latency``) where the pair is faster than the layer on the deployment backend.
"""

from __future__ import annotations

from typing import Literal

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
    positions,
)
from lighten.lowrank.ranks import energy_rank, evbmf_rank, threshold_for_target
from lighten.registry import register_step
from lighten.step import StepContext

__all__ = ["SVDConfig", "factorize_svd_", "svd_factors", "svd_layer"]


class SVDConfig(LowRankConfig):
    rank: int | Literal["auto"] | None = Field(None, description="rank of every layer "
                                               "(capped at min(in, out)), or auto: the EVBMF "
                                               "estimate per layer (the default)")
    energy: float | None = Field(None, gt=0, le=1, description="keep the fewest singular "
                                 "values holding this share of each layer's squared norm")
    target_macs: float | None = Field(None, gt=0, lt=1, description="the whole model's MACs "
                                      "after, as a share of before; one energy threshold for "
                                      "all layers, found by bisection")
    convs: bool = Field(True, description="also factorize 1x1 Conv2d layers (groups 1)")

    @model_validator(mode="after")
    def _one_rule(self):
        given = [k for k in ("rank", "energy", "target_macs") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of rank, energy, target_macs (got {', '.join(given)})")
        if isinstance(self.rank, int) and self.rank < 1:
            raise ValueError(f"rank must be >= 1 or auto, got {self.rank}")
        return self

    @property
    def rule(self) -> str:
        if self.energy is not None:
            return "energy"
        if self.target_macs is not None:
            return "target_macs"
        return "int" if isinstance(self.rank, int) else "auto"


def _is_pointwise(m: nn.Module) -> bool:
    return (type(m) is nn.Conv2d and m.groups == 1 and tuple(m.kernel_size) == (1, 1)
            and tuple(m.dilation) == (1, 1))


def _wanted(convs: bool):
    def wanted(m: nn.Module) -> bool:
        return type(m) is nn.Linear or (convs and _is_pointwise(m))
    return wanted


def _matrix(layer: nn.Module) -> torch.Tensor:
    return layer.weight.detach().reshape(layer.weight.shape[0], -1)  # (out, in)


def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A (r, in), B (out, r))`` with ``B @ A`` the best rank-r approximation of ``weight``."""
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    root = s[:rank].sqrt()
    a = root[:, None] * vh[:rank]
    b = u[:, :rank] * root[None, :]
    return a.to(weight.dtype), b.to(weight.dtype)


def svd_layer(layer: nn.Linear | nn.Conv2d, rank: int) -> nn.Sequential:
    """The two-layer replacement of a Linear or 1x1 Conv2d at ``rank``."""
    w = _matrix(layer)
    rank = max(1, min(rank, *w.shape))
    a, b = svd_factors(w, rank)
    kw = {"device": w.device, "dtype": w.dtype}
    if isinstance(layer, nn.Linear):
        first = nn.Linear(layer.in_features, rank, bias=False, **kw)
        second = nn.Linear(rank, layer.out_features, bias=layer.bias is not None, **kw)
        first.weight.data.copy_(a)
        second.weight.data.copy_(b)
    else:
        first = nn.Conv2d(layer.in_channels, rank, 1, stride=layer.stride,
                          padding=layer.padding, bias=False, padding_mode=layer.padding_mode,
                          **kw)
        second = nn.Conv2d(rank, layer.out_channels, 1, bias=layer.bias is not None, **kw)
        first.weight.data.copy_(a[:, :, None, None])
        second.weight.data.copy_(b[:, :, None, None])
    if layer.bias is not None:
        second.bias.data.copy_(layer.bias.detach())
    return nn.Sequential(first, second)


def svd_macs(site: Site, rank: int | None) -> int:
    """MACs of the layer (``rank`` None) or of its rank-r pair, per example, from its shapes."""
    layer = site.module
    out_c, in_c = _matrix(layer).shape
    where = positions(site.out_shape, -1 if isinstance(layer, nn.Linear) else 0)
    return where * (in_c * out_c if rank is None else rank * (in_c + out_c))


def choose_ranks(sites: dict[str, Site], config: SVDConfig, model_macs: int | None
                 ) -> tuple[dict[str, int], str | None]:
    """Rank per layer by the config's rule, and a note when a MAC target cannot be met."""
    spectra = {n: torch.linalg.svdvals(_matrix(s.module).double()).numpy()
               for n, s in sites.items()}
    rule = config.rule
    if rule == "int":
        return {n: min(config.rank, len(s)) for n, s in spectra.items()}, None
    if rule == "auto":
        return {n: evbmf_rank(_matrix(s.module)) for n, s in sites.items()}, None
    if rule == "energy":
        return {n: energy_rank(s, config.energy) for n, s in spectra.items()}, None

    def layer_macs(name: str, t: float) -> int:
        site = sites[name]
        return site.calls * min(svd_macs(site, energy_rank(spectra[name], t)),
                                svd_macs(site, None))

    others = model_macs - sum(svd_macs(s, None) * s.calls for s in sites.values())
    budget = config.target_macs * model_macs
    t, met = threshold_for_target(lambda t: others + sum(layer_macs(n, t) for n in sites),
                                  budget)
    note = None if met else (f"lowrank.svd: target_macs {config.target_macs} cannot be met by "
                             "these layers (rank 1 everywhere is still above it)")
    return {n: energy_rank(s, t) for n, s in spectra.items()}, note


def factorize_svd_(model: nn.Module, config: SVDConfig, example_inputs,
                   ctx: StepContext | None = None) -> nn.Module:
    """Library call: replace Linear / 1x1 conv layers of ``model`` in place by SVD pairs."""
    from lighten.measure import count_macs

    example_inputs = tuple(example_inputs)
    sites = find_sites(model, example_inputs, _wanted(config.convs), config.ignore)
    model_macs = count_macs(model, example_inputs) if config.rule == "target_macs" else None
    ranks, note = choose_ranks(sites, config, model_macs)
    proposals = []
    for name, site in sites.items():
        w = _matrix(site.module)
        rank = min(ranks[name], *w.shape)
        s = torch.linalg.svdvals(w.double())
        error = float(s[rank:].square().sum().sqrt() / s.square().sum().sqrt().clamp_min(1e-30))
        proposals.append(Proposal(site, svd_layer(site.module, rank), rank, error))
    return apply_to_target(model, proposals, config, ctx, "lowrank.svd", example_inputs, model_macs,
                           note)


@register_step("lowrank.svd", SVDConfig,
               needs_data=lambda c: "example inputs (each layer's input shape)")
def lowrank_svd(model: nn.Module, config: SVDConfig, ctx: StepContext) -> nn.Module:
    """Truncated SVD of Linear / 1x1 conv layers into two thinner layers."""
    return factorize_svd_(model, config, example_inputs_of(ctx), ctx)
