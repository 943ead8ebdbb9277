"""A small MobileNetV2 (Sandler et al. 2018) sized for 28x28 and 8x8 grey images."""

from __future__ import annotations

from torch import nn

from lighten.models.lenet import _spatial

# (expansion t, output channels c, repeats n, first stride s), as in the paper's table 2.
_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 2, 1))


def _conv_bn(in_ch: int, out_ch: int, kernel: int, *, stride: int = 1, groups: int = 1,
             act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2,
                        groups=groups, bias=False), nn.BatchNorm2d(out_ch)]
    if act:
        layers.append(nn.ReLU6())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 linear projection; residual when shapes match."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_ch * expansion
        layers = [_conv_bn(in_ch, hidden, 1)] if expansion != 1 else []
        layers += [_conv_bn(hidden, hidden, 3, stride=stride, groups=hidden),
                   _conv_bn(hidden, out_ch, 1, act=False)]
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x):
        if self.use_residual:
            return x + self.block(x)
        return self.block(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10, input_shape=(1, 28, 28), last_channels: int = 256):
        super().__init__()
        c, _, _ = _spatial(input_shape)
        layers, in_ch = [_conv_bn(c, 16, 3)], 16
        for t, out_ch, n, s in _SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t))
                in_ch = out_ch
        layers.append(_conv_bn(in_ch, last_channels, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(last_channels, num_classes)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.features(x))))


def mobilenetv2(num_classes: int = 10, input_shape=(1, 28, 28)) -> nn.Module:
    return MobileNetV2(num_classes, input_shape)
