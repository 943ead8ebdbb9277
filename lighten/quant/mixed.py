"""``quant.mixed``: per-layer weight bits chosen from measured sensitivity under a byte budget.

1. Measure: for every quantizable layer and candidate width, how much the model output changes
   when only that layer's weights are quantized (``sqnr``), or the HAWQ-v2 estimate
   ``mean Tr(H) * ||Q(W) - W||^2`` with a Hutchinson trace of the Hessian of the output error
   (``hessian``; no labels needed).
2. Choose: a multiple-choice knapsack over layers (exact Pareto-front dynamic programming) picks
   the widths with the least total sensitivity whose weight bytes fit the budget.
3. Apply: PTQ with those per-layer weight widths and 8-bit activations.

Bytes are weight bytes only (``numel * bits / 8``), the part the artifact packs at its bit width.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from lighten.errors import UnsupportedError
from lighten.quant.modules import weight_spec
from lighten.quant.ptq import (
    PTQConfig,
    _candidates,
    fold_with_notes,
    quantize_ptq_,
)
from lighten.quant.quantizer import fake_quantize, weight_qparams
from lighten.registry import register_step
from lighten.step import StepConfig, StepContext
from lighten.target import Target
from lighten.task import Inputs, batch_inputs

_FRONT_CAP = 20000  # Pareto states kept per layer; beyond it states are bucketed by cost


class MixedConfig(StepConfig):
    """Mixed-precision weights: the least sensitive layers get the fewest bits."""

    budget_bytes: float = Field(
        gt=0, allow_inf_nan=False, description="weight bytes allowed: a fraction (<= 1) of "
        "the float32 weight bytes (uniform 4-bit = 0.125), or a whole number of bytes (> 1)")
    candidates: list[int] = Field(default_factory=lambda: [2, 4, 8], min_length=1)
    metric: Literal["sqnr", "hessian"] = "sqnr"
    per_channel: bool = True
    calibration: Literal["minmax", "moving_average", "percentile", "mse", "entropy"] = "minmax"
    calib_samples: int = Field(512, ge=1)
    ignore: list[str] = Field(default_factory=list, description="module names left in float")

    @field_validator("budget_bytes")
    @classmethod
    def _fraction_or_bytes(cls, v: float) -> float:
        if v > 1 and v != int(v):
            raise ValueError(f"budget_bytes {v} is neither a fraction (<= 1) of the float weight "
                             "bytes nor a whole number of bytes; e.g. 0.15 or 20000")
        return v

    def budget_for(self, float_bytes: int) -> int:
        """The budget in bytes for weights that take ``float_bytes`` in float32."""
        return int(self.budget_bytes * float_bytes if self.budget_bytes <= 1
                   else self.budget_bytes)

    @field_validator("candidates")
    @classmethod
    def _bits_in_range(cls, v: list[int]) -> list[int]:
        bad = [b for b in v if not 2 <= b <= 8]
        if bad:
            raise ValueError(f"candidate bit width {bad[0]} is not supported; use 2..8")
        return sorted(set(v))


def weight_bytes(numel: int, bits: int) -> int:
    return math.ceil(numel * bits / 8)


def _quantized_weight(weight: torch.Tensor, bits: int, per_channel: bool,
                      target: Target | None) -> torch.Tensor:
    spec = weight_spec(bits, per_channel=per_channel,
                       reduce_range=(target or Target.this_machine()).reduce_range and bits == 8)
    scale, zp = weight_qparams(weight, spec)
    return fake_quantize(weight.detach().float(), scale, zp, spec)


@torch.no_grad()
def output_error_sensitivity(model: nn.Module, layers: Sequence[str], inputs: list[torch.Tensor],
                             candidates: Sequence[int], *, per_channel: bool = True,
                             target: Target | None = None) -> dict[str, dict[int, float]]:
    """Relative output error (noise power / signal power) with one layer quantized at a time.

    ``inputs``: calibration batches (a tensor, or ``Inputs`` for a model with several inputs)."""
    return layer_output_error(
        model, layers, inputs, candidates,
        lambda original, bits: _quantized_weight(original, bits, per_channel, target))


@torch.no_grad()
def layer_output_error(model: nn.Module, layers: Sequence[str], inputs: list[torch.Tensor],
                       candidates: Sequence[int], replace) -> dict[str, dict[int, float]]:
    """``{layer: {candidate: noise power / signal power}}`` of the model's outputs with one
    layer's weight at a time swapped for ``replace(original_weight, candidate)`` (restored
    after): the measured sensitivity behind ``quant.mixed`` and ``share.kmeans: {bits: auto}``."""
    model.eval()
    args = [batch_inputs(x) for x in inputs]
    reference = [model(*a) for a in args]
    signal = sum(float(r.pow(2).sum()) for r in reference) or 1.0
    out: dict[str, dict[int, float]] = {}
    for name in layers:
        weight = model.get_submodule(name).weight
        original = weight.detach().clone()
        out[name] = {}
        try:
            for candidate in candidates:
                weight.copy_(replace(original, candidate))
                noise = sum(float((model(*a) - r).pow(2).sum())
                            for a, r in zip(args, reference, strict=True))
                out[name][candidate] = noise / signal
        finally:
            weight.copy_(original)
    return out


def hessian_sensitivity(model: nn.Module, layers: Sequence[str], inputs: list[torch.Tensor],
                        candidates: Sequence[int], *, per_channel: bool = True, probes: int = 8,
                        seed: int = 0, target: Target | None = None
                        ) -> dict[str, dict[int, float]]:
    """HAWQ-v2: ``Tr(H) / n * ||Q(W) - W||^2`` for the loss ``||f(x; W) - f(x; W0)||^2``.

    At ``W0`` that loss has zero gradient and its Hessian is the Gauss-Newton matrix ``2 J^T J``,
    so the trace needs no labels. Hutchinson: ``Tr(H) = E[v^T H v]`` over Rademacher ``v``.
    """
    model.eval()
    weights = [model.get_submodule(n).weight for n in layers]
    gen = torch.Generator().manual_seed(seed)
    traces = [0.0] * len(layers)
    for x in inputs:
        a = batch_inputs(x)  # model(*a): one tensor, or several inputs
        with torch.no_grad():
            reference = model(*a)
        loss = (model(*a) - reference).pow(2).sum() / len(inputs)
        grads = torch.autograd.grad(loss, weights, create_graph=True, allow_unused=True)
        used = [i for i, g in enumerate(grads) if g is not None]  # unreached layers: trace 0
        for _ in range(probes):
            vs = [torch.randint(0, 2, weights[i].shape, generator=gen).float() * 2 - 1
                  for i in used]
            hvs = torch.autograd.grad([grads[i] for i in used], [weights[i] for i in used],
                                      grad_outputs=vs, retain_graph=True, allow_unused=True)
            for i, v, hv in zip(used, vs, hvs, strict=True):
                if hv is not None:
                    traces[i] += float((v * hv).sum()) / probes
    out: dict[str, dict[int, float]] = {}
    for name, w, trace in zip(layers, weights, traces, strict=True):
        mean_trace = trace / w.numel()
        out[name] = {b: mean_trace * float((_quantized_weight(w, b, per_channel, target)
                                            - w.detach()).pow(2).sum()) for b in candidates}
    return out


def choose_bits(sensitivity: dict[str, dict[int, float]], numels: dict[str, int],
                budget: int) -> dict[str, int]:
    """Bits per layer with the least total sensitivity whose weight bytes are <= ``budget``.

    Exact multiple-choice knapsack on the Pareto front of (bytes, error) partial assignments.
    """
    names = list(sensitivity)
    least = sum(weight_bytes(numels[n], min(sensitivity[n])) for n in names)
    if least > budget:
        raise UnsupportedError(f"budget of {budget} weight bytes is below the smallest possible "
                               f"({least} bytes with every layer at {min(sensitivity[names[0]])} "
                               "bits); raise budget_bytes or add a smaller candidate")
    front: list[tuple[int, float, tuple[int, ...]]] = [(0, 0.0, ())]
    for name in names:
        options = [(weight_bytes(numels[name], b), err, b) for b, err in sensitivity[name].items()]
        grown = [(c + oc, e + oe, bits + (b,)) for c, e, bits in front for oc, oe, b in options
                 if c + oc <= budget]
        front = _pareto(grown)
    best = min(front, key=lambda s: (s[1], s[0]))
    return dict(zip(names, best[2], strict=True))


def _pareto(states):
    """Keep states no other state beats in both bytes and error (thinned past _FRONT_CAP)."""
    states.sort(key=lambda s: (s[0], s[1]))
    front, best_err = [], math.inf
    for s in states:
        if s[1] < best_err:
            front.append(s)
            best_err = s[1]
    if len(front) > _FRONT_CAP:  # keep evenly spaced states along the front (and its end)
        step = len(front) / _FRONT_CAP
        front = [front[int(i * step)] for i in range(_FRONT_CAP)] + [front[-1]]
    return front


_METRICS: dict[str, Callable[..., dict[str, dict[int, float]]]] = {
    "sqnr": output_error_sensitivity, "hessian": hessian_sensitivity}


def quantize_mixed_(model: nn.Module, calibration_batches, config: MixedConfig, *,
                    notes: list[str] | None = None, target: Target | None = None
                    ) -> tuple[nn.Module, dict[str, int]]:
    """Measure, choose, quantize ``model`` in place; return it with the chosen bits per layer
    (``target``, default this machine, decides whether 8-bit weights keep to 7 bits)."""
    notes = notes if notes is not None else []
    model.eval()
    fold_with_notes(model, notes)  # sensitivities must be measured on the folded weights
    inputs = [Inputs(batch_inputs(b)) for b in calibration_batches]  # model(*b) for each
    layers = _candidates(model, config.ignore, notes)
    if not layers:
        raise UnsupportedError("quant.mixed found no Conv1d/2d/3d or Linear layers to quantize")
    numels = {n: model.get_submodule(n).weight.numel() for n in layers}
    budget = config.budget_for(4 * sum(numels.values()))
    sens = _METRICS[config.metric](model, layers, inputs, config.candidates,
                                   per_channel=config.per_channel, target=target)
    bits = choose_bits(sens, numels, budget)
    ptq = PTQConfig(bits=8, per_channel=config.per_channel, calibration=config.calibration,
                    ignore=config.ignore)
    quantize_ptq_(model, inputs, ptq, notes=notes, weight_bits=bits, target=target)
    used = sum(weight_bytes(numels[n], b) for n, b in bits.items())
    notes.append(f"quant.mixed ({config.metric}): {used} of {budget} budget weight bytes "
                 f"({used / (4 * sum(numels.values())):.3f} of float); bits "
                 + ", ".join(f"{n}={b}" for n, b in bits.items()))
    return model, bits


@register_step("quant.mixed", MixedConfig, needs_data=lambda c: "calibration inputs",
               quantizes=True)
def quantize_mixed(model: nn.Module, cfg: MixedConfig, ctx: StepContext) -> nn.Module:
    """Per-layer weight bits from measured sensitivity under a byte budget; 8-bit activations."""
    from lighten.verb import module_types, record_quant_layers

    before = module_types(model)
    notes: list[str] = []
    quantize_mixed_(model, ctx.calibration_batches(cfg.calib_samples), cfg, notes=notes,
                    target=ctx.target)
    for message in notes:
        ctx.note(message)
    record_quant_layers(ctx, before, model, notes, ignore=getattr(cfg, "ignore", ()))
    return ctx.finetune(model, cfg.finetune)
