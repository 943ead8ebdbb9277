"""Nested (any-precision) weight quantization: one set of ``B``-bit integer codes whose top
``b`` bits are the ``b``-bit model (Any-Precision DNN, Yu et al. 2021; Matryoshka Quantization,
Nair et al. 2025).

Grid: mid-rise, ``w_b = (c_b + 0.5) * s_b`` with ``c_b = c >> (B - b)`` (arithmetic shift:
the two's-complement top ``b`` bits of the stored code ``c``). Why mid-rise: the ``b``-bit
code ``t`` covers the stored codes ``[t 2^k, (t+1) 2^k)`` (``k = B - b``), whose centre on the
``(c + 0.5)`` grid is exactly ``(t + 0.5) 2^k``: truncating is rounding to the centre of the
coarser bin, so no width pays the half-step bias plain truncation has. Each width keeps its
own per-channel scale ``s_b`` (learned), so the narrow grids are not forced to ``2^k s_B``.

Training (:class:`NestedTrainer`): master float weights, a learned per-channel scale ``s`` of
the stored grid and per-width ratios ``r_b`` (both as logs);
``w_b = (floor(floor(w / s) / 2^k) + 0.5) 2^k s r_b`` with straight-through floors, so the
scale gradient is LSQ's quantization residual.
Storage (:class:`NestedQuantLinear` / :class:`NestedQuantConv`): int8 ``codes`` + float32
``scales`` (one row per trained width); :class:`PrecisionBatchNorm` keeps one BatchNorm per
width (the activations' statistics differ between 8 and 2 bits).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lighten.errors import UnsupportedError
from lighten.modules import register_module_type
from lighten.quant.lsq import grad_scale
from lighten.quant.weight_only import from_config, int_range

MAX_BITS = 8  # codes live in int8
_CONVS = {1: (nn.Conv1d, F.conv1d), 2: (nn.Conv2d, F.conv2d), 3: (nn.Conv3d, F.conv3d)}
_BNS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_CLIPS = torch.linspace(0.3, 1.0, 15)  # candidate clip ratios of max|w| for the initial scale


def truncate(codes: Tensor, stored: int, bits: int) -> Tensor:
    """The top ``bits`` of ``stored``-bit two's-complement codes (int8 in, int8 out)."""
    return codes >> (stored - bits)


def _per_row(t: Tensor, like: Tensor) -> Tensor:
    return t.reshape(-1, *([1] * (like.dim() - 1)))


def _floor_ste(x: Tensor) -> Tensor:
    return x + (torch.floor(x) - x).detach()


class _Switchable:
    """A module that computes at one of ``bits`` (its ``active`` width)."""

    bits: list[int]
    active: int

    def _index(self, bits: int | None) -> int:
        bits = self.active if bits is None else bits
        if bits not in self.bits:
            raise UnsupportedError(f"bits={bits} is not one of this layer's trained precisions "
                                   f"{self.bits}")
        return self.bits.index(bits)


# ----------------------------------------------------------------------------- training


def initial_scales(weight: Tensor, bits: list[int]) -> tuple[Tensor, Tensor]:
    """(scale (out,), ratios (len(bits), out)): per output channel, the clip ratio of max|w|
    minimizing ``sum_b err_b / min err_b`` (each width's relative error against the best that
    width could reach alone, so 8 bits is not clipped to suit 2 bits), and each width's
    least-squares ratio on that grid."""
    w = weight.detach().float().reshape(weight.shape[0], -1)  # (out, n)
    stored = bits[0]
    lo, hi = int_range(stored)
    amax = w.abs().amax(1).clamp_min(1e-12)
    energy = w.pow(2).sum(1).clamp_min(1e-30)
    errors, scales, ratios = [], [], []
    for clip in _CLIPS:
        scale = clip * amax / 2 ** (stored - 1)
        codes = torch.clamp(torch.floor(w / scale[:, None]), lo, hi)
        err, rs = [], []
        for b in bits:
            step = 2.0 ** (stored - b)
            base = (torch.floor(codes / step) + 0.5) * step * scale[:, None]
            r = (w * base).sum(1) / base.pow(2).sum(1).clamp_min(1e-30)
            err.append((w - r[:, None] * base).pow(2).sum(1) / energy)
            rs.append(r)
        errors.append(torch.stack(err))
        scales.append(scale)
        ratios.append(torch.stack(rs))
    errors = torch.stack(errors)  # (clips, widths, out)
    pick = (errors / errors.amin(0, keepdim=True).clamp_min(1e-30)).sum(1).argmin(0)  # (out,)
    rows = torch.arange(w.shape[0])
    return torch.stack(scales)[pick, rows], torch.stack(ratios)[pick, :, rows].T


class NestedTrainer(nn.Module, _Switchable):
    """A float Conv / Linear whose weight is fake-quantized on the nested grid at ``active``
    bits (training form; :meth:`to_storage` makes it permanent)."""

    def __init__(self, layer: nn.Module, bits: list[int]):
        super().__init__()
        self.layer, self.bits, self.active = layer, list(bits), bits[0]
        scale, ratios = initial_scales(layer.weight, self.bits)
        # logs: an optimizer step moves a scale by a fraction of itself (Adam's step is ~lr
        # whatever the gradient, and a weight scale is ~1e-3)
        self.log_scale = nn.Parameter(scale.clamp_min(1e-12).log())
        self.log_ratios = nn.Parameter(ratios.clamp_min(1e-3).log())

    def fake_weight(self, bits: int | None = None) -> Tensor:
        i = self._index(bits)
        b, stored = self.bits[i], self.bits[0]
        w = self.layer.weight
        per_scale = w[0].numel()
        lo, hi = int_range(stored)
        s = grad_scale(self.log_scale, 1 / math.sqrt(per_scale * hi)).exp()
        r = grad_scale(self.log_ratios[i], 1 / math.sqrt(per_scale * max(2 ** (b - 1) - 1,
                                                                          1))).exp()
        s, r = _per_row(s, w), _per_row(r, w)
        codes = torch.clamp(_floor_ste(w / s), lo, hi)
        step = 2.0 ** (stored - b)
        return (_floor_ste(codes / step) + 0.5) * (step * s * r)

    def forward(self, x: Tensor) -> Tensor:
        w = self.fake_weight()
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, w, self.layer.bias)
        fn = _CONVS[w.dim() - 2][1]
        c = self.layer
        return fn(x, w, c.bias, c.stride, c.padding, c.dilation, c.groups)

    @torch.no_grad()
    def to_storage(self) -> nn.Module:
        """The storage layer: the codes and each width's scale ``2^k s r_b``."""
        layer, stored = self.layer, self.bits[0]
        s = self.log_scale.exp()
        codes = torch.clamp(torch.floor(layer.weight / _per_row(s, layer.weight)),
                            *int_range(stored)).to(torch.int8)
        scales = torch.stack([2.0 ** (stored - b) * s * self.log_ratios[i].exp()
                              for i, b in enumerate(self.bits)])
        if isinstance(layer, nn.Linear):
            out = NestedQuantLinear(layer.in_features, layer.out_features, bits=self.bits,
                                    bias=layer.bias is not None)
        else:
            out = NestedQuantConv(layer.in_channels, layer.out_channels,
                                  list(layer.kernel_size), bits=self.bits,
                                  bias=layer.bias is not None, stride=list(layer.stride),
                                  padding=list(layer.padding), dilation=list(layer.dilation),
                                  groups=layer.groups)
        out.codes.copy_(codes)
        out.scales.copy_(scales.float())
        if layer.bias is not None:
            out.bias.data.copy_(layer.bias.detach())
        out.active = self.active
        return out


# ----------------------------------------------------------------------------- storage


class _NestedStorage(nn.Module, _Switchable):
    """int8 ``codes`` (the weight's shape) + float32 ``scales`` (len(bits), out) + float bias."""

    integer_weight_names = ("codes",)  # what parameter counts count (lighten.measure.params)

    def _init_storage(self, shape: list[int], bits: list[int], bias: bool) -> None:
        bits = [int(b) for b in bits]
        if not bits or bits != sorted(set(bits), reverse=True) or not 1 <= bits[-1] \
                or bits[0] > MAX_BITS:
            raise UnsupportedError(f"nested quantization bits must be distinct integers from 1 "
                                   f"to {MAX_BITS} in decreasing order, got {bits}")
        self.bits, self.active = bits, bits[0]
        self.register_buffer("codes", torch.zeros(shape, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(len(bits), shape[0]))
        self.bias = nn.Parameter(torch.zeros(shape[0])) if bias else None

    @property
    def stored_bits(self) -> int:
        return self.bits[0]

    def codes_at(self, bits: int | None = None) -> Tensor:
        """The ``bits``-bit codes (int8): the top bits of the stored codes."""
        return truncate(self.codes, self.stored_bits, self.bits[self._index(bits)])

    def weight_at(self, bits: int | None = None) -> Tensor:
        """The float weight of the ``bits``-bit model: ``(codes_at(bits) + 0.5) * scale``."""
        i = self._index(bits)
        codes = self.codes_at(self.bits[i])
        return (codes.float() + 0.5) * _per_row(self.scales[i], codes)

    def quant_facts(self):
        from lighten.quant.layer_report import QuantFacts

        return QuantFacts(weight_bits=self.active, activation_bits="float",
                          granularity="per-channel",
                          weight_scale=self.scales[self._index(None)].detach())

    def extra_repr(self) -> str:
        return f"nested bits={self.bits}, active={self.active}"


@register_module_type
class NestedQuantLinear(_NestedStorage):
    """Linear whose weight is the active width's view of nested int8 codes."""

    def __init__(self, in_features: int, out_features: int, *, bits: list[int],
                 bias: bool = True, active: int | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_storage([out_features, in_features], bits, bias)
        self.active = self.bits[0] if active is None else int(active)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight_at(), self.bias)

    def to_float(self, bits: int | None = None) -> nn.Linear:
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        return _fill(layer, self, bits)

    def artifact_config(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bits": self.bits, "bias": self.bias is not None, "active": self.active}

    @classmethod
    def from_artifact(cls, config: dict) -> NestedQuantLinear:
        return from_config(cls, config, "in_features", "out_features")


@register_module_type
class NestedQuantConv(_NestedStorage):
    """Conv1d/2d/3d (zero padding) whose weight is the active width's view of nested codes."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: list[int], *,
                 bits: list[int], bias: bool = True, stride=1, padding=0, dilation=1,
                 groups: int = 1, active: int | None = None):
        super().__init__()
        dims = len(kernel_size)
        if dims not in _CONVS:
            raise UnsupportedError(f"NestedQuantConv: {dims}-d kernels are not supported")

        def tup(v):
            return tuple(int(d) for d in v) if isinstance(v, list | tuple) else (int(v),) * dims

        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride = tup(kernel_size), tup(stride)
        self.padding, self.dilation = tup(padding), tup(dilation)
        self._init_storage([out_channels, in_channels // groups, *self.kernel_size], bits, bias)
        self.active = self.bits[0] if active is None else int(active)

    def forward(self, x: Tensor) -> Tensor:
        fn = _CONVS[len(self.kernel_size)][1]
        return fn(x, self.weight_at(), self.bias, self.stride, self.padding, self.dilation,
                  self.groups)

    def to_float(self, bits: int | None = None) -> nn.Module:
        cls = _CONVS[len(self.kernel_size)][0]
        layer = cls(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                    padding=self.padding, dilation=self.dilation, groups=self.groups,
                    bias=self.bias is not None)
        return _fill(layer, self, bits)

    def artifact_config(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "bits": self.bits,
                "bias": self.bias is not None, "stride": list(self.stride),
                "padding": list(self.padding), "dilation": list(self.dilation),
                "groups": self.groups, "active": self.active}

    @classmethod
    def from_artifact(cls, config: dict) -> NestedQuantConv:
        return from_config(cls, config, "in_channels", "out_channels", "kernel_size")


@torch.no_grad()
def _fill(layer: nn.Module, nested: _NestedStorage, bits: int | None) -> nn.Module:
    layer.weight.copy_(nested.weight_at(bits))
    if nested.bias is not None:
        layer.bias.copy_(nested.bias)
    return layer.eval()


# ----------------------------------------------------------------------------- batch norm


@register_module_type
class PrecisionBatchNorm(nn.Module, _Switchable):
    """One BatchNorm (statistics and affine) per width; the active width's one runs."""

    def __init__(self, num_features: int, *, bits: list[int], dims: int = 2, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, active: int | None = None):
        super().__init__()
        if dims not in _BNS:
            raise UnsupportedError(f"PrecisionBatchNorm: dims={dims} is not 1, 2 or 3")
        self.num_features, self.dims, self.bits = num_features, dims, [int(b) for b in bits]
        self.active = self.bits[0] if active is None else int(active)
        self.bns = nn.ModuleList(_BNS[dims](num_features, eps=eps, momentum=momentum,
                                            affine=affine,
                                            track_running_stats=track_running_stats)
                                 for _ in self.bits)

    @classmethod
    def from_bn(cls, bn: nn.modules.batchnorm._BatchNorm, bits: list[int]) -> PrecisionBatchNorm:
        dims = next(d for d, c in _BNS.items() if type(bn) is c)
        out = cls(bn.num_features, bits=bits, dims=dims, eps=bn.eps, momentum=bn.momentum,
                  affine=bn.affine, track_running_stats=bn.track_running_stats)
        for copy_ in out.bns:
            copy_.load_state_dict(bn.state_dict())
        return out.train(bn.training)

    def forward(self, x: Tensor) -> Tensor:
        return self.bns[self._index(None)](x)

    def to_float(self, bits: int | None = None) -> nn.Module:
        return copy.deepcopy(self.bns[self._index(bits)]).eval()

    def artifact_config(self) -> dict[str, Any]:
        bn = self.bns[0]
        return {"num_features": self.num_features, "bits": self.bits, "dims": self.dims,
                "eps": bn.eps, "momentum": bn.momentum, "affine": bn.affine,
                "track_running_stats": bn.track_running_stats, "active": self.active}

    @classmethod
    def from_artifact(cls, config: dict) -> PrecisionBatchNorm:
        return from_config(cls, config, "num_features")


def is_switchable(module: nn.Module) -> bool:
    return isinstance(module, _Switchable)


def bn_dims(module: nn.Module) -> int | None:
    """1/2/3 for an exact BatchNorm1d/2d/3d (what PrecisionBatchNorm replaces), else None."""
    return next((d for d, c in _BNS.items() if type(module) is c), None)


def nestable(module: nn.Module) -> bool:
    """An exact Linear, or an exact Conv1d/2d/3d with zero padding (what nested layers hold)."""
    if type(module) is nn.Linear:
        return True
    return type(module) in (c for c, _ in _CONVS.values()) and module.padding_mode == "zeros" \
        and not isinstance(module.padding, str)
