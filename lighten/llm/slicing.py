"""The block surgery ``llm.encoder_prune`` and ``llm.decoder_prune`` share: finding the stack of
blocks, and slicing Linears (plain ``nn.Linear`` results, so artifacts need no custom types)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lighten.errors import ModelError

__all__ = ["find_layer_stack", "keep_count", "linear_cols", "linear_cols_compensated",
           "linear_rows"]


def find_layer_stack(model: nn.Module, suffix: str, is_layer: Callable[[nn.Module], bool],
                     missing: str) -> tuple[str, nn.ModuleList]:
    """``(path, ModuleList)`` of the first non-empty ModuleList whose name ends with ``suffix``
    and whose every block passes ``is_layer``; ModelError ``missing`` when there is none."""
    for name, module in model.named_modules():
        if name.endswith(suffix) and isinstance(module, nn.ModuleList) and len(module):
            if all(is_layer(layer) for layer in module):
                return name, module
    raise ModelError(missing)


def keep_count(total: int, ratio: float, multiple: int = 1) -> int:
    """How many of ``total`` stay when ``ratio`` of them go, rounded to ``multiple`` (at least
    one, at most all)."""
    keep = total - int(round(total * ratio))
    if multiple > 1:
        keep = max(multiple, int(round(keep / multiple)) * multiple)
    return max(1, min(total, keep))


def linear_rows(linear: nn.Linear, keep: Tensor) -> nn.Linear:
    """A new Linear with output rows ``keep`` of ``linear`` (and their biases)."""
    new = nn.Linear(linear.in_features, len(keep), bias=linear.bias is not None)
    with torch.no_grad():
        new.weight.copy_(linear.weight[keep])
        if linear.bias is not None:
            new.bias.copy_(linear.bias[keep])
    return new


def linear_cols(linear: nn.Linear, keep: Tensor) -> nn.Linear:
    """A new Linear reading only input columns ``keep`` of ``linear`` (bias unchanged)."""
    new = nn.Linear(len(keep), linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        new.weight.copy_(linear.weight[:, keep])
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
    return new


def linear_cols_compensated(linear: nn.Linear, keep: Tensor, mean: Tensor) -> nn.Linear:
    """Input columns ``keep`` of ``linear``; the removed features' mean contribution moves into
    the bias, so a removed feature acts as its calibration mean instead of zero."""
    new = linear_cols(linear, keep)
    gone = torch.ones(linear.in_features, dtype=torch.bool)
    gone[keep] = False
    with torch.no_grad():
        shift = linear.weight[:, gone] @ mean[gone]
        if new.bias is None:
            new.bias = nn.Parameter(shift)
        else:
            new.bias.add_(shift)
    return new
