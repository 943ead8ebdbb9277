"""Model files the tests write for ``python: file.py:factory`` specs, built from shared parts so
each test's file holds only the models it needs (the text of a user's model file, not code the
tests import)."""

from __future__ import annotations

HEADER = "import torch\nfrom torch import nn\n"

# Two 3x3 convs with BatchNorm and an identity shortcut: the coupled channels pruning must keep.
RESIDUAL_BLOCK = '''
class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
'''

# Stem, two residual blocks, a two-Linear head; ``cnn()`` builds it (1x8x8 in, 10 classes).
CNN = '''
class CNN(nn.Module):
    def __init__(self, c=16, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.blocks = nn.Sequential(Block(c), Block(c))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 32),
                                  nn.ReLU(), nn.Linear(32, classes))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def cnn():
    return CNN()
'''


def model_source(*parts: str) -> str:
    """One model file: the imports, then ``parts`` (class and factory definitions) in order."""
    return HEADER + "".join(f"\n\n{part.strip()}\n" for part in parts)
