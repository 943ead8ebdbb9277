"""LeNet-5 and LeNet-300-100: the classic small baselines of the pruning literature."""

from __future__ import annotations

import math

from torch import nn

from lighten.errors import ModelError


def _spatial(input_shape) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ModelError(f"input_shape {tuple(input_shape)} must be (channels, height, width)")
    c, h, w = (int(d) for d in input_shape)
    if min(h, w) < 4:
        raise ModelError(f"input {h}x{w} is too small for a conv net; use at least 4x4")
    return c, h, w


class LeNet5(nn.Module):
    """conv5-pool-conv5-pool-fc120-fc84-fc; conv2 is padded when the input is small (8x8)."""

    def __init__(self, num_classes: int = 10, input_shape=(1, 28, 28)):
        super().__init__()
        c, h, w = _spatial(input_shape)
        h, w = h // 2, w // 2  # conv1 keeps the size (padding 2), then pool
        pad2 = 0 if min(h, w) >= 6 else 2  # 28x28: 14 -> 10 (classic); 8x8: 4 -> 4
        h, w = (h - 4 + 2 * pad2) // 2, (w - 4 + 2 * pad2) // 2
        self.features = nn.Sequential(
            nn.Conv2d(c, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=pad2), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * h * w, 120), nn.ReLU(),
            nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class LeNet300(nn.Module):
    """LeNet-300-100: a three-layer MLP on the flattened input."""

    def __init__(self, num_classes: int = 10, input_shape=(1, 28, 28)):
        super().__init__()
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(math.prod(input_shape), 300), nn.ReLU(),
            nn.Linear(300, 100), nn.ReLU(),
            nn.Linear(100, num_classes),
        )

    def forward(self, x):
        return self.classifier(x)


def lenet5(num_classes: int = 10, input_shape=(1, 28, 28)) -> nn.Module:
    return LeNet5(num_classes, input_shape)


def lenet300(num_classes: int = 10, input_shape=(1, 28, 28)) -> nn.Module:
    return LeNet300(num_classes, input_shape)
