"""Fake quantization for training: straight-through rounding and learned step size (LSQ).

LSQ (Esser et al., ICLR 2020, "Learned Step Size Quantization") treats the scale ``s`` as a
parameter. With ``v = clamp(x / s + z, qmin, qmax)`` and ``x_hat = (round(v) - z) * s`` and a
straight-through ``round``, autograd gives exactly the paper's gradients:

* ``d x_hat / d x = 1`` inside the range, ``0`` outside (the clamp);
* ``d x_hat / d s = round(x / s) - x / s`` inside, ``qmin - z`` below, ``qmax - z`` above.

The scale gradient is multiplied by ``g = 1 / sqrt(n * qmax)`` (``n``: values sharing one scale)
so scales and weights learn at comparable rates.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lighten.quant.quantizer import QuantSpec


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round`` forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """``x`` forward; the gradient flowing back into ``x`` is multiplied by ``g``."""
    return x * g + (x - x * g).detach()


def lsq_gradient_scale(values_per_scale: int, qmax: int) -> float:
    """Esser et al.'s ``g = 1 / sqrt(N * Q_P)``."""
    return 1.0 / math.sqrt(max(values_per_scale, 1) * max(qmax, 1))


def fake_quant_ste(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
    *, axis: int = 0, g: float = 1.0,
) -> torch.Tensor:
    """Quantize-dequantize with a straight-through estimator; ``scale`` may require grad.

    ``scale`` / ``zero_point`` are scalars (per tensor) or 1-D along ``axis`` (per channel).
    ``zero_point`` is an integer grid offset and gets no gradient.
    """
    s = grad_scale(scale, g) if scale.requires_grad else scale
    s = s.clamp_min(torch.finfo(torch.float32).tiny)  # a scale pushed to <= 0 stays valid
    z = zero_point.detach().float()
    if s.dim() == 1 and s.numel() > 1:
        shape = [1] * x.dim()
        shape[axis] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    v = torch.clamp(x / s + z, qmin, qmax)
    return (round_ste(v) - z) * s


class LearnedFakeQuant(nn.Module):
    """One quantization point for QAT: a (learned or fixed) scale and a fixed zero point.

    ``learn=True`` is LSQ; ``learn=False`` keeps the calibrated scale (plain STE fake quant).
    Weights use ``per_channel`` scales along axis 0; activations one scale per tensor.
    """

    def __init__(self, spec: QuantSpec, scale: torch.Tensor, zero_point: torch.Tensor, *,
                 learn: bool = True, batched: bool = False):
        super().__init__()
        self.qmin, self.qmax, self.axis = spec.qmin, spec.qmax, spec.axis
        self.batched = batched  # activations: dim 0 is the batch, N counts features per sample
        self.scale = nn.Parameter(scale.detach().float().clone(), requires_grad=learn)
        self.register_buffer("zero_point", zero_point.detach().to(torch.int32).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = 1.0
        if self.scale.requires_grad:
            values = x[0].numel() if self.batched and x.dim() > 1 else x.numel()
            per_scale = values // max(self.scale.numel(), 1)
            g = lsq_gradient_scale(per_scale, self.qmax)
        return fake_quant_ste(x, self.scale, self.zero_point, self.qmin, self.qmax,
                              axis=self.axis, g=g)

    def quantize_int(self, x: torch.Tensor) -> torch.Tensor:
        """The integer codes (int32) of ``x`` on this quantizer's grid."""
        with torch.no_grad():
            s = self.scale.detach().clamp_min(torch.finfo(torch.float32).tiny)
            z = self.zero_point.float()
            if s.dim() == 1 and s.numel() > 1:
                shape = [1] * x.dim()
                shape[self.axis] = -1
                s, z = s.reshape(shape), z.reshape(shape)
            return torch.clamp(torch.round(x / s) + z, self.qmin, self.qmax).to(torch.int32)

    def extra_repr(self) -> str:
        kind = "lsq" if self.scale.requires_grad else "fixed"
        return f"[{self.qmin}, {self.qmax}], {kind}, scales={self.scale.numel()}"
