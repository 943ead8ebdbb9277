"""Our group-wise low-bit weights as ONNX Runtime's ``com.microsoft.MatMulNBits`` operands.

``MatMulNBits(A, B, scales, zero_points)`` computes ``A @ dequant(B)ᵀ`` with B blocked along K
(the input axis) and each block dequantized as ``(code - zero_point) * scale``:

* ``B``: uint8 ``(N, k_blocks, block_size * bits / 8)``, codes packed low bits first
  (4-bit: element ``2i`` in the low nibble, ``2i + 1`` in the high one);
* ``scales``: ``(N * k_blocks,)`` in A's dtype (float32 here; ours are float16, so exact);
* ``zero_points``: uint8, packed the same way per row: ``(N * ceil(k_blocks * bits / 8),)``;
* attributes ``K``, ``N``, ``bits``, ``block_size`` (a power of two, at least 16).

:class:`~lighten.quant.weight_only.WeightOnlyLinear` stores signed codes ``q`` in
``[-2^(b-1), 2^(b-1) - 1]`` and signed zero points per (row, group); adding ``2^(p-1)`` to both
(``p`` the packed width: 4 for 2..4-bit weights, 8 for 5..8-bit) gives the unsigned codes with the
same ``(q - z) * s``, so the ORT weights are *exactly* ours: 3-bit weights are a sub-range of
the 4-bit grid. The padded tail of the last group (K not a multiple of the group) is never read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lighten.quant.weight_only import WeightOnlyLinear


def packed_bits(bits: int) -> int | None:
    """The MatMulNBits width our ``bits``-bit codes travel in (None: not representable)."""
    return 4 if 2 <= bits <= 4 else 8 if 5 <= bits <= 8 else None


def supports_nbits(layer: nn.Module) -> bool:
    """A weight-only Linear whose groups MatMulNBits can hold (power-of-two group >= 16)."""
    if not isinstance(layer, WeightOnlyLinear) or packed_bits(layer.bits) is None:
        return False
    size = layer.stored_group_size
    return size >= 16 and size & (size - 1) == 0


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``(..., n)`` -> bytes ``(..., ceil(n * bits / 8))``, low bits first."""
    if bits == 8:
        return codes.to(torch.uint8)
    if codes.shape[-1] % 2:
        codes = F.pad(codes, (0, 1))
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def _unpack(data: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`_pack`: int64 codes ``(..., n)``."""
    if bits == 8:
        return data.long()[..., :n]
    d = data.long()
    return torch.stack([d & 15, d >> 4], dim=-1).flatten(-2)[..., :n]


def pack_nbits(layer: WeightOnlyLinear) -> dict:
    """``{b, scales, zero_points, K, N, bits, block_size}`` of ``layer`` for MatMulNBits."""
    bits = packed_bits(layer.bits)
    offset = 2 ** (bits - 1)
    q = layer.weight_int.to(torch.int32) + offset  # (N, k_blocks, block), unsigned
    z = layer.weight_zero_point.to(torch.int32) + offset  # (N, k_blocks)
    n, blocks, size = q.shape
    return {"b": _pack(q, bits).contiguous(), "scales": layer.weight_scale.float().reshape(-1),
            "zero_points": _pack(z, bits).reshape(-1).contiguous(), "K": layer.cols, "N": n,
            "bits": bits, "block_size": size}


def dequantize_nbits(b: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, *,
                     K: int, N: int, bits: int, block_size: int) -> torch.Tensor:  # noqa: N803
    """The float ``(N, K)`` weight MatMulNBits computes with (its reference semantics)."""
    blocks = b.shape[1]
    codes = _unpack(b, bits, block_size)  # (N, blocks, block)
    zeros = _unpack(zero_points.reshape(N, -1), bits, blocks)  # (N, blocks)
    w = (codes - zeros[..., None]).float() * scales.reshape(N, blocks, 1)
    return w.reshape(N, -1)[:, :K]


def int8_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """``x`` rounded as MatMulNBits ``accuracy_level`` 4 rounds its input before the integer
    kernel: symmetric int8, one scale (largest magnitude / 127) per block of ``block_size``
    along the last axis (ORT 1.32 agrees to float rounding, ~1e-6 of the output)."""
    k = x.shape[-1]
    pad = -k % block_size
    blocks = F.pad(x, (0, pad)).reshape(*x.shape[:-1], -1, block_size)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    rounded = torch.round(blocks / scale) * scale
    return rounded.reshape(*x.shape[:-1], -1)[..., :k]


class _MatMulNBits(torch.autograd.Function):
    """``x @ dequant(B)ᵀ``; exports as one ``com.microsoft::MatMulNBits`` node."""

    @staticmethod
    def forward(ctx, x, b, scales, zero_points, K, N, bits, block_size, accuracy):  # noqa: N803
        w = dequantize_nbits(b, scales, zero_points, K=K, N=N, bits=bits, block_size=block_size)
        if accuracy == 4:
            x = int8_blocks(x, block_size)
        return F.linear(x, w)

    @staticmethod
    def symbolic(g, x, b, scales, zero_points, K, N, bits, block_size, accuracy):  # noqa: N803
        y = g.op("com.microsoft::MatMulNBits", x, b, scales, zero_points, K_i=K, N_i=N,
                 bits_i=bits, block_size_i=block_size, accuracy_level_i=accuracy)
        sizes = x.type().varyingSizes()  # the exporter cannot infer a contrib op's shape
        if sizes is not None:
            y.setType(x.type().with_sizes([*sizes[:-1], N]))
        return y


class NBitsLinear(nn.Module):
    """Export form of a :class:`WeightOnlyLinear` (and AWQ's input scale): packed buffers that
    become the MatMulNBits initializers. ``accuracy_level`` 0 computes in float32 (matches
    PyTorch); 4 lets ORT quantize the activations to int8 per block (faster, not exact)."""

    def __init__(self, layer: WeightOnlyLinear, *, accuracy_level: int = 0):
        super().__init__()
        packed = pack_nbits(layer)
        for key in ("b", "scales", "zero_points"):
            self.register_buffer(key, packed.pop(key))
        self.meta, self.accuracy_level = packed, accuracy_level
        scale = getattr(layer, "input_scale", None)
        self.register_buffer("input_scale", None if scale is None else scale.detach().clone())
        self.bias = layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = x * self.input_scale
        m = self.meta
        y = _MatMulNBits.apply(x, self.b, self.scales, self.zero_points, m["K"], m["N"],
                               m["bits"], m["block_size"], self.accuracy_level)
        return y if self.bias is None else y + self.bias
