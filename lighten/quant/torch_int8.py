"""Run a quantized model on PyTorch's x86 int8 engine instead of fake quantization.

Each QuantConv1d/2d/3d / QuantLinear becomes a ``torch.ao.nn.quantized`` Conv1d/2d/3d / Linear
between ``quantize_per_tensor`` (with the layer's calibrated input parameters) and
``dequantize``. The int8 kernel requantizes to the layer's calibrated output parameters; a ReLU /
ReLU6 needs no kernel of its own because that output range starts at 0 and ends at the observed
maximum.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lighten.errors import UnsupportedError
from lighten.quant.modules import QuantConv, _QuantLayer

_ENGINES = ("x86", "fbgemm")  # the engines with int8 conv/linear on x86 CPUs


class TorchInt8Layer(nn.Module):
    """float in -> quint8 -> int8 conv/linear (requantized) -> float out."""

    def __init__(self, qlayer: nn.Module, source: _QuantLayer):
        super().__init__()
        self.qlayer = qlayer
        spec = source.act_spec
        shift = 128 if spec.signed else 0  # quint8 holds int8 activations with zero point + 128
        self.in_scale = float(source.act_scale)
        self.in_zero_point = int(source.act_zero_point) + shift
        self.in_clamp = _narrow_clamp(spec, source.act_scale, source.act_zero_point)
        self.out_clamp = _narrow_clamp(spec, source.out_scale, source.out_zero_point)
        self.weight_bits, self.activation_bits = source.weight_bits, source.activation_bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_clamp is not None:
            x = x.clamp(*self.in_clamp)
        q = torch.quantize_per_tensor(x, self.in_scale, self.in_zero_point, torch.quint8)
        y = self.qlayer(q).dequantize()
        return y.clamp(*self.out_clamp) if self.out_clamp is not None else y


def to_torch_int8(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose Quant* layers run PyTorch int8 kernels (x86 / fbgemm engine).

    Raises UnsupportedError naming the first layer that cannot be converted.
    """
    _select_engine()
    model = copy.deepcopy(model).eval()
    for name, module in list(model.named_modules()):
        if isinstance(module, _QuantLayer):
            model.set_submodule(name, TorchInt8Layer(_convert(name, module), module))
    return model


def _convert(name: str, m: _QuantLayer) -> nn.Module:
    import torch.ao.nn.quantized as nnq

    out_shift = 128 if m.act_signed else 0
    out_scale, out_zp = float(m.out_scale), int(m.out_zero_point) + out_shift
    if isinstance(m, QuantConv):
        if isinstance(m.padding, str):
            raise UnsupportedError(f"{name}: padding={m.padding!r} has no PyTorch int8 kernel; "
                                   "use explicit integer padding in the float model")
        conv_type = {1: nnq.Conv1d, 2: nnq.Conv2d, 3: nnq.Conv3d}[m.dims]
        q = conv_type(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride,
                       padding=m.padding, dilation=m.dilation, groups=m.groups,
                       bias=m.bias is not None)
    else:
        q = nnq.Linear(m.in_features, m.out_features, bias_=m.bias is not None)
    weight = m.dequantized_weight().detach()
    if m.per_channel:
        qw = torch.quantize_per_channel(weight, m.weight_scale.double(),
                                        m.weight_zero_point.long(), 0, torch.qint8)
    else:
        qw = torch.quantize_per_tensor(weight, float(m.weight_scale),
                                       int(m.weight_zero_point), torch.qint8)
    bias = m.bias.detach().float() if m.bias is not None else None
    try:
        q.set_weight_bias(qw, bias)
    except RuntimeError as exc:
        raise UnsupportedError(f"{name}: PyTorch int8 engine rejected the layer "
                               f"({str(exc).splitlines()[0]}); deploy it with onnxruntime") from exc
    q.scale, q.zero_point = out_scale, out_zp
    return q


def _narrow_clamp(spec, scale, zero_point) -> tuple[float, float] | None:
    """Float bounds for bit widths below 8 (the int8 kernel only clamps to the 8-bit range)."""
    if (spec.qmin, spec.qmax) == spec.container_range:
        return None
    s, z = float(scale), int(zero_point)
    return ((spec.qmin - z) * s, (spec.qmax - z) * s)


def _select_engine() -> None:
    """Keep the current engine when it is an x86 one; otherwise switch to one (process-wide)."""
    if torch.backends.quantized.engine in _ENGINES:
        return
    supported = torch.backends.quantized.supported_engines
    for engine in _ENGINES:
        if engine in supported:
            torch.backends.quantized.engine = engine
            return
    raise UnsupportedError(
        f"this PyTorch build has no x86 int8 engine (supported: {supported}); deploy the "
        "quantized model with backend: onnxruntime"
    )

