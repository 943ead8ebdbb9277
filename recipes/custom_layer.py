"""A layer of your own that lighten prunes and stores like a built-in one: register a LayerSpec.

``ScaledConv2d`` is a convolution with a learned gain per output channel (as in weight-normalised
or re-parametrised convs). Its spec tells lighten that channels flow through it like a conv
(``graph_kind="conv"``), how to slice it (``surgery``: the gain goes with its filters) and which
constructor arguments rebuild it at its pruned size (``constructor_attrs``: artifact replay).
Then ``prune.channels`` removes its filters, ``lighten check`` says so, and a pruned model's
artifact reloads. Use it from a recipe as ``model: {python: recipes/custom_layer.py:build,
input_shape: [1, 28, 28]}``, or look first:
``lighten check recipes/custom_layer.py:build --input-shape 1,28,28``.
"""

import torch
import torch.nn.functional as F
from torch import nn

from lighten.layers import LayerSpec, register_layer_spec
from lighten.prune.surgery import conv_in, conv_out, slice_param


class ScaledConv2d(nn.Module):
    """``conv2d(x, weight * gain)``: weight (out, in, k, k), gain (out,), bias (out,)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *,
                 padding: int = 0, bias: bool = True):
        super().__init__()
        # the attributes the channel analysis reads from a "conv" (see lighten.layers)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, 1
        self.kernel_size, self.padding = kernel_size, padding
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size,
                                               kernel_size) * (in_channels * kernel_size**2)**-0.5)
        self.gain = nn.Parameter(torch.ones(out_channels))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def forward(self, x):  # (B, in, H, W) -> (B, out, H', W')
        return F.conv2d(x, self.weight * self.gain[:, None, None, None], self.bias,
                        padding=self.padding)


def scaled_conv_out(conv: ScaledConv2d, keep: torch.Tensor) -> None:
    """Keep output channels ``keep``: filters and bias (as any conv), and their gains."""
    conv_out(conv, keep)
    slice_param(conv, "gain", keep, 0)


register_layer_spec(LayerSpec(
    ScaledConv2d,
    constructor_attrs=("in_channels", "out_channels", "kernel_size", "padding", "bias"),
    graph_kind="conv",
    surgery={"out": scaled_conv_out, "in": conv_in},
))


class ScaledNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = ScaledConv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = ScaledConv2d(16, 32, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):  # (B, 1, H, W)
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(F.max_pool2d(x, 2)))
        return self.head(self.pool(x).flatten(1))


def build(num_classes: int = 10) -> nn.Module:
    return ScaledNet(num_classes)
