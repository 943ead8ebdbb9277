"""N:M semi-structured sparsity: in every group of M consecutive input weights keep the N largest.

Groups run along the input dimension of each output row: Linear ``(out, in)`` groups along
``in``; Conv ``(out, in, kh, kw)`` along the flattened ``in * kh * kw``. This is the pattern
sparse tensor cores accelerate (2:4 on NVIDIA Ampere and later); here it also makes the artifact
smaller, since zeros are stored sparsely.

A row whose length is not a multiple of M is padded with virtual zeros up to the next multiple,
so the last, shorter group keeps at most N weights (all of them when it has N or fewer). The
padded layers are named in a note: hardware N:M kernels need the real length to be a multiple.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.nn import functional as F

from lighten.prune.magnitude import (
    KeepMasks,
    Masks,
    apply_masks,
    prunable_weights,
    sparsity_notes,
)
from lighten.registry import register_step
from lighten.step import PruneStepConfig, StepContext

__all__ = ["NMPruneConfig", "nm_mask", "prune_nm_"]


class NMPruneConfig(PruneStepConfig):
    n: int = Field(2, ge=1, description="weights kept in each group")
    m: int = Field(4, ge=2, description="group size along the input dimension")
    ignore: list[str] = Field(default_factory=list, description="module names left dense")

    @model_validator(mode="after")
    def _n_below_m(self):
        if self.n >= self.m:
            raise ValueError(f"n ({self.n}) must be smaller than m ({self.m}); e.g. n: 2, m: 4")
        return self


def nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask with the n largest |w| in each group of m consecutive input weights."""
    rows = weight.detach().abs().reshape(weight.shape[0], -1)  # (out, in*kh*kw)
    length = rows.shape[1]
    pad = -length % m
    padded = F.pad(rows, (0, pad), value=-1.0)  # virtual entries rank below any real weight
    groups = padded.view(rows.shape[0], -1, m)  # (out, groups, m)
    # stable sort keeps ties deterministic: the earlier index wins
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., :n], True)
    return keep.view(rows.shape[0], -1)[:, :length].reshape(weight.shape)


def nm_masks(weights: dict[str, torch.Tensor], n: int, m: int) -> Masks:
    return {name: nm_mask(w, n, m) for name, w in weights.items()}


def padded_layers(weights: dict[str, torch.Tensor], m: int) -> list[str]:
    """Layers whose input length is not a multiple of m (their last group is padded)."""
    return [name for name, w in weights.items() if (w.numel() // w.shape[0]) % m]


def prune_nm_(model: nn.Module, config: NMPruneConfig,
              ctx: StepContext | None = None) -> nn.Module:
    """Library call: apply N:M masks in place; fine-tunes with the masks fixed when configured."""
    weights = prunable_weights(model, config.ignore)
    masks = nm_masks(weights, config.n, config.m)
    apply_masks(weights, masks)
    if ctx is not None and config.finetune is not None:
        ctx.finetune(model, config.finetune, callbacks=[KeepMasks(weights, masks)])
        apply_masks(weights, masks)
    return model


@register_step("prune.nm", NMPruneConfig)
def prune_nm(model: nn.Module, config: NMPruneConfig, ctx: StepContext) -> nn.Module:
    """Keep the N largest of every M consecutive input weights (e.g. 2:4 sparsity)."""
    from lighten.verb import record_sparsity, zero_fractions

    before = zero_fractions(prunable_weights(model, config.ignore))
    prune_nm_(model, config, ctx)
    weights = prunable_weights(model, config.ignore)
    record_sparsity(ctx, weights, before, action=f"{config.n}:{config.m}")
    ctx.note(f"prune.nm: {config.n}:{config.m} pattern along each layer's input dimension")
    for message in sparsity_notes("prune.nm", model, weights):
        ctx.note(message)
    padded = padded_layers(weights, config.m)
    if padded:
        ctx.note(f"prune.nm: input length of {', '.join(padded)} is not a multiple of "
                 f"{config.m}; the last group was padded (N:M kernels cannot run these as is)")
    return model
