"""Non-uniform weight levels: powers of two, ``ŵ = sign · s · 2^-k`` (k = 0 .. 2^(b-1)-2) or 0.

Logarithmic levels (Miyashita et al., 2016) are dense near zero, where bell-shaped weights
crowd, and coarse near the largest magnitude. A ``b``-bit code ``c`` in ``[-L, L]``,
``L = 2^(b-1) - 1``, means ``sign(c) · 2^(|c| - L)`` times the group's scale (0 means 0;
codes sort like their values), so codes live in the same int8 containers as uniform weights
and the artifact bit-packs them the same way. Rounding picks the nearest *level*, not the
nearest exponent: between ``2^e`` and ``2^(e+1)`` the boundary is their midpoint ``1.5 · 2^e``,
not the geometric mean.

``quant.weight_only: {levels: pow2}`` stores :class:`Pow2Linear` / :class:`Pow2Conv2d`; ONNX
decodes with a Gather from the ``2L + 1`` level table times the scale.
"""

from __future__ import annotations

import torch

from lighten.errors import UnsupportedError
from lighten.modules import register_module_type
from lighten.quant.weight_only import WeightOnlyConfig, WeightOnlyConv2d, WeightOnlyLinear

_MIN_SCALE = 2.0**-14  # smallest normal float16: scales are stored in half precision
_ONNX_FLOAT, _ONNX_INT64 = 1, 7


def max_code(bits: int) -> int:
    """``L = 2^(bits-1) - 1``: codes are ``-L .. L`` (``L`` magnitudes per sign, plus 0)."""
    if not 2 <= bits <= 8:
        raise UnsupportedError(f"power-of-two levels need bits from 2 to 8, got {bits}")
    return 2 ** (bits - 1) - 1


def level_table(bits: int) -> torch.Tensor:
    """Level of every code, indexed by ``code + L``: ``[-1, -1/2, .., 0, .., 1/2, 1]``."""
    top = max_code(bits)
    codes = torch.arange(-top, top + 1)
    return torch.where(codes == 0, 0.0, codes.sign() * torch.exp2(codes.abs() - top)).float()


def pow2_quantize(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (int32) of the level nearest to ``x / scale`` (``scale`` broadcasts against x)."""
    top = max_code(bits)
    m = (x.float() / scale.float()).abs()
    mantissa, exponent = torch.frexp(m)  # m = mantissa · 2^exponent, mantissa in [0.5, 1)
    nearest = exponent - 1 + (mantissa >= 0.75).int()  # exponent of the nearest power of two
    k = (-nearest).clamp(min=0)  # above 1 the nearest level is 1 (k = 0)
    smallest = 2.0 ** (1 - top)
    code = torch.where(k <= top - 1, top - k, torch.where(m >= smallest / 2, 1, 0))
    code = torch.where(m == 0, 0, code)
    return (code * torch.where(x < 0, -1, 1)).int()


def pow2_dequantize(codes: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """``scale · level(code)`` in float32."""
    return level_table(bits)[codes.long() + max_code(bits)] * scale.float()


def pow2_rtn(weight: torch.Tensor, *, group_size: int, bits: int, phases: int = 8):
    """Nearest power-of-two level per weight, one scale per (row, group of columns):
    ``(codes, scale, zero_point)`` shaped like :func:`lighten.quant.weight_only.rtn_quantize`
    (zero points are all 0).

    A log grid is scale-invariant up to its phase, so the scale is searched among ``phases``
    values ``amax · 2^(-j / phases)`` (the largest weight at or a little above level 1) for the
    smallest squared error of the group.
    """
    w = weight.detach().float()
    rows, cols = w.shape
    groups = -(-cols // group_size)
    padded = torch.zeros(rows, groups * group_size)
    padded[:, :cols] = w
    blocks = padded.reshape(rows, groups, group_size)
    amax = blocks.abs().amax(dim=2)  # (rows, groups)
    best_err = torch.full_like(amax, float("inf"))
    scale = torch.ones_like(amax)
    for j in range(phases):
        cand = (amax * 2.0 ** (-j / phases)).clamp_min(_MIN_SCALE).half().float()
        err = (pow2_dequantize(pow2_quantize(blocks, cand[..., None], bits), cand[..., None],
                               bits) - blocks).pow(2).sum(dim=2)
        better = err < best_err
        scale, best_err = torch.where(better, cand, scale), torch.where(better, err, best_err)
    codes = pow2_quantize(blocks, scale[..., None], bits).reshape(rows, -1)[:, :cols]
    return codes, scale, torch.zeros(rows, groups, dtype=torch.int32)


def checked_config(cfg: WeightOnlyConfig) -> WeightOnlyConfig:
    """The config pow2 levels run with: round-to-nearest, symmetric. The default method (gptq)
    becomes rtn; an explicit other method or ``symmetric: false`` is refused."""
    if cfg.method != "rtn" and "method" in cfg.model_fields_set:
        raise UnsupportedError(f"quant.weight_only levels: pow2 supports method: rtn only, not "
                               f"{cfg.method}; set method: rtn or levels: uniform")
    if not cfg.symmetric:
        raise UnsupportedError("quant.weight_only levels: pow2 is symmetric (no zero point); "
                               "remove symmetric: false or use levels: uniform")
    return cfg.model_copy(update={"method": "rtn"})


class _DecodePow2(torch.autograd.Function):
    """(codes int8 (out, G, gs), scale (out, G)) -> float weight of ``shape``.

    ONNX: Gather from the level table, times the scale. The codes pass through an identity
    DequantizeLinear first, which the exporter's constant folding leaves alone, so the file
    keeps the int8 codes instead of a pre-decoded float weight.
    """

    @staticmethod
    def forward(ctx, codes, scale, bits: int, cols: int, shape: list[int]):
        w = pow2_dequantize(codes, scale[..., None], bits)
        return w.reshape(w.shape[0], -1)[:, :cols].reshape(shape)

    @staticmethod
    def symbolic(g, codes, scale, bits: int, cols: int, shape: list[int]):
        def const(values, dtype=torch.int64):
            return g.op("Constant", value_t=torch.tensor(values, dtype=dtype))

        out, groups, size = codes.type().sizes()
        as_float = g.op("DequantizeLinear", codes, const(1.0, torch.float32),
                        const(0, torch.int8))
        index = g.op("Cast", g.op("Add", as_float, const(float(max_code(bits)), torch.float32)),
                     to_i=_ONNX_INT64)
        levels = g.op("Gather", g.op("Constant", value_t=level_table(bits)), index, axis_i=0)
        s = g.op("Unsqueeze", g.op("Cast", scale, to_i=_ONNX_FLOAT), const([2]))
        w = g.op("Reshape", g.op("Mul", levels, s), const([out, groups * size]))
        if groups * size != cols:
            w = g.op("Slice", w, const([0]), const([cols]), const([1]))
        return g.op("Reshape", w, const(list(shape)))


class _Pow2Decode:
    """Mixin: the storage of the uniform weight-only layers, decoded as power-of-two codes."""

    def dequantized_weight(self) -> torch.Tensor:
        return _DecodePow2.apply(self.weight_int, self.weight_scale, self.bits, self.cols,
                                 self.weight_shape)

    def extra_repr(self) -> str:
        return f"pow2 levels, {super().extra_repr()}"


@register_module_type
class Pow2Linear(_Pow2Decode, WeightOnlyLinear):
    """Linear with power-of-two weight levels (codes in int8, one float16 scale per group)."""


@register_module_type
class Pow2Conv2d(_Pow2Decode, WeightOnlyConv2d):
    """Conv2d with power-of-two weight levels (groups over the im2col columns)."""


POW2_TYPES = {WeightOnlyLinear: Pow2Linear, WeightOnlyConv2d: Pow2Conv2d}
