"""``quant.ptq``: static post-training int8 quantization of weights and activations.

Fold BN, plan quantizer placement (:mod:`lighten.quant.plan`), run calibration batches through
forward hooks that feed range observers, then swap each Conv1d / Conv2d / Conv3d / Linear for
its Quant* twin (:data:`lighten.quant.modules.QUANT_CLASSES`).
Statistics first, then apply: one calibration pass serves every layer.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn.modules.conv import _ConvNd

from lighten.backends import BackendName
from lighten.errors import DataError, RecipeError
from lighten.layers import static_quant_class
from lighten.quant.eligibility import swappable, unfuse_stock_blocks
from lighten.quant.modules import (
    QuantAct,
    QuantOutput,
    _QuantLayer,
    activation_spec,
    apply_activation,
    quant_class,
)
from lighten.quant.observers import make_observer
from lighten.quant.plan import RELU_MODULES, LayerPlan, make_plan
from lighten.quant.quantizer import compute_qparams
from lighten.registry import register_step
from lighten.step import StepConfig, StepContext
from lighten.target import Target
from lighten.task import batch_inputs

# Activations are uint8 (asymmetric). Measured on this AVX2 machine with ORT 1.32 (LeNet-5,
# batch 64): uint8 and int8 activations run at the same speed within noise, and ORT converts int8
# to uint8 internally for x86 kernels anyway; uint8 is also what PyTorch's x86 engine accepts.
ACT_SIGNED = False


class PTQConfig(StepConfig):
    """Static int8 PTQ: per-channel symmetric weights, calibrated per-tensor activations."""

    bits: int = Field(8, ge=2, le=8, description="weight and activation bits (int8 container)")
    weight_bits: int | None = Field(
        None, ge=2, le=8, description="weight bits when they differ from `bits` (e.g. w4a8)")
    per_channel: bool = Field(True, description="one weight scale per output channel")
    symmetric: bool = Field(True, description="symmetric weights (zero point 0)")
    calibration: Literal["minmax", "moving_average", "percentile", "mse", "entropy"] = "minmax"
    percentile: float = Field(99.99, gt=50, le=100, description="for calibration: percentile")
    calib_samples: int = Field(512, ge=1, description="training samples used for calibration")
    backend: BackendName | None = Field(
        None, description="runtime the int8 layers are built for; None = the deployment "
        "target's (deploy: backend)")
    ignore: list[str] = Field(default_factory=list, description="module names left in float")
    reduce_range: bool | None = Field(
        None, description="7-bit weights against U8S8 overflow; None = auto (target cpu is x86 "
        "without VNNI)")
    fallback: Literal["none", "auto"] = Field(
        "none", description="auto: time each int8 layer against its float form on the "
        "deployment backend (batch 64, in interleaved rounds) and keep the faster; the whole "
        "model is timed both ways before the fallbacks are kept (lighten.quant.fallback)")


def quantize_ptq_(
    model: nn.Module,
    calibration_batches: Iterable,
    config: PTQConfig | None = None,
    *,
    notes: list[str] | None = None,
    weight_bits: Mapping[str, int] | None = None,
    target: Target | None = None,
) -> nn.Module:
    """Quantize ``model`` in place and return it.

    ``calibration_batches`` yields input tensors, ``lighten.task.Inputs`` tuples for a model with
    several inputs (``model(*inputs)``), or ``(inputs, targets)`` pairs. Layers that
    cannot be quantized stay float; why is appended to ``notes``. ``weight_bits`` overrides the
    weight bit width of named layers (mixed precision); activations keep ``config.bits``.
    ``target`` (default: this machine) decides ``reduce_range: auto`` and the default backend.
    """
    cfg = config or PTQConfig()
    target = target or Target.this_machine()
    backend = cfg.backend or target.backend
    notes = notes if notes is not None else []
    model.eval()
    fold_with_notes(model, notes)

    candidates = _candidates(model, cfg.ignore, notes)
    integer_ops = backend != "torch"  # PyTorch's int8 engine has no int8 concat/sigmoid here
    plan = make_plan(model, candidates, integer_ops=integer_ops)
    if not plan.traced:
        notes.append(f"quant.ptq: model not traceable ({plan.trace_error}); each layer quantizes "
                     "its own output, residual adds stay float")
    auto_reduce = target.reduce_range if cfg.reduce_range is None else cfg.reduce_range
    reduce_range = auto_reduce and cfg.bits == 8  # below 8 bits the products cannot overflow
    act_signed = ACT_SIGNED if backend == "onnxruntime" else False  # torch x86 needs quint8
    spec = activation_spec(cfg.bits, act_signed)

    float_model = copy.deepcopy(model) if cfg.fallback == "auto" else None
    shapes: dict[str, tuple] = {}
    ranges = _share_ranges(_calibrate(model, plan, calibration_batches, cfg, spec, shapes), plan)
    qparams = {key: compute_qparams(torch.tensor(lo), torch.tensor(hi), spec)
               for key, (lo, hi) in ranges.items()}

    if cfg.weight_bits is not None:  # a uniform override; an explicit per-layer mapping wins
        weight_bits = {**{name: cfg.weight_bits for name in plan.layers}, **(weight_bits or {})}
    common = dict(weight_bits=cfg.bits, activation_bits=cfg.bits, per_channel=cfg.per_channel,
                  symmetric=cfg.symmetric, reduce_range=reduce_range, act_signed=act_signed)
    for name, layer_plan in plan.layers.items():
        if ("in", name) not in qparams:
            notes.append(f"{name} left in float: calibration data never reached it")
            continue
        layer_common = common
        if weight_bits and name in weight_bits:
            bits = weight_bits[name]
            layer_common = {**common, "weight_bits": bits,
                            "reduce_range": auto_reduce and bits == 8}
        model.set_submodule(name, _quant_layer(model.get_submodule(name), layer_plan, qparams,
                                               layer_common))
        if layer_plan.absorbed_module:  # the layer applies this ReLU itself now
            model.set_submodule(layer_plan.absorbed_module, nn.Identity())
    for name in plan.acts:
        if ("act", name) in qparams:
            act = QuantAct(activation=_act_kind(model.get_submodule(name)),
                           activation_bits=cfg.bits, act_signed=act_signed)
            _set_qparams(act.scale, act.zero_point, qparams[("act", name)])
            model.set_submodule(name, act)
    for name in plan.outputs:  # sigmoid / pool read by a functional op: quantize its output
        if ("act", name) in qparams:
            out = QuantOutput(model.get_submodule(name), activation_bits=cfg.bits,
                              act_signed=act_signed)
            _set_qparams(out.scale, out.zero_point, qparams[("act", name)])
            model.set_submodule(name, out)
    if float_model is not None:
        from lighten.quant.fallback import apply_fallback

        apply_fallback(model, float_model, plan, shapes, target=target, backend=backend,
                       notes=notes)
    if backend == "torch":
        from lighten.quant.torch_int8 import to_torch_int8

        to_torch_int8(model)  # fail now, with the module's name, rather than at deployment
    return model


@register_step("quant.ptq", PTQConfig, needs_data=lambda c: "calibration inputs",
               quantizes=True)
def quantize_ptq(model: nn.Module, cfg: PTQConfig, ctx: StepContext) -> nn.Module:
    """Static int8 post-training quantization (weights + calibrated activations)."""
    from lighten.verb import module_types, record_quant_layers

    before = module_types(model)
    notes: list[str] = []
    quantize_ptq_(model, ctx.calibration_batches(cfg.calib_samples), cfg, notes=notes,
                  target=ctx.target)
    for message in notes:
        ctx.note(message)
    record_quant_layers(ctx, before, model, notes, ignore=getattr(cfg, "ignore", ()))
    quantized = sum(isinstance(m, _QuantLayer) for m in model.modules())
    width = (f"int{cfg.bits}" if cfg.weight_bits in (None, cfg.bits)
             else f"w{cfg.weight_bits}a{cfg.bits}")
    ctx.note(f"quant.ptq: {quantized} layers {width} ({cfg.calibration} calibration, "
             f"{'per-channel' if cfg.per_channel else 'per-tensor'} weights)")
    return ctx.finetune(model, cfg.finetune)


def fold_with_notes(model: nn.Module, notes: list[str]) -> None:
    """Fold BN in place (quantizers must see folded weights); say what could not be folded."""
    from lighten.arch.fold import fold_batchnorm_report

    fold = fold_batchnorm_report(model)
    if fold.method != "fx":
        notes.append(f"BN folding: model not traceable ({fold.trace_error}); folded only "
                     f"adjacent pairs in nn.Sequential ({len(fold.folded)} folded)")
    for bn_name, reason in fold.skipped:
        notes.append(f"BN {bn_name} not folded: {reason}")


def _candidates(model: nn.Module, ignore: list[str], notes: list[str]) -> list[str]:
    names = [n for n, _ in model.named_modules()]
    for s in ignore:
        if s not in names:
            sample = ", ".join(n for n in names if n)[:200]
            raise RecipeError(f"ignore: no module named {s!r}; module names are: "
                              f"{sample}")
    unfuse_stock_blocks(model, notes, ignore)  # stock transformer blocks -> plain Linears
    out = []
    for name, module in model.named_modules():
        skipped = any(name == s or name.startswith(s + ".") for s in ignore)
        if static_quant_class(module) is not None:  # its LayerSpec names an int8 twin
            if skipped:
                notes.append(f"{name} left in float: listed in ignore")
            elif isinstance(module, _ConvNd) and module.padding_mode != "zeros":
                notes.append(f"{name} left in float: padding_mode={module.padding_mode!r}")
            else:
                out.append(name)
        elif isinstance(module, _ConvNd) and not skipped:  # ConvTranspose1d/2d/3d
            notes.append(f"{name} left in float: {type(module).__name__} has no static int8 "
                         "form here (quantized: Conv1d/2d/3d, Linear)")
    return swappable(model, out, notes)


def _calibrate(model, plan, batches, cfg: PTQConfig, spec, shapes=None) -> dict:
    """One pass over the batches; returns {(kind, name): (lo, hi)} for every observed point.
    ``shapes`` gets each layer's input shape without the batch axis."""
    observers: dict = {}

    def observer(key):
        if key not in observers:
            observers[key] = make_observer(cfg.calibration, percentile=cfg.percentile, spec=spec)
        return observers[key]

    def layer_hook(name, layer_plan):
        def hook(module, inputs, output):
            if shapes is not None:
                shapes[name] = tuple(inputs[0].shape[1:])
            observer(("in", name)).observe(inputs[0])
            observer(("out", name)).observe(apply_activation(output, layer_plan.activation))
        return hook

    def act_hook(name):
        return lambda module, inputs, output: observer(("act", name)).observe(output)

    handles = [model.get_submodule(n).register_forward_hook(layer_hook(n, p))
               for n, p in plan.layers.items()]
    handles += [model.get_submodule(n).register_forward_hook(act_hook(n)) for n in plan.acts
                if type(model.get_submodule(n)) in RELU_MODULES]
    handles += [model.get_submodule(n).register_forward_hook(act_hook(n)) for n in plan.outputs]
    seen = 0
    try:
        with torch.no_grad():
            for batch in batches:
                inputs = batch_inputs(batch)
                if shapes is not None and len(inputs) == 1 and inputs[0].is_floating_point():
                    shapes["<input>"] = tuple(inputs[0].shape[1:])  # the whole model's input
                model(*inputs)
                seen += 1
    finally:
        for h in handles:
            h.remove()
    if seen == 0:
        raise DataError("quant.ptq got no calibration batches; give calib_samples >= 1 and a "
                        "non-empty training split")
    return {key: obs.range() for key, obs in observers.items() if obs.count}


def _share_ranges(ranges: dict, plan) -> dict:
    """One range per concat group (:attr:`QuantPlan.groups`): the union of its members'."""
    for group in plan.groups:
        keys = [k for name in group for k in (("out", name), ("act", name)) if k in ranges]
        if not keys:
            continue
        lo = min(ranges[k][0] for k in keys)
        hi = max(ranges[k][1] for k in keys)
        for k in keys:
            ranges[k] = (lo, hi)
    return ranges


def _quant_layer(float_layer, layer_plan: LayerPlan, qparams, common) -> nn.Module:
    q = quant_class(float_layer).from_float(float_layer, activation=layer_plan.activation,
                                            output_quant=layer_plan.output_quant, **common)
    src = layer_plan.input_from
    shared = qparams.get(("out", src), qparams.get(("act", src)))
    _set_qparams(q.act_scale, q.act_zero_point, shared or qparams[("in", layer_plan.name)])
    _set_qparams(q.out_scale, q.out_zero_point, qparams[("out", layer_plan.name)])
    return q


def _set_qparams(scale_buf, zp_buf, params) -> None:
    scale, zp = params
    scale_buf.copy_(scale.reshape(scale_buf.shape))
    zp_buf.copy_(zp.reshape(zp_buf.shape))


def _act_kind(module: nn.Module) -> str:
    return "relu6" if isinstance(module, nn.ReLU6) else "relu"
