"""One forward in eval mode with forward hooks attached: how lighten reads a model's layer
shapes and call order without changing it (the hooks go and the training flag comes back, even
when the forward raises)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

ForwardHook = Callable[[nn.Module, tuple, object], None]


def forward_with_hooks(model: nn.Module, example: tuple,
                       hooks: Iterable[tuple[nn.Module, ForwardHook]]) -> None:
    """``model(*example)`` once, in eval mode and without gradients, with each
    ``(module, hook)`` of ``hooks`` registered as a forward hook for that call only."""
    forward_batches_with_hooks(model, [example], hooks)


def forward_batches_with_hooks(model: nn.Module, batches: Iterable,
                               hooks: Iterable[tuple[nn.Module, ForwardHook]]) -> None:
    """``model(*batch)`` for every batch (a tuple, or one tensor), in eval mode and without
    gradients, with the hooks registered for those calls only."""
    handles = []
    was = model.training
    try:
        handles += [module.register_forward_hook(hook) for module, hook in hooks]
        model.eval()
        with torch.no_grad():
            for batch in batches:
                model(*batch) if isinstance(batch, tuple) else model(batch)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
