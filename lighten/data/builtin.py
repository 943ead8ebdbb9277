"""Small built-in datasets that need no download: sklearn digits and synthetic blobs."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset


def load_digits_split(*, limit_train: int | None, limit_test: int | None):
    """sklearn's 8x8 digits, scaled to [0, 1] (pixel max is 16), fixed 80/20 split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy((digits.images / 16.0).astype(np.float32)).unsqueeze(1)  # (N,1,8,8)
    y = torch.from_numpy(digits.target.astype(np.int64))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    cut = int(0.8 * len(y))
    train = TensorDataset(x[:cut][:limit_train], y[:cut][:limit_train])
    test = TensorDataset(x[cut:][:limit_test], y[cut:][:limit_test])
    return train, test


def make_synthetic(*, samples: int, input_shape: tuple[int, ...], num_classes: int,
                   seed: int = 0, noise: float = 1.0) -> tuple[TensorDataset, TensorDataset]:
    """Fixed random class prototypes plus Gaussian noise: learnable, deterministic by seed.

    ``samples`` is the training size; the test split is a quarter of it (at least one per class).
    """
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(num_classes, *input_shape, generator=g)

    def draw(n: int) -> TensorDataset:
        y = torch.randint(0, num_classes, (n,), generator=g)
        x = prototypes[y] + noise * torch.randn(n, *input_shape, generator=g)
        return TensorDataset(x, y)

    return draw(samples), draw(max(samples // 4, num_classes))
