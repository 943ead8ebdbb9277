"""Parameter counts: how many weights a model stores, and how many of them are non-zero."""

from __future__ import annotations

import re

import torch
from torch import nn

INT_WEIGHT_BUFFER = "weight_int"  # quantized modules may store weights as an integer buffer
# ... or several: a quantized LSTM's weight_ih_int_l0, weight_hh_int_l0, ...
_INT_WEIGHT = re.compile(r"^weight(_\w+?)?_int(_\w+)?$")


def weight_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every stored weight: parameters plus integer ``weight*_int*`` buffers (the unpadded
    codes of grouped storage), each counted once.

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
        if "weight" in dict(module.named_parameters(recurse=False)):
            continue
        for name, w in integer_weights(module):
            if id(w) in seen:
                continue
            seen.add(id(w))
            out.append((f"{mod_name}.{name}" if mod_name else name, _unpadded(module, name, w)))
    return out


def integer_weights(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The module's own integer weight buffers (``weight_int``, an LSTM's
    ``weight_ih_int_l0``, ...; a module naming them otherwise lists them in its
    ``integer_weight_names``), as stored."""
    named = getattr(module, "integer_weight_names", None)
    return [(name, b) for name, b in module.named_buffers(recurse=False)
            if (name in named if named else _INT_WEIGHT.match(name))
            and not b.is_floating_point()]


def stored_weights(module: nn.Module) -> list[torch.Tensor]:
    """The weights ``module`` itself stores, without grouped storage's padding: its float
    ``weight*`` parameters, else its integer weight buffers."""
    params = [p for name, p in module.named_parameters(recurse=False)
              if name.startswith("weight")]
    parametrized = getattr(module, "parametrizations", None)  # weight_norm, spectral_norm
    if parametrized is not None:
        params += [getattr(module, name) for name in parametrized.keys()
                   if name.startswith("weight")]
    if params:
        return params
    return [_unpadded(module, name, b) for name, b in integer_weights(module)]


def _unpadded(module: nn.Module, name: str, weight: torch.Tensor) -> torch.Tensor:
    counted = getattr(module, "unpadded_weight", None)  # grouped storage pads each row
    return counted() if name == INT_WEIGHT_BUFFER and callable(counted) else weight


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, non-zero) elements over parameters and integer weight buffers."""
    total = nonzero = 0
    for _, t in weight_tensors(model):
        total += t.numel()
        nonzero += int(torch.count_nonzero(t.detach()))
    return total, nonzero
