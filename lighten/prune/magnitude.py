"""Unstructured magnitude pruning: one-shot or gradual (AGP); global, per layer or per-layer ratios.

Pruned weights are set to exactly zero and kept at zero while fine-tuning (the mask is re-applied
after every optimizer step). The artifact stores such tensors sparsely, so bytes drop; MACs and
latency of a dense runtime do not, and the report says so.

Per-layer ratios come from a mapping ``{layer: ratio}`` or, with ``ratios: auto``, from a
sensitivity analysis (:mod:`lighten.prune.sensitivity`) that spends the overall ``sparsity`` where
it costs the least accuracy. ``rewind: true`` is weight rewinding (Frankle et al. 2019): after the
first fine-tuning finds the final mask, every parameter and buffer is reset to its value at the
start of fine-tuning, the mask applied, and the network fine-tuned again with the mask fixed.

Defaults, chosen from measurements (README, ``tests/test_finetune_defaults.py``): the fine-tune
runs at 3x the recipe's train lr with its cosine schedule (``finetune.lr_scale``, every pruning
step); AGP raises sparsity over the first half of the fine-tune (``agp_end: 0.5``) and the second
half recovers; no rewind (with 8 epochs plain AGP matched AGP + rewind over 20). A fine-tune
shorter than :data:`MIN_EPOCHS` for the sparsity (at 95%: 8 epochs AGP, 4 one-shot; at 90%: 4
and 2) adds a warning to the report.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from lighten.errors import UnsupportedError
from lighten.modules import require_modules
from lighten.registry import register_step
from lighten.step import PruneStepConfig, StepContext
from lighten.training import KeepMasks  # the one mask keeper (also used by ctx.finetune)

Masks = dict[str, torch.Tensor]


class MagnitudePruneConfig(PruneStepConfig):
    sparsity: float | None = Field(None, gt=0, lt=1,
                                   description="fraction of prunable weights set to zero")
    scope: Literal["global", "layer"] = "global"
    schedule: Literal["oneshot", "agp"] = "oneshot"
    ignore: list[str] = Field(default_factory=list, description="module names left dense")
    ratios: Literal["auto"] | dict[str, float] | None = Field(
        None, description="per-layer sparsity: 'auto' (from sensitivity) or {layer: ratio}; "
                          "layers not named use `sparsity` (or stay dense without it)")
    auto_samples: int = Field(1000, ge=1, description="ratios: auto evaluates on this many "
                                                      "training samples")
    rewind: bool = Field(False, description="rewind to the start of fine-tuning with the "
                                            "final mask, then fine-tune again")
    agp_end: float = Field(0.5, gt=0, le=1, description="schedule agp: the share of the "
                           "fine-tune over which sparsity rises to its target; the rest recovers")

    @model_validator(mode="after")
    def _check(self):
        if self.sparsity is None and not isinstance(self.ratios, dict):
            raise ValueError("sparsity is required (e.g. sparsity: 0.9) unless ratios maps "
                             "layers to ratios")
        if isinstance(self.ratios, dict):
            bad = {k: v for k, v in self.ratios.items() if not 0 <= v < 1}
            if bad:
                name, value = next(iter(bad.items()))
                raise ValueError(f"ratios: {name}: {value} is not a fraction in [0, 1)")
        if "agp_end" in self.model_fields_set and self.schedule != "agp":
            raise ValueError("agp_end only applies with schedule: agp; set schedule: agp or "
                             "remove agp_end")
        wants_training = self.schedule == "agp" or self.rewind
        if wants_training and (self.finetune is None or self.finetune.epochs == 0):
            what = "schedule 'agp' prunes gradually" if self.schedule == "agp" else \
                "rewind: true re-trains"
            raise ValueError(f"{what} while fine-tuning; add finetune: {{epochs: N}}")
        return self


def prunable_weights(model: nn.Module, ignore: list[str] = ()) -> dict[str, nn.Parameter]:
    """Weights of matrix-like layers (Conv, Linear, ...): any ``weight`` parameter with dim >= 2."""
    require_modules(model, ignore, key="ignore")
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


def layer_masks(weights: dict[str, torch.Tensor], ratios: dict[str, float]) -> Masks:
    """Per-layer keep-masks: layer ``name`` loses exactly round(ratios[name] * n) weights."""
    return {name: _keep_largest(w.detach().abs().flatten(), ratios.get(name, 0.0)).view_as(w)
            for name, w in weights.items()}


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


class _MaskKeeper(KeepMasks):
    """Keeps pruned weights at zero while fine-tuning; with AGP also raises sparsity over time.

    ``mask_at(progress)`` gives the masks for schedule progress in [0, 1] (1 = final target).
    """

    prune_steps = 10  # mask updates over the schedule

    def __init__(self, weights, masks, mask_at: Callable[[float], Masks] | None = None,
                 end_fraction: float = 0.5):
        super().__init__(weights, masks)
        self.mask_at = mask_at
        self.end_fraction = end_fraction  # share of fine-tuning steps the schedule spans
        self.total = 1

    def on_train_begin(self, model, optimizer, total_steps):
        self.total = max(total_steps, 1)

    def on_step_end(self, model, step, total_steps):
        if self.mask_at is not None:
            # prune during the first part of fine-tuning, then let the network recover
            span = max(int(self.total * self.end_fraction), 1)
            every = max(span // self.prune_steps, 1)
            if step <= span and step % every == 0:
                self.masks = self.mask_at(step / span)
        super().on_step_end(model, step, total_steps)


def _mask_schedule(weights, config: MagnitudePruneConfig,
                   ratios: dict[str, float] | None) -> Callable[[float], Masks]:
    """Masks as a function of AGP progress t (one-shot uses t = 1 only)."""
    if ratios is None:
        return lambda t: magnitude_masks(weights, agp_sparsity(config.sparsity, t), config.scope)
    return lambda t: layer_masks(weights, {n: agp_sparsity(r, t) for n, r in ratios.items()})


def resolve_ratios(model: nn.Module, weights: dict[str, nn.Parameter],
                   config: MagnitudePruneConfig,
                   ctx: StepContext | None) -> dict[str, float] | None:
    """Per-layer ratios for every prunable layer, or None for a single `sparsity`."""
    if config.ratios is None:
        return None
    if config.ratios == "auto":
        if ctx is None:
            raise UnsupportedError("ratios: auto needs data for a sensitivity analysis; run it "
                                   "as a recipe step or pass ctx")
        from torch.utils.data import Subset

        from lighten.prune.sensitivity import analyze, derive_ratios

        n = min(config.auto_samples, len(ctx.data.train))
        # the sweep reaches past the target so the derived ratios can average to it
        sweep = sorted({0.3, 0.5, 0.7, 0.9, (1 + config.sparsity) / 2})
        table = analyze(model, Subset(ctx.data.train, range(n)), ratios=sweep,
                        ignore=config.ignore, progress=ctx.progress)
        ratios = derive_ratios(table, config.sparsity)
        ctx.note("prune.magnitude: ratios from sensitivity on "
                 f"{n} training samples: " + ", ".join(f"{k}={v:.2f}" for k, v in ratios.items()))
        return ratios
    unknown = [name for name in config.ratios if name not in weights]
    if unknown:
        raise UnsupportedError(f"ratios: {unknown[0]!r} is not a prunable layer (choose from "
                               f"{sorted(weights)[:4]}); remove it or fix the name")
    default = config.sparsity or 0.0
    return {name: config.ratios.get(name, default) for name in weights}


def prune_magnitude_(
    model: nn.Module, config: MagnitudePruneConfig, ctx: StepContext | None = None
) -> nn.Module:
    """Library call: prune ``model`` in place; fine-tunes through ``ctx`` when configured."""
    weights = prunable_weights(model, config.ignore)
    ratios = resolve_ratios(model, weights, config, ctx)
    mask_at = _mask_schedule(weights, config, ratios)
    start = copy.deepcopy(model.state_dict()) if config.rewind else None
    masks = mask_at(1.0 if config.schedule == "oneshot" else 0.0)
    apply_masks(weights, masks)
    if ctx is not None and config.finetune is not None:
        keeper = _MaskKeeper(weights, masks, mask_at if config.schedule == "agp" else None,
                             end_fraction=config.agp_end)
        ctx.finetune(model, config.finetune, callbacks=[keeper])
        masks = keeper.masks
    if config.schedule == "agp":  # the schedule ends at the target; make it exact
        masks = mask_at(1.0)
    if start is not None and ctx is not None and config.finetune is not None:
        model.load_state_dict(start)  # weight rewinding: same tensors, values at fine-tune start
        apply_masks(weights, masks)
        ctx.finetune(model, config.finetune, callbacks=[KeepMasks(weights, masks)])
    apply_masks(weights, masks)
    return model


@register_step("prune.magnitude", MagnitudePruneConfig,
               needs_data=lambda c: "training samples for ratios: auto" if c.ratios == "auto"
               else None)
def prune_magnitude(model: nn.Module, config: MagnitudePruneConfig, ctx: StepContext) -> nn.Module:
    """Zero the smallest-magnitude weights (global, per layer or per-layer ratios; AGP; rewind)."""
    from lighten.verb import record_sparsity, zero_fractions

    before = zero_fractions(prunable_weights(model, config.ignore))
    if (warning := budget_note(config)) is not None:
        ctx.note(warning)
    prune_magnitude_(model, config, ctx)
    weights = prunable_weights(model, config.ignore)
    for message in sparsity_notes("prune.magnitude", model, weights):
        ctx.note(message)
    record_sparsity(ctx, weights, before)
    return model


# Fine-tune epochs below these, at or above each sparsity, lost ~0.7 points or more on
# LeNet-300-100 / Fashion-MNIST with the default lr (3x train lr), seed 0: at 95% AGP 2 / 4 / 8
# epochs -1.68 / -1.29 / -0.33 (seed 1: -0.51), one-shot 1 / 4 epochs -1.89 / -0.79; at 90% AGP
# 4 epochs -0.45, one-shot 1 epoch -0.72. Checked from the highest sparsity down.
MIN_EPOCHS = ((0.95, {"agp": 8, "oneshot": 4}), (0.9, {"agp": 4, "oneshot": 2}))


def budget_note(config: MagnitudePruneConfig) -> str | None:
    """A warning when the fine-tune is likely too short to recover from ``config.sparsity``
    (None below 0.9, without a single sparsity, or with enough epochs: :data:`MIN_EPOCHS`)."""
    sparsity = config.sparsity
    need = next((epochs[config.schedule] for at, epochs in MIN_EPOCHS
                 if sparsity is not None and sparsity >= at), None)
    have = config.finetune.epochs if config.finetune is not None else 0
    if need is None or have >= need:
        return None
    what = f"{have:g} fine-tune epoch{'' if have == 1 else 's'}" if have else "no fine-tune"
    return (f"prune.magnitude: WARNING {what} is likely too little to recover from "
            f"{sparsity:.0%} sparsity (schedule {config.schedule}); raise finetune: "
            f"{{epochs: {need}}} or more (LeNet-300-100 at 95% AGP lost 1.68 / 1.29 / 0.33 "
            "points with 2 / 4 / 8 epochs)")


# A layer left with fewer non-zeros than this is almost certainly broken (global pruning tends to
# empty small, low-magnitude layers such as a classifier head).
NEAR_EMPTY_DENSITY = 0.02


def sparsity_notes(step: str, model: nn.Module, weights: dict[str, torch.Tensor]) -> list[str]:
    """What the report should say: overall sparsity, its share of ALL weights, emptied layers."""
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    total = sum(w.numel() for w in weights.values())
    everything = sum(p.numel() for p in model.parameters())
    notes = [f"{step}: {zeros / total:.1%} of prunable weights are zero, {zeros / everything:.1%} "
             "of all parameters (stored sparsely; dense runtimes still execute every MAC)"]
    for name, w in weights.items():
        density = float((w != 0).float().mean())
        if density < NEAR_EMPTY_DENSITY:
            notes.append(f"{step}: WARNING {name} keeps only {density:.2%} of its weights; "
                         f"add it to ignore: or use scope: layer")
    return notes
