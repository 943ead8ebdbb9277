"""SmoothQuant (Xiao et al., 2023): W8A8 for LLMs by moving activation outliers into weights.

LLM activations have a few channels hundreds of times larger than the rest, so one int8 scale
per tensor wastes most levels on them; weights are easy to quantize. A per-input-channel
``s_j = max|X_j|^α / max|W_j|^(1-α)`` divides the activations and multiplies the weight
columns (``α = 0.5`` splits the difficulty evenly), then the layer is quantized like
``quant.dynamic``: int8 weights per output channel, uint8 activations per tensor from each
batch's range, integer matmul (ONNX ``DynamicQuantizeLinear`` + ``MatMulInteger``).

The reference folds ``1/s`` into the preceding LayerNorm; here :class:`SmoothQuantLinear`
keeps it (``x * input_scale``), so any Linear can be smoothed.
"""

from __future__ import annotations

import torch
from torch import nn

from lighten.modules import register_module_type
from lighten.quant.dynamic import DynamicQuantLinear


def smoothing_scale(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float
                    ) -> torch.Tensor:
    """``s`` (in,) of SmoothQuant; channels that never fire keep 1."""
    w_absmax = weight.detach().abs().amax(0).float().clamp_min(1e-5)
    a = act_absmax.float()
    s = a.clamp_min(1e-5).pow(alpha) / w_absmax.pow(1 - alpha)
    return torch.where(a > 0, s, torch.ones_like(s)).clamp(1e-5, 1e5)


@register_module_type
class SmoothQuantLinear(DynamicQuantLinear):
    """:class:`DynamicQuantLinear` of ``W·diag(s)`` whose input is first multiplied by
    ``input_scale`` (= ``1/s``)."""

    def __init__(self, in_features: int, out_features: int, **options):
        super().__init__(in_features, out_features, **options)
        self.register_buffer("input_scale", torch.ones(in_features))

    @classmethod
    def smoothed(cls, linear: nn.Linear, act_absmax: torch.Tensor, *, alpha: float,
                 **options) -> SmoothQuantLinear:
        s = smoothing_scale(act_absmax, linear.weight, alpha)
        q = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                **options)
        q.set_weight(linear.weight.detach().float() * s[None, :])
        q.input_scale.copy_(1 / s)
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach())
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x * self.input_scale)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", smoothed"
