"""Uniform affine quantization: ``q = clamp(round(x / s) + z, qmin, qmax)``, ``x ~ (q - z) * s``.

Every bit width from 2 to 8 lives in an int8 (signed) or uint8 (unsigned) container: narrower
widths only narrow ``[qmin, qmax]``, so the deployed ONNX file still uses QuantizeLinear /
DequantizeLinear with 8-bit types.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lighten.errors import UnsupportedError

# ONNX QuantizeLinear only knows these two 8-bit ranges; narrower ones clamp first.
_ONNX_RANGES = {True: (-128, 127), False: (0, 255)}


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    ``symmetric`` + ``signed`` uses the narrow range ``[-(2^(b-1)-1), 2^(b-1)-1]`` with zero point
    0, so the int8 weight never holds -128 (keeps products symmetric). ``reduce_range`` drops one
    bit of the range: x86 U8S8 kernels (``vpmaddubsw``) can saturate with full 8-bit weights.
    """

    bits: int = 8
    symmetric: bool = True
    per_channel: bool = False
    axis: int = 0
    signed: bool = True
    reduce_range: bool = False

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise UnsupportedError(
                f"quantization bits={self.bits} is not supported; use an integer from 2 to 8"
            )

    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        return -self.qmax if self.symmetric else -(2 ** (self._effective_bits - 1))

    @property
    def qmax(self) -> int:
        b = self._effective_bits
        return 2 ** (b - 1) - 1 if self.signed else 2**b - 1

    @property
    def container_range(self) -> tuple[int, int]:
        """The 8-bit ONNX range holding this spec (what QuantizeLinear is told)."""
        return _ONNX_RANGES[self.signed]

    @property
    def _effective_bits(self) -> int:
        return max(2, self.bits - 1) if self.reduce_range else self.bits


def compute_qparams(
    min_val: torch.Tensor, max_val: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale float32, zero_point int32) covering ``[min_val, max_val]`` and always 0.

    Works element-wise, so per-channel ranges give per-channel parameters.
    """
    min_val = torch.as_tensor(min_val, dtype=torch.float32)
    max_val = torch.as_tensor(max_val, dtype=torch.float32)
    min_val = torch.minimum(min_val, torch.zeros_like(min_val))
    max_val = torch.maximum(max_val, torch.zeros_like(max_val))
    qmin, qmax = spec.qmin, spec.qmax
    eps = torch.finfo(torch.float32).eps
    if spec.symmetric:
        amax = torch.maximum(-min_val, max_val)
        scale = (amax / ((qmax - qmin) / 2)).clamp_min(eps)
        zero = 0 if spec.signed else (qmin + qmax + 1) // 2
        zero_point = torch.full_like(scale, zero, dtype=torch.int32)
    else:
        scale = ((max_val - min_val) / (qmax - qmin)).clamp_min(eps)
        zero_point = (qmin - torch.round(min_val / scale)).clamp(qmin, qmax).to(torch.int32)
    return scale, zero_point


def _broadcast(p: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    if p.dim() == 0 or p.numel() == 1:
        return p.reshape(())
    shape = [1] * x.dim()
    shape[axis] = -1
    return p.reshape(shape)


def quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
    *, axis: int = 0,
) -> torch.Tensor:
    """Textbook ``clamp(round(x / s) + z, qmin, qmax)``, returned as int32 (caller narrows)."""
    s = _broadcast(scale.float(), x, axis)
    z = _broadcast(zero_point.float(), x, axis)
    return torch.clamp(torch.round(x / s) + z, qmin, qmax).to(torch.int32)


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, *, axis: int = 0
) -> torch.Tensor:
    """``(q - z) * s`` in float32."""
    s = _broadcast(scale.float(), q, axis)
    z = _broadcast(zero_point.float(), q, axis)
    return (q.float() - z) * s


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """Quantize-dequantize with PyTorch's fake-quant ops (exported as QuantizeLinear/Dequantize).

    Narrow ranges clamp in float first; the fake-quant op then uses the 8-bit container range,
    which gives the same numbers and stays exportable.
    """
    lo, hi = spec.container_range
    zp = zero_point.to(torch.int32)
    scale = scale.float()
    if (spec.qmin, spec.qmax) != (lo, hi):
        s = _broadcast(scale, x, spec.axis)
        z = _broadcast(zp.float(), x, spec.axis)
        x = torch.clamp(x, (spec.qmin - z) * s, (spec.qmax - z) * s)
    if spec.per_channel and scale.numel() > 1:
        return torch.fake_quantize_per_channel_affine(x, scale, zp, spec.axis, lo, hi)
    return torch.fake_quantize_per_tensor_affine(x, scale.reshape(()), zp.reshape(()), lo, hi)


def weight_qparams(weight: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max parameters of a weight, per output channel (``spec.axis``) or per tensor."""
    w = weight.detach().float()
    if spec.per_channel:
        flat = w.transpose(0, spec.axis).reshape(w.shape[spec.axis], -1)
        return compute_qparams(flat.amin(dim=1), flat.amax(dim=1), spec)
    return compute_qparams(w.min(), w.max(), spec)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (higher is better)."""
    noise = (reference - approx).float().pow(2).mean()
    signal = reference.float().pow(2).mean()
    return float(10 * torch.log10(signal / noise.clamp_min(1e-30)))
