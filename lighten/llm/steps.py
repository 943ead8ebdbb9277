"""The LLM steps, each calibrated block by block (:mod:`lighten.llm.blockwise`):

* ``llm.weight_only``: 4/3-bit group-wise weights, ``method: rtn | gptq | awq``, packed in the
  artifact (:class:`~lighten.quant.weight_only.WeightOnlyLinear`, AWQ's
  :class:`~lighten.llm.awq.AWQLinear`); activations stay float;
* ``llm.smoothquant``: W8A8, smoothed int8 weights and dynamic int8 activations (per token);
* ``llm.sparsegpt`` / ``llm.wanda``: 50% unstructured or N:M (2:4) sparsity.

Only the Linear layers inside the model's block stack are changed: embeddings and the LM head
(often tied to the embeddings) stay float, as in the reference implementations. Each layer's
report row has ``score``: its relative output error ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` on the
calibration inputs it saw. ``ctx.summary`` has the calibration's peak resident memory.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from lighten.errors import DataError
from lighten.llm.awq import AWQLinear, search_clip, search_scale
from lighten.llm.blockwise import BlockwiseResult, LayerInputs, calibrate_blockwise, find_blocks
from lighten.llm.rtn import rtn, search_range
from lighten.llm.smoothquant import SmoothQuantLinear
from lighten.llm.sparsegpt import sparsegpt_prune
from lighten.llm.wanda import wanda_mask
from lighten.modules import require_modules
from lighten.registry import register_step
from lighten.step import PruneStepConfig, StepConfig, StepContext
from lighten.training import pruned_mask


class _Calibrated(StepConfig):
    calib_samples: int = Field(32, ge=1, description="calibration sequences (training windows)")
    batch_size: int = Field(8, ge=1, description="sequences per calibration forward")
    ignore: list[str] = Field(default_factory=list, description="Linear layers left alone")


class LLMWeightOnlyConfig(_Calibrated):
    """Group-wise low-bit LLM weights (RTN, GPTQ or AWQ), float activations."""

    bits: int = Field(4, ge=2, le=8, description="weight bits (int8 containers, packed)")
    group_size: int = Field(128, ge=1, description="input columns per scale and zero point")
    symmetric: bool = Field(False, description="zero point 0 (default: one per group)")
    method: Literal["rtn", "gptq", "awq"] = "gptq"
    act_order: bool = Field(True, description="gptq: quantize columns by decreasing Hessian "
                                              "diagonal (static groups)")
    clip: bool = Field(True, description="awq: search each group's clipping range too")
    mse_range: bool = Field(False, description="rtn / gptq act_order: shrink each group's "
                            "range where that lowers its (Hessian-weighted) error; off: on "
                            "SmolLM2 data-free RTN it cut weight error 14% but raised "
                            "perplexity +21% -> +35% (clipped outliers matter)")
    damp: float = Field(0.01, gt=0, le=1, description="gptq: Hessian damping x mean diagonal")
    awq_rows: int = Field(512, ge=16, description="awq: input rows (tokens) each scale search "
                                                  "is scored on")


class LLMSmoothQuantConfig(_Calibrated):
    """SmoothQuant W8A8: smoothed int8 weights, dynamic int8 activations (per token)."""

    alpha: float = Field(0.5, ge=0, le=1, description="migration strength: 0 = none, 1 = all "
                                                      "of the activation range into weights")
    activations: Literal["token", "tensor"] = Field(
        "token", description="int8 activation scales: one per token (row, symmetric; the W8A8 "
        "LLM standard) or one per tensor (uint8, ONNX DynamicQuantizeLinear)")
    reduce_range: bool | None = Field(None, description="7-bit weights against U8S8 overflow; "
                                      "None = auto (target x86 without VNNI)")


class _SparseConfig(PruneStepConfig):
    sparsity: float = Field(0.5, gt=0, lt=1, description="fraction of each layer's weights "
                                                         "zeroed (unstructured)")
    n: int | None = Field(None, ge=1, description="N:M: zero n of every m consecutive inputs")
    m: int | None = Field(None, ge=2, description="N:M group size (2:4: n 2, m 4)")
    calib_samples: int = Field(32, ge=1, description="calibration sequences (training windows)")
    batch_size: int = Field(8, ge=1, description="sequences per calibration forward")
    ignore: list[str] = Field(default_factory=list, description="Linear layers left alone")

    @model_validator(mode="after")
    def _nm(self):
        if (self.n is None) != (self.m is None):
            raise ValueError("N:M sparsity needs both n and m (2:4: n: 2, m: 4)")
        if self.n is not None and self.n >= self.m:
            raise ValueError(f"n ({self.n}) must be below m ({self.m})")
        if self.n is not None and "sparsity" in self.model_fields_set:
            raise ValueError("give either sparsity or n and m, not both")
        return self

    @property
    def pattern(self) -> str:
        return f"{self.n}:{self.m}" if self.n is not None else f"{self.sparsity:.0%}"


class LLMSparseGPTConfig(_SparseConfig):
    """SparseGPT: OBS pruning with a weight update, column block by block."""

    block: int = Field(128, ge=1, description="columns per mask-selection block")
    damp: float = Field(0.01, gt=0, le=1, description="Hessian damping x mean diagonal")


class LLMWandaConfig(_SparseConfig):
    """Wanda: prune by |weight| x input norm per output row, no update."""


# ----------------------------------------------------------------------------- helpers


def relative_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)``: the layer's output error on its calibration inputs."""
    w, d, h = weight.double(), (weight - approx).double(), hessian.double()
    base = float(((w @ h) * w).sum())
    return float(((d @ h) * d).sum()) / base if base > 0 else 0.0


def _check_ignore(model: nn.Module, ignore: list[str]) -> None:
    require_modules(model, ignore, key="ignore")


def _unfuse(model: nn.Module, ignore: list[str], ctx: StepContext) -> None:
    """PyTorch's fused transformer layers read their Linears' ``.weight`` directly (the fast
    path), which a quantized replacement no longer has: their unfused forms first, as the
    quant.* steps do."""
    from lighten.quant.eligibility import unfuse_stock_blocks

    _check_ignore(model, ignore)
    notes: list[str] = []
    unfuse_stock_blocks(model, notes, ignore)
    for note in notes:
        ctx.note(note)


def _materialize(batches: Iterable | None) -> list:
    out = list(batches or ())
    if not out:
        raise DataError("the llm.* steps (except llm.weight_only method: rtn) need calibration "
                        "inputs; give data with training text")
    return out


def _summary(result: BlockwiseResult) -> dict:
    return {"blocks": result.blocks, "layers_changed": len(result.layers),
            "calib_seconds": round(result.seconds, 2),
            "calib_peak_rss_mb": None if result.peak_rss_mb is None else round(
                result.peak_rss_mb, 1),
            "calib_extra_rss_mb": None if result.extra_mb is None else round(result.extra_mb, 1)}


def _keep_pruned(q: torch.Tensor, zero: torch.Tensor, mask: torch.Tensor | None,
                 group_size: int) -> torch.Tensor:
    """Pruned weights (a sparse model being quantized) get their group's zero point: 0."""
    if mask is None:
        return q
    codes = zero.repeat_interleave(group_size, dim=1)[:, : q.shape[1]].to(q.dtype)
    return torch.where(mask, q, codes)


# ----------------------------------------------------------------------------- weight-only


def quantize_llm_(model: nn.Module, config: LLMWeightOnlyConfig | None = None,
                  calibration_batches: Iterable | None = None, *, rows: list | None = None,
                  progress: bool = False) -> BlockwiseResult:
    """Quantize the Linears of ``model``'s blocks in place; ``rows`` receives a report row
    per layer. RTN needs no data (and runs no calibration)."""
    from lighten.quant.gptq import gptq_quantize
    from lighten.quant.weight_only import WeightOnlyLinear, make_grid

    cfg = config or LLMWeightOnlyConfig()
    _check_ignore(model, cfg.ignore)
    rows = rows if rows is not None else []
    scales: dict[str, torch.Tensor] = {}

    def prepare(prefix: str, block: nn.Module, stats: dict[str, LayerInputs]) -> None:
        if cfg.method != "awq":
            return
        groups: list[list[str]] = []
        for name, s in stats.items():  # layers reading one input tensor share one search
            group = next((g for g in groups if torch.equal(stats[g[0]].sample, s.sample)), None)
            group.append(name) if group is not None else groups.append([name])
        for group in groups:
            first = stats[group[0]]
            weights = [block.get_submodule(n).weight.detach() for n in group]
            s, _ = search_scale(weights, first.sample, first.absmean, bits=cfg.bits,
                                group_size=min(cfg.group_size, weights[0].shape[1]),
                                symmetric=cfg.symmetric)
            for n in group:
                scales[f"{prefix}.{n}"] = s

    def compress(name: str, linear: nn.Linear, stats: LayerInputs | None) -> nn.Module:
        w = linear.weight.detach().float()
        gs = min(cfg.group_size, w.shape[1])
        grid = {"bits": cfg.bits, "group_size": gs, "symmetric": cfg.symmetric}
        input_scale = None
        if cfg.method == "gptq" and cfg.act_order:
            from lighten.llm.gptq_order import gptq_act_order

            h = stats.hessian
            clip = search_range(w, torch.diagonal(h), **grid) if cfg.mse_range else None
            q, scale, zero = gptq_act_order(w, h, damp=cfg.damp, clip=clip, **grid)
        elif cfg.method == "gptq":
            q, scale, zero = gptq_quantize(w, stats.hessian, group_size=gs, damp=cfg.damp,
                                           grid=make_grid(cfg.bits, cfg.symmetric))
        elif cfg.method == "awq":
            s = scales[name]
            ws = w * s[None, :]
            x = stats.sample[:256] / s[None, :]
            clip = search_clip(ws, x, **grid) if cfg.clip else None
            q, scale, zero = rtn(ws, clip=clip, **grid)
            input_scale = 1 / s
        else:
            clip = search_range(w, None if stats is None else torch.diagonal(stats.hessian),
                                **grid) if cfg.mse_range else None
            q, scale, zero = rtn(w, clip=clip, **grid)
        q = _keep_pruned(q, zero, pruned_mask(w), gs)
        cls = AWQLinear if input_scale is not None else WeightOnlyLinear
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  bits=cfg.bits, group_size=cfg.group_size, symmetric=cfg.symmetric)
        new.set_quantized(q, scale, zero)
        if input_scale is not None:
            new.input_scale.copy_(input_scale)
        if linear.bias is not None:
            new.bias.data.copy_(linear.bias.detach())
        row = {"module": name, "action": "quantize", "before": "float32",
               "after": f"w{cfg.bits} g{gs} {cfg.method}", "weight_bits": cfg.bits,
               "activation_bits": None, "group_size": gs, "granularity": "group"}
        if stats is not None:
            approx = new.dequantized_weight().detach()
            if input_scale is not None:
                approx = approx * input_scale[None, :]
            row["score"] = relative_error(w, approx, stats.hessian)
        rows.append(row)
        return new

    if cfg.method == "rtn":  # data-free: no calibration pass
        stack, blocks = find_blocks(model)
        result = BlockwiseResult(blocks=len(blocks))
        for i, block in enumerate(blocks):
            for n, m in list(block.named_modules()):
                full = f"{stack}.{i}.{n}"
                if isinstance(m, nn.Linear) and full not in cfg.ignore:
                    block.set_submodule(n, compress(full, m, None))
                    result.layers.append(full)
        return result
    return calibrate_blockwise(model, _materialize(calibration_batches), compress,
                               hessian=True, rows=cfg.awq_rows if cfg.method == "awq" else 0,
                               ignore=cfg.ignore, prepare=prepare, progress=progress)


def _record(ctx: StepContext, rows: list[dict], result: BlockwiseResult, headline: str) -> None:
    for row in rows:
        ctx.layer(**row)
    ctx.summary.update(_summary(result))
    memory = (f"; calibration peak memory {result.peak_rss_mb:.0f} MiB resident "
              f"(+{result.extra_mb:.0f} MiB over the start)"
              if result.peak_rss_mb is not None else "")
    how = "calibrated one block at a time" if result.peak_rss_mb is not None else "no data"
    ctx.note(f"{headline}: {len(result.layers)} Linear layers in {result.blocks} blocks, "
             f"{how}{memory}; embeddings and the LM head stay float")


@register_step("llm.weight_only", LLMWeightOnlyConfig, quantizes=True,
               needs_data=lambda c: None if c.method == "rtn" else "calibration inputs")
def llm_weight_only(model: nn.Module, cfg: LLMWeightOnlyConfig, ctx: StepContext) -> nn.Module:
    """LLM weights at 4/3 bits, group-wise (RTN, GPTQ with act_order, AWQ), packed."""
    batches = None if cfg.method == "rtn" else ctx.calibration_batches(cfg.calib_samples,
                                                                        cfg.batch_size)
    rows: list[dict] = []
    _unfuse(model, cfg.ignore, ctx)
    result = quantize_llm_(model, cfg, batches, rows=rows, progress=ctx.progress)
    _record(ctx, rows, result, f"llm.weight_only {cfg.method} w{cfg.bits} g{cfg.group_size}")
    ctx.finetune(model, cfg.finetune)
    return model


# ----------------------------------------------------------------------------- smoothquant


def smoothquant_(model: nn.Module, config: LLMSmoothQuantConfig | None = None,
                 calibration_batches: Iterable | None = None, *, reduce_range: bool = False,
                 rows: list | None = None, progress: bool = False) -> BlockwiseResult:
    """Replace the Linears of ``model``'s blocks by :class:`SmoothQuantLinear` in place."""
    cfg = config or LLMSmoothQuantConfig()
    _check_ignore(model, cfg.ignore)
    rows = rows if rows is not None else []

    def compress(name: str, linear: nn.Linear, stats: LayerInputs) -> nn.Module:
        new = SmoothQuantLinear.smoothed(linear, stats.absmax, alpha=cfg.alpha,
                                         reduce_range=reduce_range,
                                         activations=cfg.activations)
        approx = new.dequantized_weight() * new.input_scale[None, :]
        rows.append({"module": name, "action": "quantize", "before": "float32",
                     "after": f"w8a8 smoothquant a={cfg.alpha} per-{cfg.activations}",
                     "weight_bits": 8,
                     "activation_bits": 8, "granularity": "channel",
                     "score": relative_error(linear.weight.detach().float(), approx,
                                             stats.hessian)})
        return new

    return calibrate_blockwise(model, _materialize(calibration_batches), compress, hessian=True,
                               ignore=cfg.ignore, progress=progress)


@register_step("llm.smoothquant", LLMSmoothQuantConfig, quantizes=True,
               needs_data=lambda c: "calibration inputs")
def llm_smoothquant(model: nn.Module, cfg: LLMSmoothQuantConfig, ctx: StepContext) -> nn.Module:
    """SmoothQuant W8A8 for LLM blocks: smoothed int8 weights, dynamic uint8 activations."""
    reduce_range = ctx.target.reduce_range if cfg.reduce_range is None else cfg.reduce_range
    rows: list[dict] = []
    _unfuse(model, cfg.ignore, ctx)
    result = smoothquant_(model, cfg, ctx.calibration_batches(cfg.calib_samples, cfg.batch_size),
                          reduce_range=reduce_range, rows=rows, progress=ctx.progress)
    _record(ctx, rows, result, f"llm.smoothquant alpha {cfg.alpha}"
            + (" (7-bit weights: target without VNNI)" if reduce_range else ""))
    ctx.finetune(model, cfg.finetune)
    return model


# ----------------------------------------------------------------------------- sparsity


def sparsify_llm_(model: nn.Module, config: LLMSparseGPTConfig | LLMWandaConfig,
                  calibration_batches: Iterable, *, rows: list | None = None,
                  progress: bool = False) -> BlockwiseResult:
    """Prune the Linears of ``model``'s blocks in place (SparseGPT or Wanda by config type)."""
    cfg = config
    _check_ignore(model, cfg.ignore)
    rows = rows if rows is not None else []
    sparsegpt = isinstance(cfg, LLMSparseGPTConfig)

    def compress(name: str, linear: nn.Linear, stats: LayerInputs) -> nn.Module:
        w = linear.weight.detach().float()
        h = stats.hessian
        if sparsegpt:
            new = sparsegpt_prune(w, h, sparsity=cfg.sparsity, n=cfg.n, m=cfg.m,
                                  block=cfg.block, damp=cfg.damp)
        else:  # ||X_j||² is the Hessian's diagonal up to the factor 2/n
            norms = torch.diagonal(stats.xtx).sqrt()
            new = w * wanda_mask(w, norms, sparsity=cfg.sparsity, n=cfg.n, m=cfg.m)
        linear.weight.data.copy_(new)
        zeros = float((new == 0).double().mean())
        rows.append({"module": name, "action": "N:M" if cfg.n else "sparsify",
                     "before": "dense", "after": f"{zeros:.0%} zeros", "sparsity": zeros,
                     "score": relative_error(w, new, h)})
        return linear

    return calibrate_blockwise(model, _materialize(calibration_batches), compress, hessian=True,
                               ignore=cfg.ignore, progress=progress)


def _sparse_step(name: str, doc: str):
    def step(model: nn.Module, cfg, ctx: StepContext) -> nn.Module:
        rows: list[dict] = []
        result = sparsify_llm_(model, cfg, ctx.calibration_batches(cfg.calib_samples,
                                                                   cfg.batch_size),
                               rows=rows, progress=ctx.progress)
        _record(ctx, rows, result, f"{name} {cfg.pattern}")
        return ctx.finetune(model, cfg.finetune)

    step.__doc__ = doc
    return step


llm_sparsegpt = register_step("llm.sparsegpt", LLMSparseGPTConfig,
                              needs_data=lambda c: "calibration inputs")(_sparse_step(
    "llm.sparsegpt", "SparseGPT for LLM blocks: 50% or N:M sparsity with a weight update."))
llm_wanda = register_step("llm.wanda", LLMWandaConfig,
                          needs_data=lambda c: "calibration inputs")(_sparse_step(
    "llm.wanda", "Wanda for LLM blocks: |weight| x input norm, 50% or N:M, no update."))
