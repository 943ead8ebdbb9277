"""The split distillation chooses on (the best mutual peer, ensemble weights from accuracy).

Never the test split: the runner measures every stage there, so choosing on it would report an
optimistic number. The data's validation split when it has one, else a fixed seeded slice of
the training split (up to ``limit`` images). For models trained on that slice it measures fit,
not generalization; that is the price of not holding training images back.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, Subset


def selection_split(ctx, limit: int = 5000) -> tuple[Dataset, str]:
    """``(dataset, description)`` to choose on: the validation split, else training images."""
    val = getattr(ctx.data, "val", None)
    if val is not None:
        return val, "validation split"
    train = ctx.data.train
    n = min(limit, len(train))
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(ctx.seed))
    return Subset(train, order[:n].tolist()), f"{n} training images"
