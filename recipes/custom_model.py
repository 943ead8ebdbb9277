"""A model the zoo does not have: a small CNN with a residual add, concatenation and a depthwise
conv. Used by recipes/custom.yaml to show that lighten works on a user's own architecture."""

import torch
from torch import nn


class TinyMixNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.branch_a = nn.Conv2d(16, 16, 3, padding=1)
        self.branch_b = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16),
                                      nn.Conv2d(16, 16, 1))
        self.mix = nn.Sequential(nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32),
                                 nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):  # (B, 1, H, W)
        x = self.stem(x)
        a = torch.relu(self.branch_a(x)) + x  # residual add
        b = torch.relu(self.branch_b(x))
        x = self.mix(torch.cat([a, b], dim=1))  # (B, 32, H/2, W/2)
        return self.head(self.pool(x).flatten(1))


def build(num_classes: int = 10) -> nn.Module:
    return TinyMixNet(num_classes)
