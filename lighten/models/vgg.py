"""A small VGG with BatchNorm: three stages of two 3x3 convs, then global pooling and fc."""

from __future__ import annotations

from torch import nn

from lighten.models.lenet import _spatial

_CFG = (32, 32, "M", 64, 64, "M", 128, 128, "M")


class VGGSmall(nn.Module):
    def __init__(self, num_classes: int = 10, input_shape=(1, 28, 28), cfg=_CFG):
        super().__init__()
        c, _, _ = _spatial(input_shape)
        layers, in_ch = [], c
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(in_ch, item, 3, padding=1, bias=False),
                           nn.BatchNorm2d(item), nn.ReLU()]
                in_ch = item
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)  # 28x28 -> 3x3 -> 1; 8x8 -> 1x1 -> 1
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.features(x))))


def vgg_small(num_classes: int = 10, input_shape=(1, 28, 28)) -> nn.Module:
    return VGGSmall(num_classes, input_shape)
