"""L1-regularized sparse training, then thresholding.

Fine-tuning adds ``lam * sum(|theta|)`` to the loss, which pushes unimportant parameters towards
zero; afterwards the smallest ones are set to exactly zero. ``target: weights`` penalizes the
Conv/Linear weights and zeroes the smallest of them (unstructured). ``target: bn`` is network
slimming (Liu et al. 2017): the penalty is on BatchNorm scales, and the channels with the smallest
scales are zeroed (scale and shift both, so the channel outputs zero exactly as if it were removed).
Zeroing is all this step does: physically removing those channels is ``prune.channels``' job.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from lighten.errors import UnsupportedError
from lighten.modules import require_modules
from lighten.prune.magnitude import (
    Masks,
    apply_masks,
    magnitude_masks,
    prunable_weights,
)
from lighten.registry import register_step
from lighten.step import PruneStepConfig, StepContext

__all__ = ["L1PruneConfig", "bn_scales", "l1_penalty", "prune_l1_"]


class L1PruneConfig(PruneStepConfig):
    lam: float = Field(ge=0, description="strength of the L1 penalty (0 = plain fine-tuning)")
    target: Literal["weights", "bn"] = "weights"
    sparsity: float | None = Field(None, gt=0, lt=1, description="fraction zeroed at the end")
    threshold: float | None = Field(None, ge=0, description="zero |value| below this instead")
    ignore: list[str] = Field(default_factory=list, description="module names left alone")

    @model_validator(mode="after")
    def _check(self):
        if self.finetune is None or self.finetune.epochs == 0:
            raise ValueError("prune.l1 applies its penalty while fine-tuning; add finetune: "
                             "{epochs: N}")
        if (self.sparsity is None) == (self.threshold is None):
            raise ValueError("prune.l1 needs exactly one of sparsity (e.g. 0.5) or threshold "
                             "(e.g. 1.0e-3) for the final thresholding")
        return self


def bn_scales(model: nn.Module, ignore: list[str] = ()) -> dict[str, nn.Parameter]:
    """The affine scale (gamma) of every BatchNorm layer not in ``ignore``."""
    require_modules(model, ignore, key="ignore")
    found = {name: m.weight for name, m in model.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine
             and name not in ignore}
    if not found:
        raise UnsupportedError("target: bn needs BatchNorm layers with affine scales and the "
                               "model has none; use target: weights")
    return found


def l1_penalty(params: dict[str, nn.Parameter], lam: float):
    """A LossTerm: ``lam * sum(|p|)`` over ``params``."""

    def term(model: nn.Module, inputs: Tensor, outputs: Tensor, targets: Tensor) -> Tensor:
        return lam * sum(p.abs().sum() for p in params.values())

    return term


def threshold_masks(params: dict[str, torch.Tensor], config: L1PruneConfig) -> Masks:
    """Global masks: zero the `sparsity` smallest |values|, or those below `threshold`."""
    if config.threshold is not None:
        return {name: p.detach().abs() >= config.threshold for name, p in params.items()}
    return magnitude_masks(params, config.sparsity, "global")


def prune_l1_(model: nn.Module, config: L1PruneConfig, ctx: StepContext) -> nn.Module:
    """Library call: fine-tune with the L1 penalty through ``ctx``, then threshold in place."""
    if config.target == "weights":
        params = prunable_weights(model, config.ignore)
    else:
        params = bn_scales(model, config.ignore)
    terms = [l1_penalty(params, config.lam)] if config.lam > 0 else []
    ctx.finetune(model, config.finetune, loss_terms=terms)
    masks = threshold_masks(params, config)
    apply_masks(params, masks)
    if config.target == "bn":  # a zero scale still outputs the shift; zero it too
        modules = dict(model.named_modules())
        apply_masks({n: modules[n].bias for n in params if modules[n].bias is not None},
                    masks)
    return model


@register_step("prune.l1", L1PruneConfig, needs_data=lambda c: "labelled training data")
def prune_l1(model: nn.Module, config: L1PruneConfig, ctx: StepContext) -> nn.Module:
    """Fine-tune with an L1 penalty on weights or BN scales, then zero the smallest."""
    from lighten.verb import record_sparsity, zero_fractions

    def chosen():
        return (prunable_weights(model, config.ignore) if config.target == "weights"
                else bn_scales(model, config.ignore))

    before = zero_fractions(chosen())
    prune_l1_(model, config, ctx)
    params = chosen()
    record_sparsity(ctx, params, before,
                    action="sparsify" if config.target == "weights" else "zero BN scales")
    zeros = sum(int((p == 0).sum()) for p in params.values())
    total = sum(p.numel() for p in params.values())
    if config.target == "weights":
        ctx.note(f"prune.l1: lam={config.lam:g}, {zeros / total:.1%} of prunable weights are "
                 "zero (stored sparsely)")
    else:
        ctx.note(f"prune.l1: lam={config.lam:g} on BN scales, {zeros}/{total} channels zeroed "
                 "(not removed: use prune.channels with importance bn to shrink the layers)")
    return model
