"""SmoothQuant (Xiao et al., 2023): W8A8 for LLMs by moving activation outliers into weights.

LLM activations have a few channels hundreds of times larger than the rest, so one int8 scale
per tensor wastes most levels on them; weights are easy to quantize. A per-input-channel
``s_j = max|X_j|^α / max|W_j|^(1-α)`` divides the activations and multiplies the weight
columns (``α = 0.5`` splits the difficulty evenly), then the layer gets int8 weights per output
channel and int8 activations quantized at run time, with an integer matmul.

Activations are quantized **per token** by default (one symmetric scale per row, from that row's
``max |x|``), as the W8A8 LLM kernels do (SmoothQuant's O1/O2, vLLM, TensorRT-LLM): one scale per
tensor lets a single outlier token (LLMs' first-token "attention sink" rows are hundreds of
times larger) coarsen every other token's grid; with it SmolLM2-135M lost 18% perplexity
(``benchmarks/llm.py --quick``). ``activations: tensor`` keeps the
per-tensor uint8 form of ``quant.dynamic`` (ONNX ``DynamicQuantizeLinear``). In ONNX, per token
is ``ReduceMax(|x|)`` → ``Round(x / s)`` shifted to uint8 (+128, an exact scalar zero point) →
``MatMulInteger`` → times ``s · w_scale`` → ``Sum`` with the bias; ORT's integer kernels run it
(one fused ``MatMulIntegerToFloat``; a bias ``Add`` would be fused too, and that kernel scales
the bias by the per-token ``s`` as well).

The reference folds ``1/s`` into the preceding LayerNorm; here :class:`SmoothQuantLinear`
keeps it (``x * input_scale``), so any Linear can be smoothed.
"""

from __future__ import annotations

import torch
from torch import nn

from lighten.modules import register_module_type
from lighten.quant.dynamic import DynamicQuantLinear, IntegerLinear

_ONNX_UINT8 = 2


def smoothing_scale(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float
                    ) -> torch.Tensor:
    """``s`` (in,) of SmoothQuant; channels that never fire keep 1."""
    w_absmax = weight.detach().abs().amax(0).float().clamp_min(1e-5)
    a = act_absmax.float()
    s = a.clamp_min(1e-5).pow(alpha) / w_absmax.pow(1 - alpha)
    return torch.where(a > 0, s, torch.ones_like(s)).clamp(1e-5, 1e5)


def per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes in [-127, 127] as float, scale (..., 1))``: one symmetric scale per row."""
    scale = x.abs().amax(-1, keepdim=True) / 127
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.clamp(torch.round(x / safe), -127, 127), safe


class PerTokenS8:
    """Per-token activation quantizer for :class:`~lighten.quant.dynamic.IntegerLinear`."""

    quantize = staticmethod(per_token_int8)
    row_scales = True  # the bias is added after ORT's fused integer matmul (a Sum), not inside

    @staticmethod
    def symbolic(g, x):
        """``(uint8 codes, zero point 128, scale)``: int8 codes shifted by an exact +128."""
        def const(value, dtype=torch.float32):
            return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))

        amax = g.op("ReduceMax", g.op("Abs", x), axes_i=[-1], keepdims_i=1)
        scale = g.op("Div", amax, const(127.0))
        safe = g.op("Where", g.op("Equal", scale, const(0.0)), const(1.0), scale)
        q = g.op("Clip", g.op("Round", g.op("Div", x, safe)), const(-127.0), const(127.0))
        q = g.op("Cast", g.op("Add", q, const(128.0)), to_i=_ONNX_UINT8)  # exact shift
        return q, const(128, torch.uint8), safe


@register_module_type
class SmoothQuantLinear(DynamicQuantLinear):
    """:class:`DynamicQuantLinear` of ``W·diag(s)`` whose input is first multiplied by
    ``input_scale`` (= ``1/s``); ``activations``: ``token`` (per-row int8) or ``tensor``."""

    def __init__(self, in_features: int, out_features: int, *, activations: str = "tensor",
                 **options):
        super().__init__(in_features, out_features, **options)
        self.activations = activations
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
        x = x * self.input_scale
        if self.activations == "token":
            return IntegerLinear.apply(x, self.weight_int, self.weight_scale, self.bias,
                                       PerTokenS8)
        return super().forward(x)

    def artifact_config(self) -> dict:
        return {**super().artifact_config(), "activations": self.activations}

    def extra_repr(self) -> str:
        return super().extra_repr() + f", smoothed, per-{self.activations} activations"
