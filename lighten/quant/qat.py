"""``quant.qat``: quantization-aware training that ends in the same integer model as PTQ.

Reparametrize, train, make permanent:

1. :func:`prepare_qat` folds BN, plans quantizer placement exactly as PTQ does
   (:mod:`lighten.quant.plan`), calibrates initial scales and wraps each Conv / Linear in a
   :class:`QATLayer` whose weights and activations pass through straight-through fake
   quantizers (learned step size when ``lsq``, see :mod:`lighten.quant.lsq`).
2. The shared training loop fine-tunes weights and scales together (``ctx.finetune``).
3. :func:`convert_qat` turns every QATLayer into a QuantConv* / QuantLinear holding the integer
   codes and the learned scales, so export, ONNX Runtime and the artifact need nothing new.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn
from torch.nn.modules.conv import _ConvNd

from lighten.quant.lsq import LearnedFakeQuant
from lighten.quant.modules import (
    QuantAct,
    _QuantLayer,
    activation_spec,
    apply_activation,
    conv_nd,
    quant_class,
    weight_spec,
)
from lighten.quant.plan import LayerPlan, make_plan
from lighten.quant.ptq import (
    ACT_SIGNED,
    PTQConfig,
    _act_kind,
    _calibrate,
    _candidates,
    fold_with_notes,
)
from lighten.quant.quantizer import QuantSpec, compute_qparams, weight_qparams
from lighten.registry import register_step
from lighten.step import StepConfig, StepContext
from lighten.target import Target


class QATConfig(StepConfig):
    """Fake-quantized fine-tuning (LSQ by default), converted to integer layers at the end."""

    weight_bits: int = Field(4, ge=2, le=8, description="weight bits (stored in int8 containers)")
    activation_bits: int = Field(8, ge=2, le=8, description="activation bits")
    per_channel: bool = Field(True, description="one weight scale per output channel")
    lsq: bool = Field(True, description="learn the step sizes (Esser et al. 2019); false keeps "
                      "calibrated activation scales and min/max weight scales")
    calibration: Literal["minmax", "moving_average", "percentile", "mse", "entropy"] = "minmax"
    calib_samples: int = Field(512, ge=1, description="training samples for the initial scales")
    ignore: list[str] = Field(default_factory=list, description="module names left in float")

    @model_validator(mode="after")
    def _needs_training(self):
        if self.finetune is None or self.finetune.epochs == 0:
            raise ValueError("quant.qat is training: add finetune: {epochs: N} with N > 0 "
                             "(or use quant.ptq for no training)")
        return self


class QATLayer(nn.Module):
    """A float Conv1d/2d/3d / Linear whose weights, input and output are fake-quantized (training).

    ``input_quant`` is None when the input already comes quantized from another layer's output
    quantizer through range-preserving ops (PTQ reuses that output's parameters; so do we).
    """

    def __init__(self, layer: nn.Module, plan: LayerPlan, *, weight_quant: LearnedFakeQuant,
                 input_quant: LearnedFakeQuant | None, output_quant: LearnedFakeQuant | None,
                 out_qparams: tuple[torch.Tensor, torch.Tensor], weight_bits: int,
                 activation_bits: int, reduce_range: bool, dynamic_weight_scale: bool):
        super().__init__()
        self.layer, self.activation = layer, plan.activation
        self.input_from = plan.input_from if input_quant is None else None
        self.weight_quant, self.input_quant, self.output_quant = (
            weight_quant, input_quant, output_quant)
        self.weight_bits, self.activation_bits = weight_bits, activation_bits
        self.reduce_range, self.dynamic_weight_scale = reduce_range, dynamic_weight_scale
        # logits stay float in ONNX, but PyTorch's int8 engine still wants an output scale
        self.register_buffer("out_scale", out_qparams[0].detach().clone())
        self.register_buffer("out_zero_point", out_qparams[1].detach().clone())

    @property
    def weight_spec(self) -> QuantSpec:
        return weight_spec(self.weight_bits, per_channel=self.weight_quant.scale.dim() == 1,
                           reduce_range=self.reduce_range)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quant is not None:
            x = self.input_quant(x)
        if self.dynamic_weight_scale:  # plain QAT: weight scales follow the weights
            self.weight_quant.set_scale(weight_scale(self.layer.weight, self.weight_spec))
        w = self.weight_quant(self.layer.weight)
        if isinstance(self.layer, _ConvNd):
            y = conv_nd(x, w, self.layer.bias, self.layer)
        else:
            y = F.linear(x, w, self.layer.bias)
        y = apply_activation(y, self.activation)
        return self.output_quant(y) if self.output_quant is not None else y


class QATAct(nn.Module):
    """A ReLU after a residual add, followed by its (learned) quantizer; becomes a QuantAct."""

    def __init__(self, activation: str, quant: LearnedFakeQuant, activation_bits: int):
        super().__init__()
        self.activation, self.quant, self.activation_bits = activation, quant, activation_bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant(apply_activation(x, self.activation))


@torch.no_grad()
def weight_scale(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Symmetric weight scale(s): min/max at 8 bits, below that the clipping of ``max|w|``
    (per channel) with the least squared error.

    Min/max is what made plain STE QAT fail at low bits: at 2 bits (grid ``{-s, 0, s}``,
    ``s = max|w|``) every weight under ``max|w| / 2`` rounds to 0, almost all of a layer, and
    at 4 bits one outlier per channel still wastes most of the 15 levels. Searching the clip
    ratio (as PTQ's ``mse`` calibration does for activations) keeps the grid on the bulk of
    the weights."""
    scale, _ = weight_qparams(weight, spec)
    if spec.bits >= 8:
        return scale
    w = weight.detach().float()
    flat = (w.transpose(0, spec.axis).reshape(w.shape[spec.axis], -1) if spec.per_channel
            else w.reshape(1, -1))
    amax = scale.reshape(-1, 1)
    best, best_err = amax.clone(), torch.full_like(amax, float("inf"))
    for ratio in torch.linspace(0.1, 1.0, 46).tolist():  # one pass each: memory stays 1x
        s = amax * ratio
        err = (torch.clamp(torch.round(flat / s), spec.qmin, spec.qmax) * s - flat).pow(2)
        err = err.sum(1, keepdim=True)
        better = err < best_err
        best, best_err = torch.where(better, s, best), torch.where(better, err, best_err)
    return best.reshape(scale.shape)


def prepare_qat(model: nn.Module, calibration_batches: Iterable, config: QATConfig, *,
                notes: list[str] | None = None, target: Target | None = None) -> nn.Module:
    """Fold BN and insert fake quantizers where PTQ puts them, with calibrated initial scales;
    8-bit weights keep to 7 bits where ``target`` (default: this machine) needs
    ``reduce_range``."""
    cfg, notes = config, notes if notes is not None else []
    model.eval()
    fold_with_notes(model, notes)
    plan = make_plan(model, _candidates(model, cfg.ignore, notes))
    if not plan.traced:
        notes.append(f"quant.qat: model not traceable ({plan.trace_error}); each layer quantizes "
                     "its own output, residual adds stay float")
    reduce_range = (target or Target.this_machine()).reduce_range and cfg.weight_bits == 8
    a_spec = activation_spec(cfg.activation_bits, ACT_SIGNED)
    ranges = _calibrate(model, plan, calibration_batches,
                        PTQConfig(bits=cfg.activation_bits, calibration=cfg.calibration), a_spec)
    qparams = {key: compute_qparams(torch.tensor(lo), torch.tensor(hi), a_spec)
               for key, (lo, hi) in ranges.items()}

    def act_quant(key):
        return LearnedFakeQuant(a_spec, *qparams[key], learn=cfg.lsq, batched=True)

    for name, lp in plan.layers.items():
        if ("in", name) not in qparams:
            notes.append(f"{name} left in float: calibration data never reached it")
            continue
        layer = model.get_submodule(name)
        w_spec = weight_spec(cfg.weight_bits, per_channel=cfg.per_channel,
                             reduce_range=reduce_range)
        shared = ("out", lp.input_from) in qparams or ("act", lp.input_from) in qparams
        qat = QATLayer(
            layer, lp,
            weight_quant=LearnedFakeQuant(w_spec, weight_scale(layer.weight, w_spec),
                                          weight_qparams(layer.weight, w_spec)[1],
                                          learn=cfg.lsq),
            input_quant=None if shared else act_quant(("in", name)),
            output_quant=act_quant(("out", name)) if lp.output_quant else None,
            out_qparams=qparams[("out", name)], weight_bits=cfg.weight_bits,
            activation_bits=cfg.activation_bits, reduce_range=reduce_range,
            dynamic_weight_scale=not cfg.lsq)
        model.set_submodule(name, qat)
        if lp.absorbed_module:  # the layer applies this ReLU itself now
            model.set_submodule(lp.absorbed_module, nn.Identity())
    for name in plan.acts:
        if ("act", name) in qparams:
            kind = _act_kind(model.get_submodule(name))
            model.set_submodule(name, QATAct(kind, act_quant(("act", name)), cfg.activation_bits))
    return model


@torch.no_grad()
def convert_qat(model: nn.Module) -> nn.Module:
    """Replace QAT modules by the integer layers PTQ produces (codes and learned scales)."""
    model.eval()
    modules = dict(model.named_modules())
    new = {}
    for name, m in modules.items():
        if isinstance(m, QATLayer):
            new[name] = _to_quant_layer(m, modules)
        elif isinstance(m, QATAct):
            act = QuantAct(activation=m.activation, activation_bits=m.activation_bits,
                           act_signed=ACT_SIGNED)
            act.scale.copy_(m.quant.scale.reshape(()))
            act.zero_point.copy_(m.quant.zero_point.reshape(()))
            new[name] = act
    for name, module in new.items():
        model.set_submodule(name, module)
    return model


def _to_quant_layer(m: QATLayer, modules: dict[str, nn.Module]) -> nn.Module:
    wq = m.weight_quant
    if m.dynamic_weight_scale:  # the last optimizer step moved the weights after the last forward
        wq.set_scale(weight_scale(m.layer.weight, m.weight_spec))
    q = quant_class(m.layer).from_float(
        m.layer, weight_bits=m.weight_bits, activation_bits=m.activation_bits,
        per_channel=wq.scale.dim() == 1, symmetric=True, reduce_range=m.reduce_range,
        act_signed=ACT_SIGNED, activation=m.activation, output_quant=m.output_quant is not None)
    q.set_quantized_weight(wq.quantize_int(m.layer.weight), wq.scale, wq.zero_point)
    in_q = m.input_quant or _point_quantizer(modules[m.input_from])
    q.act_scale.copy_(in_q.scale.reshape(()))
    q.act_zero_point.copy_(in_q.zero_point.reshape(()))
    out_scale, out_zp = ((m.output_quant.scale, m.output_quant.zero_point) if m.output_quant
                         else (m.out_scale, m.out_zero_point))
    q.out_scale.copy_(out_scale.reshape(()))
    q.out_zero_point.copy_(out_zp.reshape(()))
    return q


def _point_quantizer(module: nn.Module) -> LearnedFakeQuant:
    """The quantizer whose output feeds a layer that reuses it (a layer output or a QATAct)."""
    return module.quant if isinstance(module, QATAct) else module.output_quant


@register_step("quant.qat", QATConfig, needs_data=lambda c: "calibration inputs",
               quantizes=True)
def quantize_qat(model: nn.Module, cfg: QATConfig, ctx: StepContext) -> nn.Module:
    """Quantization-aware training (LSQ), converted to the integer layers PTQ produces."""
    from lighten.verb import module_types, record_quant_layers

    before = module_types(model)
    notes: list[str] = []
    prepare_qat(model, ctx.calibration_batches(cfg.calib_samples), cfg, notes=notes,
                target=ctx.target)
    ctx.finetune(model, cfg.finetune)
    convert_qat(model)
    for message in notes:
        ctx.note(message)
    record_quant_layers(ctx, before, model, notes, ignore=getattr(cfg, "ignore", ()))
    layers = [m for m in model.modules() if isinstance(m, _QuantLayer)]
    ctx.note(f"quant.qat: {len(layers)} layers w{cfg.weight_bits}a{cfg.activation_bits} after "
             f"{cfg.finetune.epochs:g} epochs of {'LSQ' if cfg.lsq else 'STE'} fine-tuning "
             f"({'per-channel' if cfg.per_channel else 'per-tensor'} weights, {cfg.calibration} "
             "initial scales)")
    return model
