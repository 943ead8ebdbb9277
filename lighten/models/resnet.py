"""ResNet-20 (He et al. 2016, CIFAR variant): 3 stages of 3 basic blocks, 16/32/64 channels."""

from __future__ import annotations

from torch import nn

from lighten.models.lenet import _spatial


class BasicBlock(nn.Module):
    """conv3-BN-ReLU-conv3-BN, ``out + identity``, ReLU; 1x1 conv+BN shortcut on shape change."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu2 = nn.ReLU()
        self.shortcut = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x):
        identity = self.shortcut(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class ResNet20(nn.Module):
    def __init__(self, num_classes: int = 10, input_shape=(1, 28, 28), blocks: int = 3):
        super().__init__()
        c, _, _ = _spatial(input_shape)
        self.stem = nn.Sequential(nn.Conv2d(c, 16, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(16), nn.ReLU())
        layers, in_ch = [], 16
        for stage, width in enumerate((16, 32, 64)):
            for i in range(blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(BasicBlock(in_ch, width, stride))
                in_ch = width
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.layers(self.stem(x))  # (B, 64, H/4, W/4)
        return self.fc(self.flatten(self.pool(x)))


def resnet20(num_classes: int = 10, input_shape=(1, 28, 28)) -> nn.Module:
    return ResNet20(num_classes, input_shape)
