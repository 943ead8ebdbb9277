"""Unstructured magnitude pruning, one-shot or gradual (AGP), layer-wise or global.

Pruned weights are set to exactly zero and kept at zero while fine-tuning (the mask is re-applied
after every optimizer step). The artifact stores such tensors sparsely, so bytes drop; MACs and
latency of a dense runtime do not, and the report says so.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from lighten.errors import UnsupportedError
from lighten.registry import register_step
from lighten.step import StepConfig, StepContext
from lighten.train import Callback

Masks = dict[str, torch.Tensor]


class MagnitudePruneConfig(StepConfig):
    sparsity: float = Field(gt=0, lt=1, description="fraction of prunable weights set to zero")
    scope: Literal["global", "layer"] = "global"
    schedule: Literal["oneshot", "agp"] = "oneshot"
    ignore: list[str] = Field(default_factory=list, description="module names left dense")

    @model_validator(mode="after")
    def _agp_needs_finetune(self):
        if self.schedule == "agp" and (self.finetune is None or self.finetune.epochs == 0):
            raise ValueError("schedule 'agp' prunes gradually while fine-tuning; add finetune: "
                             "{epochs: N}")
        return self


def prunable_weights(model: nn.Module, ignore: list[str] = ()) -> dict[str, nn.Parameter]:
    """Weights of matrix-like layers (Conv, Linear, ...): any ``weight`` parameter with dim >= 2."""
    names = {name for name, _ in model.named_modules()}
    unknown = [n for n in ignore if n not in names]
    if unknown:
        raise UnsupportedError(f"ignore: no module named {unknown[0]!r} in the model "
                               f"(names look like {sorted(names - {''})[:3]})")
    found = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if name in ignore or not isinstance(weight, nn.Parameter) or weight.dim() < 2:
            continue
        found[name] = weight
    if not found:
        raise UnsupportedError("no prunable weights (Conv/Linear-like layers) left to prune")
    return found


def magnitude_masks(weights: dict[str, torch.Tensor], sparsity: float, scope: str) -> Masks:
    """Boolean keep-masks that zero exactly round(sparsity * n) smallest-|w| entries."""
    if scope == "layer":
        return {name: _keep_largest(w.detach().abs().flatten(), sparsity).view_as(w)
                for name, w in weights.items()}
    flat = torch.cat([w.detach().abs().flatten() for w in weights.values()])
    keep = _keep_largest(flat, sparsity)
    masks, start = {}, 0
    for name, w in weights.items():
        masks[name] = keep[start : start + w.numel()].view_as(w)
        start += w.numel()
    return masks


def _keep_largest(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    n_prune = int(round(sparsity * scores.numel()))
    keep = torch.ones_like(scores, dtype=torch.bool)
    if n_prune:
        # stable sort makes ties deterministic
        order = torch.sort(scores, stable=True).indices
        keep[order[:n_prune]] = False
    return keep


def apply_masks(weights: dict[str, nn.Parameter], masks: Masks) -> None:
    with torch.no_grad():
        for name, w in weights.items():
            w.mul_(masks[name])


def agp_sparsity(final: float, progress: float, initial: float = 0.0) -> float:
    """Zhu & Gupta (2017) cubic schedule: s_t = s_f + (s_i - s_f)(1 - t)^3, t in [0, 1]."""
    t = min(max(progress, 0.0), 1.0)
    return final + (initial - final) * (1.0 - t) ** 3


class _MaskKeeper(Callback):
    """Keeps pruned weights at zero while fine-tuning; with AGP also raises sparsity over time."""

    def __init__(self, weights, masks, config: MagnitudePruneConfig, prune_steps: int = 10):
        self.weights, self.masks, self.config = weights, masks, config
        self.prune_steps = prune_steps
        self.total = 1

    def on_train_begin(self, model, optimizer, total_steps):
        self.total = max(total_steps, 1)

    def on_step_end(self, model, step, total_steps):
        if self.config.schedule == "agp":
            # prune during the first 3/4 of fine-tuning, then let the network recover
            span = max(int(self.total * 0.75), 1)
            every = max(span // self.prune_steps, 1)
            if step <= span and step % every == 0:
                target = agp_sparsity(self.config.sparsity, step / span)
                self.masks = magnitude_masks(self.weights, target, self.config.scope)
        apply_masks(self.weights, self.masks)


def prune_magnitude_(
    model: nn.Module, config: MagnitudePruneConfig, ctx: StepContext | None = None
) -> nn.Module:
    """Library call: prune ``model`` in place; fine-tunes through ``ctx`` when configured."""
    weights = prunable_weights(model, config.ignore)
    first = config.sparsity if config.schedule == "oneshot" else agp_sparsity(config.sparsity, 0.0)
    masks = magnitude_masks(weights, first, config.scope)
    apply_masks(weights, masks)
    if ctx is not None and config.finetune is not None:
        keeper = _MaskKeeper(weights, masks, config)
        ctx.finetune(model, config.finetune, callbacks=[keeper])
        masks = keeper.masks
    if config.schedule == "agp":  # the schedule ends at the target; make it exact
        masks = magnitude_masks(weights, config.sparsity, config.scope)
    apply_masks(weights, masks)
    return model


@register_step("prune.magnitude", MagnitudePruneConfig)
def prune_magnitude(model: nn.Module, config: MagnitudePruneConfig, ctx: StepContext) -> nn.Module:
    """Zero the smallest-magnitude weights (global or per layer, one-shot or gradual AGP)."""
    prune_magnitude_(model, config, ctx)
    zeros = sum(int((w == 0).sum()) for w in prunable_weights(model, config.ignore).values())
    total = sum(w.numel() for w in prunable_weights(model, config.ignore).values())
    ctx.note(f"prune.magnitude: {zeros / total:.1%} of prunable weights are zero "
             f"(stored sparsely; dense runtimes still execute every MAC)")
    return model
