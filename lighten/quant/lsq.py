"""Fake quantization for training: straight-through rounding and learned step size (LSQ).

LSQ (Esser et al., ICLR 2020, "Learned Step Size Quantization") treats the scale ``s`` as a
parameter. With ``v = clamp(x / s + z, qmin, qmax)`` and ``x_hat = (round(v) - z) * s`` and a
straight-through ``round``, autograd gives exactly the paper's gradients:

* ``d x_hat / d x = 1`` inside the range, ``0`` outside (the clamp);
* ``d x_hat / d s = round(x / s) - x / s`` inside, ``qmin - z`` below, ``qmax - z`` above.

The scale gradient is multiplied by ``g = 1 / sqrt(n * qmax)`` (``n``: values sharing one scale)
so scales and weights learn at comparable rates.

:class:`LearnedFakeQuant` learns ``log s``, not ``s``: a raw scale trained by the shared SGD loop
(momentum, weight decay, lr ~1e-2) takes absolute steps far larger than an 8-bit weight scale
(~1e-3) and was driven negative or 30x too large in a few steps (ResNet-20, Fashion-MNIST),
breaking the model and its ONNX export. In log space every step is relative (``s`` changes by
a factor ``exp(-lr * s * g * dL/ds)``, so a scale's step shrinks with the scale), the scale
stays positive by construction, and the same optimizer serves weights and scales. (Dropping the
factor ``s``, a step of ``exp(-lr * g * dL/ds)``, measured worse at 8 bits: 91.4% against
93.2% on the ResNet-20 check.) The shared loop keeps weight
decay off the scales (:meth:`LearnedFakeQuant.no_weight_decay`): decay would pull ``log s``
towards 0, ``s`` towards 1.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lighten.quant.quantizer import QuantSpec

_TINY = torch.finfo(torch.float32).tiny


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
    The parameter is ``log_scale`` (``scale`` is its exp); only the converted integer layers,
    which store the scale itself, reach artifacts and ONNX, and a state dict that still holds
    ``scale`` (a training checkpoint from before) loads.
    """

    def __init__(self, spec: QuantSpec, scale: torch.Tensor, zero_point: torch.Tensor, *,
                 learn: bool = True, batched: bool = False):
        super().__init__()
        self.qmin, self.qmax, self.axis = spec.qmin, spec.qmax, spec.axis
        self.batched = batched  # activations: dim 0 is the batch, N counts features per sample
        self.learn = learn
        s = scale.detach().float().clamp_min(_TINY).clone()
        # LSQ learns log s (positive, relative steps, module docstring); STE keeps s itself
        self.log_scale = nn.Parameter(s.log(), requires_grad=learn)
        self.register_buffer("zero_point", zero_point.detach().to(torch.int32).clone())

    def no_weight_decay(self) -> list[nn.Parameter]:
        """Parameters :func:`lighten.training.train` must not decay: the learned log-scale."""
        return [self.log_scale] if self.learn else []

    @property
    def scale(self) -> torch.Tensor:
        """The step size ``exp(log_scale)`` (differentiable when learned)."""
        return self.log_scale.exp() if self.learn else self.log_scale.detach().exp()

    def set_scale(self, scale: torch.Tensor) -> None:
        """Overwrite the step size (plain QAT's min/max weight scales follow the weights)."""
        with torch.no_grad():
            self.log_scale.copy_(scale.reshape(self.log_scale.shape).float()
                                 .clamp_min(_TINY).log())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        old = state_dict.pop(prefix + "scale", None)  # files written before log_scale
        if old is not None and prefix + "log_scale" not in state_dict:
            state_dict[prefix + "log_scale"] = old.float().clamp_min(_TINY).log()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.learn:
            return fake_quant_ste(x, self.scale, self.zero_point, self.qmin, self.qmax,
                                  axis=self.axis)
        values = x[0].numel() if self.batched and x.dim() > 1 else x.numel()
        g = lsq_gradient_scale(values // max(self.log_scale.numel(), 1), self.qmax)
        # d/d(log s) = s * g * dL/ds (chain rule): a step moves s by a factor, never past 0
        return fake_quant_ste(x, self.log_scale.exp(), self.zero_point, self.qmin, self.qmax,
                              axis=self.axis, g=g)

    def quantize_int(self, x: torch.Tensor) -> torch.Tensor:
        """The integer codes (int32) of ``x`` on this quantizer's grid."""
        with torch.no_grad():
            s = self.scale.detach().clamp_min(_TINY)
            z = self.zero_point.float()
            if s.dim() == 1 and s.numel() > 1:
                shape = [1] * x.dim()
                shape[self.axis] = -1
                s, z = s.reshape(shape), z.reshape(shape)
            return torch.clamp(torch.round(x / s) + z, self.qmin, self.qmax).to(torch.int32)

    def extra_repr(self) -> str:
        kind = "lsq" if self.learn else "fixed"
        return f"[{self.qmin}, {self.qmax}], {kind}, scales={self.scale.numel()}"
