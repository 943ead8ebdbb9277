"""``quant.dynamic``: int8 weights, activation ranges measured at run time, integer matmuls.

Each ``nn.Linear`` becomes a :class:`DynamicQuantLinear`. Its forward computes exactly what ONNX
Runtime runs for the exported graph::

    q, s, z = DynamicQuantizeLinear(x)          # uint8, per tensor, from this batch's min/max
    acc     = MatMulInteger(q, Wq^T, z)         # int32 accumulators
    y       = Cast(acc) * (s * w_scale) + bias  # ORT fuses this into DynamicQuantizeMatMul

No calibration data is needed. Weights are symmetric int8 (per output channel by default); on
x86 without VNNI they use 7 bits by default, as in ``quant.ptq``, because the u8 x s8 kernels
saturate with full-range weights. Each ``nn.LSTM`` becomes a ``DynamicQuantLSTM``
(``quant/dynamic_rnn.py``: ORT's DynamicQuantizeLSTM); GRU/RNN stay float with a note. Each
``nn.Embedding`` becomes an ``Int8Embedding`` (``quant/embedding.py``: int8 rows gathered, then
scaled) unless ``embeddings: false``.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from lighten.errors import UnsupportedError
from lighten.layers import dynamic_quant_class
from lighten.modules import register_module_type, require_modules
from lighten.quant.eligibility import swappable, unfuse_stock_blocks
from lighten.registry import register_step
from lighten.step import StepConfig, StepContext
from lighten.target import Target

_ONNX_FLOAT = 1


class DynamicConfig(StepConfig):
    """Dynamic quantization of Linear layers (int8 weights, run-time activation ranges)."""

    bits: int = Field(8, ge=2, le=8, description="weight bits (activations: dynamic uint8)")
    per_channel: bool = Field(True, description="one weight scale per output feature")
    reduce_range: bool | None = Field(
        None, description="7-bit weights against U8S8 overflow; None = auto (target cpu is x86 "
        "without VNNI)")
    embeddings: bool = Field(
        True, description="int8 rows (one scale per row) for nn.Embedding tables too: a lookup "
        "needs no integer kernel, and in a transformer the tables can be half of the weights")
    ignore: list[str] = Field(default_factory=list, description="module names left in float")


def dynamic_quantize_u8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ONNX DynamicQuantizeLinear: (uint8 values as float, scale, zero point as float).

    The range always contains 0; round half to even, like the ONNX operator.
    """
    lo = torch.clamp(x.min(), max=0.0)
    hi = torch.clamp(x.max(), min=0.0)
    scale = (hi - lo) / 255.0
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = torch.clamp(torch.round(0.0 - lo / safe), 0, 255)
    q = torch.clamp(torch.round(x / safe) + zero, 0, 255)
    return q, scale, zero


def symmetric_codes(w: torch.Tensor, qmax: int, *,
                    per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``w (rows, cols)`` rounded to the symmetric grid ``[-qmax, qmax]`` with one scale per row
    (or one for the tensor): ``(codes as float, scale (rows,) or ())``, ``scale * codes ~ w``.

    The one rounding of every int8 weight ``quant.dynamic`` stores (Linear, LSTM, embedding
    rows) and of ``llm.encoder_recover.fake_int8``, which must train on exactly that grid.
    A zero row gets the smallest scale (float32 eps) and zero codes."""
    amax = w.abs().amax(dim=1) if per_channel else w.abs().amax()
    scale = (amax / qmax).clamp_min(torch.finfo(torch.float32).eps)
    codes = torch.clamp(torch.round(w / (scale[:, None] if per_channel else scale)), -qmax, qmax)
    return codes, scale


class PerTensorU8:
    """Activation quantizer of ``quant.dynamic``: ONNX ``DynamicQuantizeLinear`` (uint8)."""

    row_scales = False  # one scale per tensor (see IntegerLinear.symbolic)

    @staticmethod
    def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes minus zero point, scale)``; both exact integers in float."""
        q, s, z = dynamic_quantize_u8(x)
        return q - z, s

    @staticmethod
    def symbolic(g, x):
        """``(uint8 codes, zero point, scale)`` as ONNX values."""
        q, s, z = g.op("DynamicQuantizeLinear", x, outputs=3)
        return q, z, s


class IntegerLinear(torch.autograd.Function):
    """``quantizer(x) @ w_int^T * (s * w_scale) + bias``, integer-exact forward and
    straight-through backward (so biases/norms can be fine-tuned); ``quantizer`` (e.g.
    :class:`PerTensorU8`) decides the activation codes and their ONNX form."""

    @staticmethod
    def forward(ctx, x, w_int, w_scale, bias, quantizer=PerTensorU8):
        codes, s = quantizer.quantize(x)
        # int32 accumulation, computed in float64 where every partial sum is an exact integer
        acc = codes.double() @ w_int.double().T
        y = acc.float() * (s * w_scale)
        if bias is not None:
            y = y + bias
        ctx.save_for_backward(w_int, w_scale)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad):
        w_int, w_scale = ctx.saved_tensors
        weight = w_int.float() * w_scale.reshape(-1, 1)
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
        return grad @ weight, None, None, grad_bias, None

    @staticmethod
    def symbolic(g, x, w_int, w_scale, bias, quantizer=PerTensorU8):
        q, z, s = quantizer.symbolic(g, x)
        w_t = g.op("Transpose", w_int, perm_i=[1, 0])  # (in, out), folded into the initializer
        acc = g.op("MatMulInteger", q, w_t, z)
        y = g.op("Mul", g.op("Cast", acc, to_i=_ONNX_FLOAT), g.op("Mul", s, w_scale))
        if bias is not None and not (hasattr(bias, "node") and bias.node().mustBeNone()):
            # ORT fuses MatMulInteger-Cast-Mul and a following Add of a constant bias into one
            # MatMulIntegerToFloat, whose kernel applies a per-row A scale after the bias:
            # (acc * w_scale + bias) * s. A Sum is left out of the fusion (acc * s * w_scale
            # stays one fused kernel, then + bias); a per-tensor scale keeps the fused Add.
            per_tensor = getattr(quantizer, "row_scales", True) is False
            y = g.op("Add" if per_tensor else "Sum", y, bias)
        return y


@register_module_type
class DynamicQuantLinear(nn.Module):
    """Linear with int8 weights whose input is quantized per batch at run time."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, bits: int = 8,
                 per_channel: bool = True, reduce_range: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.per_channel, self.reduce_range = bits, per_channel, reduce_range
        self.register_buffer("weight_int", torch.zeros(out_features, in_features,
                                                       dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features if per_channel else 1))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @property
    def qmax(self) -> int:
        bits = self.bits - 1 if self.reduce_range and self.bits == 8 else self.bits
        return 2 ** (bits - 1) - 1

    @classmethod
    def from_float(cls, linear: nn.Linear, **options) -> DynamicQuantLinear:
        q = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, **options)
        q.set_weight(linear.weight.detach())
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach())
        return q

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        codes, scale = symmetric_codes(weight.float(), self.qmax, per_channel=self.per_channel)
        self.weight_scale.copy_(scale)
        self.weight_int.copy_(codes.to(torch.int8))

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int.float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return IntegerLinear.apply(x, self.weight_int, self.weight_scale, self.bias)

    def artifact_config(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "bits": self.bits,
                "per_channel": self.per_channel, "reduce_range": self.reduce_range}

    @classmethod
    def from_artifact(cls, config: dict) -> DynamicQuantLinear:
        return cls(**config)

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, w{self.bits}"
                f"{' (7-bit range)' if self.qmax == 63 else ''}, dynamic uint8 activations")


def quantize_dynamic_(model: nn.Module, config: DynamicConfig | None = None, *,
                      notes: list[str] | None = None, target: Target | None = None) -> nn.Module:
    """Replace every ``nn.Linear`` (``nn.LSTM``) of ``model`` in place by
    :class:`DynamicQuantLinear` (``DynamicQuantLSTM``); ``target`` (default: this machine)
    decides ``reduce_range: auto``."""
    cfg = config or DynamicConfig()
    notes = notes if notes is not None else []
    require_modules(model, cfg.ignore, key="ignore")
    unfuse_stock_blocks(model, notes, cfg.ignore)  # stock transformer blocks -> plain Linears
    target = target or Target.this_machine()
    reduce_range = target.reduce_range if cfg.reduce_range is None else cfg.reduce_range
    targets = [n for n, m in model.named_modules()  # types whose LayerSpec names a swap
               if dynamic_quant_class(m) is not None and n not in cfg.ignore
               and not getattr(m, "proj_size", 0)  # no integer kernel for LSTM projections
               and _embedding_eligible(n, m, cfg, notes)]
    targets = swappable(model, targets, notes)
    if not targets or "" in targets:
        raise UnsupportedError("quant.dynamic found no nn.Linear, nn.LSTM or nn.Embedding inside "
                               "the model to quantize (a bare layer must be wrapped in "
                               "nn.Sequential); check ignore")
    for name in targets:
        layer = model.get_submodule(name)
        model.set_submodule(name, dynamic_quant_class(layer).from_float(
            layer, bits=cfg.bits, per_channel=cfg.per_channel, reduce_range=reduce_range))
    for name, m in model.named_modules():
        if isinstance(m, (nn.LSTM, nn.GRU, nn.RNN, nn.MultiheadAttention)):
            notes.append(f"{name} ({type(m).__name__}) stays float: quant.dynamic converts "
                         "nn.Linear and nn.LSTM without proj_size only")
        elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            notes.append(f"{name} ({type(m).__name__}) stays float: use quant.ptq for convs")
    return model.eval()


def _embedding_eligible(name: str, module: nn.Module, cfg: DynamicConfig,
                        notes: list[str]) -> bool:
    """False for an ``nn.Embedding`` that stays float (``embeddings: false``, or ``max_norm``,
    which rewrites rows on every lookup); True for every other module."""
    if not isinstance(module, nn.Embedding):
        return True
    if cfg.embeddings and module.max_norm is not None:
        notes.append(f"{name} (nn.Embedding with max_norm) stays float: its rows are "
                     "renormalized on every lookup")
    return cfg.embeddings and module.max_norm is None


@register_step("quant.dynamic", DynamicConfig, quantizes=True)
def quantize_dynamic(model: nn.Module, cfg: DynamicConfig, ctx: StepContext) -> nn.Module:
    """Int8 Linear/LSTM weights, activations quantized at run time (integer GEMMs on ORT)."""
    from lighten.quant.dynamic_rnn import DynamicQuantLSTM
    from lighten.quant.embedding import Int8Embedding
    from lighten.verb import module_types, record_quant_layers

    before = module_types(model)
    notes: list[str] = []
    quantize_dynamic_(model, cfg, notes=notes, target=ctx.target)
    count = sum(isinstance(m, DynamicQuantLinear) for m in model.modules())
    lstms = sum(isinstance(m, DynamicQuantLSTM) for m in model.modules())
    tables = sum(isinstance(m, Int8Embedding) for m in model.modules())
    weights = "int8" if cfg.bits == 8 else f"{cfg.bits}-bit (in int8 containers)"
    ctx.note(f"quant.dynamic: {count} Linear and {lstms} LSTM layers with {weights} weights and "
             "run-time uint8 activation ranges (no calibration)"
             + (f"; {tables} embedding table(s) with {weights} rows" if tables else ""))
    for message in notes:
        ctx.note(message)
    record_quant_layers(ctx, before, model, notes, ignore=getattr(cfg, "ignore", ()))
    ctx.finetune(model, cfg.finetune)  # biases and norms; the int8 weights stay fixed
    return model
