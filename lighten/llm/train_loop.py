"""The optimisation loop of the llm distillations (``encoder_distill``, ``decoder_prune``).

Why one loop: they differ only in their loss and learning-rate schedule. The rest -- AdamW
without weight decay, ``epochs`` of the batches as a whole number of steps (at least 1), a
seeded permutation of the batches per epoch, the mean loss of each epoch as the history --
must stay the same for both, so a fix to one reaches the other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

__all__ = ["train_steps"]


def train_steps(params: Iterable[nn.Parameter], loss_of: Callable[[int], Tensor], batches: int,
                *, epochs: float, lr: float, schedule: Callable[[int, int], float],
                seed: int) -> list[float]:
    """Minimise ``loss_of(j)`` (``j``: a batch index in ``range(batches)``) over ``params`` for
    ``round(epochs * batches)`` steps; ``schedule(step, steps)`` scales the learning rate.
    Returns the mean loss of each epoch (the last may be partial); gradients are freed on exit,
    also on an error."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps = max(1, int(round(epochs * batches)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s, steps))
    g = torch.Generator().manual_seed(seed)
    history, total, count, step = [], 0.0, 0, 0
    try:
        while step < steps:
            for j in torch.randperm(batches, generator=g).tolist():
                if step >= steps:
                    break
                loss = loss_of(j)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total, count, step = total + float(loss.detach()), count + 1, step + 1
            history.append(total / max(count, 1))
            total, count = 0.0, 0
    finally:
        opt.zero_grad(set_to_none=True)
    return history
