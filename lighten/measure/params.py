"""Parameter counts: how many weights a model stores, and how many of them are non-zero."""

from __future__ import annotations

import torch
from torch import nn

INT_WEIGHT_BUFFER = "weight_int"  # quantized modules may store weights as an integer buffer


def weight_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every stored weight: parameters plus integer ``weight_int`` buffers, each counted once.

    A ``weight_int`` buffer is skipped when its module also has a ``weight`` Parameter, so a
    module that keeps both a float and an integer copy is not counted twice.
    """
    seen: set[int] = set()
    out = []
    for name, p in model.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    for mod_name, module in model.named_modules():
        buffers = dict(module.named_buffers(recurse=False))
        w = buffers.get(INT_WEIGHT_BUFFER)
        if w is None or w.is_floating_point() or id(w) in seen:
            continue
        if "weight" in dict(module.named_parameters(recurse=False)):
            continue
        seen.add(id(w))
        out.append((f"{mod_name}.{INT_WEIGHT_BUFFER}" if mod_name else INT_WEIGHT_BUFFER, w))
    return out


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, non-zero) elements over parameters and integer weight buffers."""
    total = nonzero = 0
    for _, t in weight_tensors(model):
        total += t.numel()
        nonzero += int(torch.count_nonzero(t.detach()))
    return total, nonzero
