"""``quant.weight_only``: 2..8-bit weights with group-wise scales; activations stay float.

Each Linear / Conv2d becomes a :class:`WeightOnlyLinear` / :class:`WeightOnlyConv2d` holding
``weight_int`` (int8 container, ``(out, groups, group_size)``), float16 ``weight_scale`` and int8
``weight_zero_point`` per (output channel, group of input columns). The artifact bit-packs the
int8 containers (4-bit values: two per byte), so bytes fall to about ``bits/32`` of float. The
forward dequantizes and runs float; ONNX gets the int8 weight and a per-axis DequantizeLinear.

Rounding: ``rtn`` (nearest) or ``gptq`` (:mod:`lighten.quant.gptq`, error compensation from
calibration data). ``bias_correction`` adds ``(W - Ŵ) E[x]`` to the bias so the mean output
does not drift.

Pruned zeros stay zero: a weight that is exactly 0 in a pruned layer
(:func:`lighten.training.pruned_mask`) gets its group's zero point (dequantized exactly 0) with
every method, and GPTQ / AdaRound compensate only among the kept weights.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn

from lighten.errors import DataError, UnsupportedError
from lighten.layers import weight_only_class
from lighten.modules import register_module_type, require_modules
from lighten.quant.adaround import adaround_quantize, collect_rows
from lighten.quant.eligibility import swappable, unfuse_stock_blocks
from lighten.quant.gptq import InputStats, exact_masked, gptq_quantize, im2col_supported
from lighten.registry import register_step
from lighten.step import StepConfig, StepContext
from lighten.task import Inputs, batch_inputs
from lighten.training import pruned_mask

_MIN_SCALE = 2.0**-14  # smallest normal float16: scales are stored in half precision
_ONNX_FLOAT = 1


class WeightOnlyConfig(StepConfig):
    """Low-bit weights, float activations; round-to-nearest or GPTQ."""

    bits: int = Field(4, ge=2, le=8, description="weight bits (int8 container, packed on disk)")
    group_size: int | None = Field(32, description="input columns per scale; -1/None = per "
                                                   "output channel")
    symmetric: bool = Field(True, description="zero point 0 (else one int zero point per group)")
    method: Literal["rtn", "gptq", "adaround"] = "gptq"
    levels: Literal["uniform", "pow2"] = Field(
        "uniform", description="pow2: ±scale·2^-k and 0 (lighten.quant.nonuniform; rtn only)")
    adaround_iters: int = Field(500, ge=1, description="adaround: optimization steps per layer")
    adaround_reg: float = Field(0.01, ge=0, description="adaround: weight of the rounding "
                                                        "regularizer (lambda)")
    calib_samples: int = Field(512, ge=1, description="training samples for gptq/bias_correction")
    damp: float = Field(0.01, gt=0, le=1, description="gptq: Hessian damping, x mean diagonal")
    bias_correction: bool = False
    ignore: list[str] = Field(default_factory=list, description="module names left in float")

    @field_validator("group_size")
    @classmethod
    def _group(cls, v):
        if v is None or v == -1:
            return None
        if v < 1:
            raise ValueError("group_size must be a positive number of columns, or -1 for one "
                             "group per output channel")
        return v

    @model_validator(mode="after")
    def _adaround_options(self):
        given = sorted(k for k in ("adaround_iters", "adaround_reg")
                       if k in self.model_fields_set)
        if given and self.method != "adaround":
            raise ValueError(f"{', '.join(given)} only apply to method: adaround (method is "
                             f"{self.method}); set method: adaround or remove them")
        return self


# ----------------------------------------------------------------------------- grid math


def int_range(bits: int) -> tuple[int, int]:
    """Signed container range of a ``bits``-bit weight: [-2^(b-1), 2^(b-1)-1]."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def range_grid(lo: torch.Tensor, hi: torch.Tensor, *, bits: int, symmetric: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero_point)`` of the ``bits``-bit grid over ``[lo, hi]`` (``lo <= 0 <= hi``):
    scales rounded to float16 first, so the stored scale is the one the weights used."""
    qmin, qmax = int_range(bits)
    if symmetric:
        scale = torch.maximum(-lo, hi) / qmax
    else:
        scale = (hi - lo) / (qmax - qmin)
    scale = scale.clamp_min(_MIN_SCALE).half().float()
    if symmetric:
        zero = torch.zeros_like(scale, dtype=torch.int32)
    else:
        zero = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax).to(torch.int32)
    return scale, zero


def make_grid(bits: int, symmetric: bool):
    """``grid(block (rows, k)) -> (scale (rows,), zero_point (rows,), qmin, qmax)``.

    The range always contains 0 (exact zeros stay zero). Scales are rounded to float16 first,
    so the stored scale is the one the weights were quantized with.
    """
    qmin, qmax = int_range(bits)

    def grid(block: torch.Tensor):
        lo = block.amin(dim=1).clamp(max=0)
        hi = block.amax(dim=1).clamp(min=0)
        scale, zero = range_grid(lo, hi, bits=bits, symmetric=symmetric)
        return scale, zero, qmin, qmax

    return grid


def rtn_quantize(weight: torch.Tensor, *, group_size: int, grid):
    """Round to nearest, group by group: ``(q (rows, cols), scale, zero_point)``."""
    w = weight.detach().float()
    rows, cols = w.shape
    groups = -(-cols // group_size)
    q = torch.zeros(rows, cols, dtype=torch.int32)
    scales, zeros = torch.zeros(rows, groups), torch.zeros(rows, groups, dtype=torch.int32)
    for g in range(groups):
        block = w[:, g * group_size : (g + 1) * group_size]
        scale, zero, qmin, qmax = grid(block)
        scales[:, g], zeros[:, g] = scale, zero
        q[:, g * group_size : (g + 1) * group_size] = torch.clamp(
            torch.round(block / scale[:, None]) + zero[:, None], qmin, qmax).to(torch.int32)
    return q, scales, zeros


# ----------------------------------------------------------------------------- modules


def from_config(cls, config: dict, *positional: str):
    """``cls(config[p] for p in positional, **the rest)``: ``from_artifact`` of a quantized
    layer whose ``artifact_config`` is its constructor's arguments (also the nested layers of
    lighten.dynamic.any_precision_layers)."""
    c = dict(config)
    args = [c.pop(p) for p in positional]  # popped before **c is read
    return cls(*args, **c)


class _DequantizeGroups(torch.autograd.Function):
    """(int8 (out, G, gs), scale (out, G), zero (out, G)) -> float weight of ``shape``.

    ONNX: a per-axis DequantizeLinear over (out*G, gs) rows, so the file keeps int8 weights.
    """

    @staticmethod
    def forward(ctx, w_int, scale, zero, cols: int, shape: list[int]):
        w = (w_int.float() - zero.float()[..., None]) * scale.float()[..., None]
        return w.reshape(w.shape[0], -1)[:, :cols].reshape(shape)

    @staticmethod
    def symbolic(g, w_int, scale, zero, cols: int, shape: list[int]):
        def const(values):
            return g.op("Constant", value_t=torch.tensor(values, dtype=torch.int64))

        out, groups, size = w_int.type().sizes()
        rows = g.op("Reshape", w_int, const([out * groups, size]))
        s = g.op("Reshape", g.op("Cast", scale, to_i=_ONNX_FLOAT), const([-1]))
        z = g.op("Reshape", zero, const([-1]))
        w = g.op("Reshape", g.op("DequantizeLinear", rows, s, z, axis_i=0),
                 const([out, groups * size]))
        if groups * size != cols:
            w = g.op("Slice", w, const([0]), const([cols]), const([1]))
        return g.op("Reshape", w, const(list(shape)))


class _WeightOnlyLayer(nn.Module):
    """Storage and dequantization shared by the Linear and Conv2d forms."""

    def _init_storage(self, weight_shape, *, bias: bool, bits: int, group_size: int | None,
                      symmetric: bool) -> None:
        self.weight_shape = [int(d) for d in weight_shape]
        out, cols = self.weight_shape[0], 1
        for d in self.weight_shape[1:]:
            cols *= d
        self.cols, self.bits, self.symmetric = cols, bits, symmetric
        self.group_size = group_size
        size = min(group_size or cols, cols)
        groups = -(-cols // size)
        self.register_buffer("weight_int", torch.zeros(out, groups, size, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out, groups, dtype=torch.float16))
        self.register_buffer("weight_zero_point", torch.zeros(out, groups, dtype=torch.int8))
        self.bias = nn.Parameter(torch.zeros(out)) if bias else None

    def unpadded_weight(self) -> torch.Tensor:
        """The stored codes without the padding that fills each row's last group: the
        layer's ``out x cols`` weights (what parameter counts count)."""
        return self.weight_int.reshape(self.weight_int.shape[0], -1)[:, : self.cols]

    @property
    def stored_group_size(self) -> int:
        return self.weight_int.shape[2]

    @torch.no_grad()
    def set_quantized(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        """Store ``q`` (out, cols) with per-(row, group) ``scale`` / ``zero``."""
        out, groups, size = self.weight_int.shape
        padded = torch.zeros(out, groups * size, dtype=torch.int8)
        padded[:, : self.cols] = q.to(torch.int8)
        self.weight_int.copy_(padded.reshape(out, groups, size))
        self.weight_scale.copy_(scale.half())
        self.weight_zero_point.copy_(zero.to(torch.int8))

    def dequantized_weight(self) -> torch.Tensor:
        return _DequantizeGroups.apply(self.weight_int, self.weight_scale,
                                       self.weight_zero_point, self.cols, self.weight_shape)

    def _storage_config(self) -> dict:
        return {"bias": self.bias is not None, "bits": self.bits, "group_size": self.group_size,
                "symmetric": self.symmetric}

    def extra_repr(self) -> str:
        return (f"w{self.bits}, group_size={self.group_size or 'channel'}, "
                f"symmetric={self.symmetric}")


@register_module_type
class WeightOnlyLinear(_WeightOnlyLayer):
    """Linear with low-bit group-quantized weights, dequantized to float on the fly."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, bits: int = 4,
                 group_size: int | None = 32, symmetric: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_storage((out_features, in_features), bias=bias, bits=bits,
                           group_size=group_size, symmetric=symmetric)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(), self.bias)

    @classmethod
    def like(cls, layer: nn.Linear, *, bias: bool, **storage) -> WeightOnlyLinear:
        return cls(layer.in_features, layer.out_features, bias=bias, **storage)

    def artifact_config(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features,
                **self._storage_config()}

    @classmethod
    def from_artifact(cls, config: dict) -> WeightOnlyLinear:
        return from_config(cls, config, "in_features", "out_features")


@register_module_type
class WeightOnlyConv2d(_WeightOnlyLayer):
    """Conv2d with low-bit group-quantized weights (groups over the im2col columns)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, *, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, bits: int = 4,
                 group_size: int | None = 32, symmetric: bool = True):
        super().__init__()
        pair = nn.modules.utils._pair
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.dilation = pair(kernel_size), pair(stride), pair(
            dilation)
        self.padding = padding if isinstance(padding, str) else pair(padding)
        self._init_storage((out_channels, in_channels // groups, *self.kernel_size), bias=bias,
                           bits=bits, group_size=group_size, symmetric=symmetric)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.dequantized_weight(), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)

    @classmethod
    def like(cls, conv: nn.Conv2d, *, bias: bool, **storage) -> WeightOnlyConv2d:
        if conv.padding_mode != "zeros":
            raise UnsupportedError(f"weight-only conv supports zero padding only, not "
                                   f"{conv.padding_mode!r}; add the layer to ignore")
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                   padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=bias,
                   **storage)

    def artifact_config(self) -> dict:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                "dilation": list(self.dilation), "groups": self.groups,
                **self._storage_config()}

    @classmethod
    def from_artifact(cls, config: dict) -> WeightOnlyConv2d:
        c = dict(config)
        padding = c.pop("padding")
        return cls(c.pop("in_channels"), c.pop("out_channels"), tuple(c.pop("kernel_size")),
                   stride=tuple(c.pop("stride")), dilation=tuple(c.pop("dilation")),
                   padding=padding if isinstance(padding, str) else tuple(padding), **c)


# ----------------------------------------------------------------------------- the step


def quantize_weight_only_(model: nn.Module, config: WeightOnlyConfig | None = None,
                          calibration_batches: Iterable | None = None, *,
                          notes: list[str] | None = None) -> nn.Module:
    """Replace every Linear / Conv2d of ``model`` (in place) by its weight-only form.

    ``calibration_batches`` (input tensors, ``lighten.task.Inputs`` tuples for several inputs,
    or ``(inputs, targets)`` pairs) is needed for ``gptq``, ``adaround`` and
    ``bias_correction``. Layers are done in module order, each calibrated on the outputs of the
    already-quantized layers before it, so later layers compensate earlier errors.
    """
    cfg = config or WeightOnlyConfig()
    if cfg.levels == "pow2":  # non-uniform levels: round-to-nearest only
        from lighten.quant.nonuniform import checked_config

        cfg = checked_config(cfg)
    notes = notes if notes is not None else []
    unfuse_stock_blocks(model, notes, cfg.ignore)  # stock transformer blocks -> plain Linears
    names = swappable(model, _targets(model, cfg.ignore), notes)
    need_data = cfg.method in ("gptq", "adaround") or cfg.bias_correction
    batches = _materialize(calibration_batches) if need_data else []
    if need_data and not batches:
        raise DataError(f"quant.weight_only method={cfg.method} bias_correction="
                        f"{cfg.bias_correction} needs calibration inputs; pass "
                        "calibration_batches or use method: rtn")
    grid = make_grid(cfg.bits, cfg.symmetric)
    model.eval()
    pruned: list[str] = []
    for name in names:
        layer = model.get_submodule(name)
        method = cfg.method
        why = im2col_supported(layer)
        if method in ("gptq", "adaround") and why:
            notes.append(f"{name}: {why}; rounded to nearest instead of {method}")
            method = "rtn"
        correct = cfg.bias_correction and why is None
        if cfg.bias_correction and why:
            notes.append(f"{name}: {why}; no bias correction")
        wanted = method == "gptq" or correct
        stats = _collect(model, layer, batches, hessian=method == "gptq") if wanted else None
        weight = layer.weight.detach().reshape(layer.weight.shape[0], -1).float()
        size = min(cfg.group_size or weight.shape[1], weight.shape[1])
        mask = pruned_mask(weight)  # a pruned layer: its zeros stay zero
        if mask is not None:
            pruned.append(name)
        if method == "gptq":
            if not exact_masked(mask):
                notes.append(f"{name}: sparse GPTQ used the shared Hessian factor (SparseGPT "
                             "update; the layer is too large for one factor per row mask)")
            q, scale, zero = gptq_quantize(weight, stats.hessian, group_size=size, grid=grid,
                                           damp=cfg.damp, mask=mask)
        elif method == "adaround":
            rows = collect_rows(model, layer, batches)
            q, scale, zero = adaround_quantize(weight, rows, group_size=size, grid=grid,
                                               iters=cfg.adaround_iters, reg=cfg.adaround_reg,
                                               desc=f"adaround {name}", mask=mask)
        elif cfg.levels == "pow2":
            from lighten.quant.nonuniform import pow2_rtn

            q, scale, zero = pow2_rtn(weight, group_size=size, bits=cfg.bits)
        else:
            q, scale, zero = rtn_quantize(weight, group_size=size, grid=grid)
        if mask is not None:  # every grid holds 0 exactly: the zero point
            codes = zero.repeat_interleave(size, dim=1)[:, : q.shape[1]].to(q.dtype)
            q = torch.where(mask, q, codes)
        new = weight_only_class(layer)  # from its LayerSpec
        if cfg.levels == "pow2":
            from lighten.quant.nonuniform import POW2_TYPES

            new = POW2_TYPES[new]
        has_bias = layer.bias is not None or correct
        wo = new.like(layer, bias=has_bias, bits=cfg.bits, group_size=cfg.group_size,
                      symmetric=cfg.symmetric)
        wo.set_quantized(q, scale, zero)
        if has_bias:
            bias = layer.bias.detach().clone() if layer.bias is not None else torch.zeros(
                weight.shape[0])
            if correct:
                error = weight - wo.dequantized_weight().detach().reshape_as(weight)
                bias += error @ stats.mean
            wo.bias.data.copy_(bias)
        model.set_submodule(name, wo)
    if pruned:
        notes.append(f"quant.weight_only: pruned zeros kept in {len(pruned)} layers"
                     + (f" ({cfg.method} compensates among kept weights only)"
                        if cfg.method != "rtn" else ""))
    return model


def _targets(model: nn.Module, ignore: list[str]) -> list[str]:
    require_modules(model, ignore, key="ignore")
    found = [n for n, m in model.named_modules()
             if weight_only_class(m) is not None and n not in ignore]
    if not found:
        raise UnsupportedError("quant.weight_only found no nn.Linear / nn.Conv2d layer to "
                               "quantize; check ignore or the model")
    if "" in found:  # the model itself is one layer: it is replaced by returning a new module
        raise UnsupportedError("quant.weight_only needs the layers inside a container module; "
                               "wrap the layer in nn.Sequential")
    return found


def _materialize(batches: Iterable | None) -> list[Inputs]:
    """Each calibration batch as the ``model(*args)`` arguments (float inputs as float32)."""
    out = []
    for item in batches or ():
        args = batch_inputs(item)
        out.append(Inputs(a.float() if a.is_floating_point() else a  # token ids stay int64
                          for a in args))
    return out


@torch.no_grad()
def _collect(model: nn.Module, layer: nn.Module, batches, *, hessian: bool) -> InputStats:
    """Run the calibration inputs through ``model`` and gather ``layer``'s input statistics."""
    stats = InputStats(layer, hessian=hessian)
    try:
        for args in batches:
            model(*batch_inputs(args))
    finally:
        stats.remove()
    return stats


@register_step("quant.weight_only", WeightOnlyConfig, quantizes=True,
               needs_data=lambda c: "calibration inputs" if c.method != "rtn"
               or c.bias_correction else None)
def quantize_weight_only(model: nn.Module, cfg: WeightOnlyConfig,
                         ctx: StepContext) -> nn.Module:
    """Low-bit group-wise weights (rtn or gptq), float activations, packed in the artifact."""
    from lighten.verb import module_types, record_quant_layers

    before = module_types(model)
    notes: list[str] = []
    batches = ctx.calibration_batches(cfg.calib_samples)
    quantize_weight_only_(model, cfg, batches, notes=notes)
    count = sum(isinstance(m, _WeightOnlyLayer) for m in model.modules())
    ctx.note(f"quant.weight_only: {count} layers at {cfg.bits} bits, group_size "
             f"{cfg.group_size or 'per channel'}, "
             f"{'pow2 levels, rtn' if cfg.levels == 'pow2' else cfg.method}; "
             "activations stay float")
    for message in notes:
        ctx.note(message)
    record_quant_layers(ctx, before, model, notes, ignore=getattr(cfg, "ignore", ()))
    ctx.finetune(model, cfg.finetune)  # trains what stayed float (biases, norms); weights fixed
    return model
