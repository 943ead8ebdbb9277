"""Weights tied across layers stay tied through a step that replaces those layers.

A tie (``share.tie``, an LM head on its embedding, one module called at two places) is one
parameter object under several module paths. A step that swaps each layer for a new module
(``quant.dynamic``, ``quant.ptq``, ``lowrank.svd``) builds one replacement per path, so the
tied weight would be stored once per path: more bytes, not fewer. After the step, tensors of
the replacements that are equal (the int8 weight and per-channel scales computed from one float
weight) are made one tensor again; a tie that cannot be kept (a tied layer replaced, its
partner not) is reported, with the layers and what it costs.
"""

from __future__ import annotations

import torch
from torch import nn

from lighten.errors import ModelError
from lighten.modules import get_submodule


def tied_groups(model: nn.Module) -> list[list[str]]:
    """Module paths sharing a parameter object, one list per shared parameter that more than
    one path owns (a module reachable at two paths counts as tied to itself)."""
    owners: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for param in module._parameters.values():
            if param is not None and path not in owners.setdefault(id(param), []):
                owners[id(param)].append(path)
    groups = [paths for paths in owners.values() if len(paths) > 1]
    unique = []
    for paths in groups:  # weight and bias tied together: one group
        if paths not in unique:
            unique.append(paths)
    return unique


def retie(model: nn.Module, groups: list[list[str]]) -> tuple[list[str], list[str]]:
    """Make equal tensors of the modules now at each group's paths one tensor again.

    Returns (groups tied again, groups whose weight is now stored more than once), each as a
    readable "a, b" string; groups the step left alone are in neither. Only tensors with more
    than one element are tied (scalar activation scales are per call site and cost nothing)."""
    retied, broken = [], []
    for paths in groups:
        modules = [_module_at(model, p) for p in paths]
        if any(m is None for m in modules):
            continue  # a layer removed (pruned away): nothing left to tie
        first, changed, whole = modules[0], 0, True
        for other in modules[1:]:
            if other is first:
                continue
            changed += _share_equal_tensors(first, other)
            whole &= _largest(other) is not None and _largest(other) is _largest(first)
        if not whole:
            broken.append(", ".join(paths))
        elif changed:
            retied.append(", ".join(paths))
    return retied, broken


def _module_at(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return get_submodule(model, path)
    except ModelError:
        return None


def _share_equal_tensors(first: nn.Module, other: nn.Module) -> int:
    """Point ``other``'s tensors (its submodules' too, paired by path) at ``first``'s equal
    ones; how many were re-pointed."""
    mine = dict(first.named_modules())
    count = 0
    for path, twin_module in other.named_modules():
        module = mine.get(path)
        if module is None or type(module) is not type(twin_module) or module is twin_module:
            continue
        for store in ("_parameters", "_buffers"):
            ours, theirs = getattr(module, store), getattr(twin_module, store)
            for name, tensor in ours.items():
                twin = theirs.get(name)
                if (tensor is None or twin is None or twin is tensor or tensor.numel() <= 1
                        or twin.shape != tensor.shape or twin.dtype != tensor.dtype):
                    continue
                if torch.equal(twin.detach(), tensor.detach()):
                    theirs[name] = tensor
                    count += 1
    return count


def _largest(module: nn.Module) -> torch.Tensor | None:
    """The module's biggest tensor (its submodules' included): its weight, in whatever form
    it is stored."""
    tensors = [*module.parameters(), *module.buffers()]
    return max(tensors, key=torch.Tensor.numel, default=None)
