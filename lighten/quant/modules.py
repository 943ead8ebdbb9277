"""Int8 layers with a fake-quant reference forward and a clean QDQ ONNX form.

A quantized layer computes ``Q/DQ(input) -> conv/linear(DQ(int8 weight), DQ(int32 bias))
-> activation -> Q/DQ(output)``. That is exactly the pattern ONNX Runtime fuses into integer
kernels (QLinearConv / QGemm / QLinearMatMul): DequantizeLinear on every input, QuantizeLinear on
the output, a ReLU between them dropped because the output zero point already clips at 0.

Weights are stored as int8 with per-output-channel scales; in ONNX they are int8 initializers
read by DequantizeLinear (a custom symbolic, so no export post-pass is needed). The bias is kept
in float and quantized to int32 with scale ``act_scale * weight_scale``, as QLinearConv expects.

Convolutions of every spatial rank share one class, :class:`QuantConv` (Conv1d / Conv2d / Conv3d
become QuantConv1d / QuantConv2d / QuantConv3d); :data:`QUANT_CLASSES` maps each float layer type
to its int8 twin and is the one list of what static quantization covers.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from lighten.layers import quant_classes_view, static_quant_types
from lighten.modules import register_module_type
from lighten.quant.quantizer import QuantSpec, fake_quantize, quantize, weight_qparams

ACTIVATIONS = ("none", "relu", "relu6")
_ONNX_INT8, _ONNX_INT32 = 3, 6  # TensorProto data types


class _DequantizeWeight(torch.autograd.Function):
    """int8 weight -> float; exported as DequantizeLinear(int8 initializer)."""

    @staticmethod
    def forward(ctx, w_int, scale, zero_point, axis: int):
        shape = [-1] + [1] * (w_int.dim() - 1) if scale.dim() else []
        return (w_int.float() - zero_point.float().reshape(shape)) * scale.reshape(shape)

    @staticmethod
    def symbolic(g, w_int, scale, zero_point, axis: int):
        zp = g.op("Cast", zero_point, to_i=_ONNX_INT8)
        return g.op("DequantizeLinear", w_int, scale, zp, axis_i=axis)


class _QuantizeBias(torch.autograd.Function):
    """float bias -> int32 grid of ``scale`` -> float; exported as DequantizeLinear(int32)."""

    @staticmethod
    def forward(ctx, bias, scale):
        return torch.round(bias / scale) * scale

    @staticmethod
    def backward(ctx, grad):  # straight-through: lets a later fine-tune still move the bias
        return grad, None

    @staticmethod
    def symbolic(g, bias, scale):
        q = g.op("Cast", g.op("Round", g.op("Div", bias, scale)), to_i=_ONNX_INT32)
        return g.op("DequantizeLinear", q, scale, axis_i=0)  # zero point defaults to 0


def activation_spec(bits: int, signed: bool) -> QuantSpec:
    """Activations: per-tensor, asymmetric (a ReLU output uses the whole range)."""
    return QuantSpec(bits=bits, symmetric=False, per_channel=False, signed=signed)


def weight_spec(bits: int, *, per_channel: bool, symmetric: bool = True,
                reduce_range: bool = False) -> QuantSpec:
    """Weights: signed int8, symmetric (zero point 0) and per output channel by default."""
    return QuantSpec(bits=bits, symmetric=symmetric, per_channel=per_channel, axis=0,
                     signed=True, reduce_range=reduce_range)


def apply_activation(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "relu":
        return F.relu(x)
    if kind == "relu6":
        return F.relu6(x)
    return x


class _QuantLayer(nn.Module):
    """Shared state and forward of QuantConv* / QuantLinear (subclasses provide ``_op``)."""

    def _init_quant(self, weight_shape, *, has_bias: bool, weight_bits: int, activation_bits: int,
                    per_channel: bool, symmetric: bool, reduce_range: bool, act_signed: bool,
                    activation: str, output_quant: bool) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.weight_bits, self.activation_bits = weight_bits, activation_bits
        self.per_channel, self.symmetric = per_channel, symmetric
        self.reduce_range, self.act_signed = reduce_range, act_signed
        self.activation, self.output_quant = activation, output_quant
        channels = weight_shape[0] if per_channel else None
        qshape = (channels,) if channels else ()
        self.register_buffer("weight_int", torch.zeros(weight_shape, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(qshape))
        self.register_buffer("weight_zero_point", torch.zeros(qshape, dtype=torch.int32))
        self.bias = nn.Parameter(torch.zeros(weight_shape[0])) if has_bias else None
        self.register_buffer("act_scale", torch.ones(()))
        self.register_buffer("act_zero_point", torch.zeros((), dtype=torch.int32))
        # Calibrated even when ``output_quant`` is False (a model's logits stay float in ONNX):
        # PyTorch's int8 kernels always need an output scale.
        self.register_buffer("out_scale", torch.ones(()))
        self.register_buffer("out_zero_point", torch.zeros((), dtype=torch.int32))

    @property
    def weight_spec(self) -> QuantSpec:
        return weight_spec(self.weight_bits, per_channel=self.per_channel,
                           symmetric=self.symmetric, reduce_range=self.reduce_range)

    @property
    def act_spec(self) -> QuantSpec:
        return activation_spec(self.activation_bits, self.act_signed)

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Quantize a float weight into ``weight_int`` / ``weight_scale`` (min/max per channel)."""
        spec = self.weight_spec
        scale, zp = weight_qparams(weight, spec)
        self.weight_scale.copy_(scale.reshape(self.weight_scale.shape))
        self.weight_zero_point.copy_(zp.reshape(self.weight_zero_point.shape))
        q = quantize(weight.float(), scale, zp, spec.qmin, spec.qmax, axis=0)
        self.weight_int.copy_(q.to(torch.int8))

    @torch.no_grad()
    def set_quantized_weight(self, weight_int: torch.Tensor, scale: torch.Tensor,
                             zero_point: torch.Tensor) -> None:
        """Store weights quantized elsewhere (e.g. with scales learned by QAT) as they are."""
        spec = self.weight_spec
        lo, hi = int(weight_int.min()), int(weight_int.max())
        if lo < spec.qmin or hi > spec.qmax:
            raise ValueError(f"weight codes span [{lo}, {hi}], outside the {self.weight_bits}-bit "
                             f"range [{spec.qmin}, {spec.qmax}]")
        self.weight_scale.copy_(scale.detach().float().reshape(self.weight_scale.shape))
        self.weight_zero_point.copy_(zero_point.detach().reshape(self.weight_zero_point.shape))
        self.weight_int.copy_(weight_int.to(torch.int8))

    def dequantized_weight(self) -> torch.Tensor:
        return _DequantizeWeight.apply(self.weight_int, self.weight_scale,
                                       self.weight_zero_point, 0)

    def _quant_bias(self) -> torch.Tensor | None:
        if self.bias is None:
            return None
        return _QuantizeBias.apply(self.bias, self.act_scale * self.weight_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = fake_quantize(x, self.act_scale, self.act_zero_point, self.act_spec)
        y = self._op(x, self.dequantized_weight(), self._quant_bias())
        y = apply_activation(y, self.activation)
        if self.output_quant:
            y = fake_quantize(y, self.out_scale, self.out_zero_point, self.act_spec)
        return y

    def _quant_config(self) -> dict:
        return {
            "bias": self.bias is not None, "weight_bits": self.weight_bits,
            "activation_bits": self.activation_bits, "per_channel": self.per_channel,
            "symmetric": self.symmetric, "reduce_range": self.reduce_range,
            "act_signed": self.act_signed,
            "activation": self.activation, "output_quant": self.output_quant,
        }

    def extra_repr(self) -> str:
        return (f"w{self.weight_bits}a{self.activation_bits}, activation={self.activation}, "
                f"output_quant={self.output_quant}")


_CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class QuantConv(_QuantLayer):
    """Conv1d / Conv2d / Conv3d with int8 per-channel weights and fake-quantized activations.

    One implementation for every spatial rank; the registered, saved types are the rank-specific
    subclasses :class:`QuantConv1d`, :class:`QuantConv2d` and :class:`QuantConv3d` (``dims``),
    so an artifact names the exact layer and old ``QuantConv2d`` artifacts load unchanged.
    ``QuantConv.from_float(conv)`` picks the subclass from the float layer.
    """

    dims: int = 0  # spatial rank: set by the concrete subclasses

    def __init__(self, in_channels: int, out_channels: int, kernel_size, *, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, weight_bits: int = 8,
                 activation_bits: int = 8, per_channel: bool = True, symmetric: bool = True,
                 reduce_range: bool = False, act_signed: bool = False, activation: str = "none",
                 output_quant: bool = True):
        super().__init__()
        if self.dims not in _CONV_FUNCTIONS:
            raise TypeError("QuantConv is abstract: use QuantConv1d / QuantConv2d / QuantConv3d "
                            "or QuantConv.from_float(conv)")
        tup = nn.modules.utils._ntuple(self.dims)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = tup(kernel_size), tup(stride)
        self.dilation = tup(dilation)
        self.padding = padding if isinstance(padding, str) else tup(padding)
        self.groups = groups
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        self._init_quant(shape, has_bias=bias, weight_bits=weight_bits,
                         activation_bits=activation_bits, per_channel=per_channel,
                         symmetric=symmetric, reduce_range=reduce_range, act_signed=act_signed,
                         activation=activation, output_quant=output_quant)

    def _op(self, x, w, b):
        return conv_nd(x, w, b, self)

    @classmethod
    def from_float(cls, conv: nn.Module, **quant) -> QuantConv:
        """Same hyper-parameters as ``conv``; weight quantized, bias copied (act qparams unset).

        Called on :class:`QuantConv` itself, the subclass matching ``conv``'s rank is used."""
        if cls.dims == 0:
            cls = quant_class(conv)
        elif quant_class(conv) is not cls:
            raise TypeError(f"{cls.__name__}.from_float needs a {cls.dims}-d conv, got "
                            f"{type(conv).__name__}")
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                bias=conv.bias is not None, **quant)
        q.set_weight(conv.weight.detach())
        if conv.bias is not None:
            q.bias.data.copy_(conv.bias.detach())
        return q

    def artifact_config(self) -> dict:
        return {
            "in_channels": self.in_channels, "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size), "stride": list(self.stride),
            "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
            "dilation": list(self.dilation), "groups": self.groups, **self._quant_config(),
        }

    @classmethod
    def from_artifact(cls, config: dict) -> QuantConv:
        c = dict(config)
        return cls(c.pop("in_channels"), c.pop("out_channels"), tuple(c.pop("kernel_size")),
                   stride=tuple(c.pop("stride")), dilation=tuple(c.pop("dilation")),
                   padding=c["padding"] if isinstance(c["padding"], str) else tuple(c["padding"]),
                   **{k: v for k, v in c.items() if k != "padding"})


def conv_nd(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, conv) -> torch.Tensor:
    """``conv``'s convolution (any rank, zero padding) with weight ``w`` and bias ``b``."""
    fn = _CONV_FUNCTIONS[len(conv.kernel_size)]
    return fn(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)


@register_module_type
class QuantConv1d(QuantConv):
    """Conv1d with int8 per-channel weights (ONNX Runtime: QLinearConv on a 1-D kernel)."""

    dims = 1


@register_module_type
class QuantConv2d(QuantConv):
    """Conv2d with int8 per-channel weights and fake-quantized input/output activations."""

    dims = 2


@register_module_type
class QuantConv3d(QuantConv):
    """Conv3d with int8 per-channel weights (ONNX Runtime: QLinearConv on a 3-D kernel)."""

    dims = 3


@register_module_type
class QuantLinear(_QuantLayer):
    """Linear with int8 per-channel weights and fake-quantized input/output activations."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True,
                 weight_bits: int = 8, activation_bits: int = 8, per_channel: bool = True,
                 symmetric: bool = True, reduce_range: bool = False, act_signed: bool = False,
                 activation: str = "none", output_quant: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_quant((out_features, in_features), has_bias=bias, weight_bits=weight_bits,
                         activation_bits=activation_bits, per_channel=per_channel,
                         symmetric=symmetric, reduce_range=reduce_range, act_signed=act_signed,
                         activation=activation, output_quant=output_quant)

    def _op(self, x, w, b):
        return F.linear(x, w, b)

    @classmethod
    def from_float(cls, linear: nn.Linear, **quant) -> QuantLinear:
        q = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, **quant)
        q.set_weight(linear.weight.detach())
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach())
        return q

    def artifact_config(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features,
                **self._quant_config()}

    @classmethod
    def from_artifact(cls, config: dict) -> QuantLinear:
        c = dict(config)
        return cls(c.pop("in_features"), c.pop("out_features"), **c)


# Float layer type -> its static int8 twin, a live view of the layer specs (lighten.layers:
# LayerSpec.static_quant). Everything else a quantizer meets stays float. isinstance semantics:
# a user subclass of nn.Conv1d (same math) quantizes like nn.Conv1d.
QUANT_CLASSES: Mapping[type[nn.Module], type[_QuantLayer]] = quant_classes_view()
QUANTIZABLE = static_quant_types()  # the built-in ones; quant_class() also sees registered specs


def quant_class(layer: nn.Module) -> type[_QuantLayer]:
    """The Quant* class for float ``layer`` (its spec's, or its nearest base class's)."""
    for float_type in type(layer).__mro__:
        cls = QUANT_CLASSES.get(float_type)
        if cls is not None:
            return cls
    raise TypeError(f"{type(layer).__name__} has no static int8 form; quantizable: "
                    + ", ".join(t.__name__ for t in QUANT_CLASSES))


@register_module_type
class QuantAct(nn.Module):
    """An activation (or identity) followed by per-tensor fake quantization.

    Replaces a ReLU module that follows a residual add, so the add's result is quantized
    once and ONNX Runtime can run the add as QLinearAdd.
    """

    def __init__(self, *, activation: str = "relu", activation_bits: int = 8,
                 act_signed: bool = False):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.activation, self.activation_bits, self.act_signed = (
            activation, activation_bits, act_signed)
        self.weight_bits = None  # no weights; the energy model reads this attribute
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = apply_activation(x, self.activation)
        spec = activation_spec(self.activation_bits, self.act_signed)
        return fake_quantize(x, self.scale, self.zero_point, spec)

    def artifact_config(self) -> dict:
        return {"activation": self.activation, "activation_bits": self.activation_bits,
                "act_signed": self.act_signed}

    @classmethod
    def from_artifact(cls, config: dict) -> QuantAct:
        return cls(**config)

    def extra_repr(self) -> str:
        return f"{self.activation}, a{self.activation_bits}"


@register_module_type
class QuantOutput(nn.Module):
    """A float module (sigmoid, average pool) followed by per-tensor fake quantization.

    Placed where a functional op reads the module's result (an SE gate's multiply, a concat
    after a pool): with its input dequantized and its output quantized, ONNX Runtime runs the
    module as an integer kernel (QLinearSigmoid, QLinearAveragePool, ...) and the op after it
    sees int8 too. ``module`` is the original layer, kept as a child.
    """

    def __init__(self, module: nn.Module | None = None, *, activation_bits: int = 8,
                 act_signed: bool = False):
        super().__init__()
        self.module = module if module is not None else nn.Identity()
        self.activation_bits, self.act_signed = activation_bits, act_signed
        self.weight_bits = None  # no weights; the energy model reads this attribute
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = activation_spec(self.activation_bits, self.act_signed)
        return fake_quantize(self.module(x), self.scale, self.zero_point, spec)

    def artifact_config(self) -> dict:
        return {"activation_bits": self.activation_bits, "act_signed": self.act_signed}

    @classmethod
    def from_artifact(cls, config: dict) -> QuantOutput:
        return cls(**config)  # the edit log puts the original module back as ``module``

    def extra_repr(self) -> str:
        return f"a{self.activation_bits}"
