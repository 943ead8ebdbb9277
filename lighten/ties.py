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

from dataclasses import dataclass

import torch
from torch import nn

from lighten.errors import ModelError
from lighten.modules import get_submodule


@dataclass(frozen=True)
class Tie:
    """One parameter object owned under ``attr`` by the modules at ``paths``."""

    attr: str  # "" when the owners name it differently (nothing to pair by name)
    paths: tuple[str, ...]

    def __str__(self) -> str:
        return ", ".join(self.paths)


def tied_groups(model: nn.Module) -> list[Tie]:
    """Every parameter more than one module path owns (a module reachable at two paths counts
    as tied to itself)."""
    owners: dict[int, list[tuple[str, str]]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for attr, param in module._parameters.items():
            if param is not None and (path, attr) not in owners.setdefault(id(param), []):
                owners[id(param)].append((path, attr))
    ties = []
    for members in owners.values():
        paths = tuple(dict.fromkeys(path for path, _ in members))
        if len(paths) > 1:
            attrs = {attr for _, attr in members}
            ties.append(Tie(attrs.pop() if len(attrs) == 1 else "", paths))
    return ties


def retie(model: nn.Module, ties: list[Tie]) -> tuple[list[str], list[str]]:
    """Make the replacements of each tie's owners share the tensors they derived from it.

    Returns (ties kept by re-sharing, ties now stored more than once), each as a readable
    "a, b" string; ties the step left alone are in neither. Only the replacements' own tensors
    named after the tied parameter (``weight`` -> ``weight_int``, ``weight_scale``, ...) with
    more than one element and equal values are shared: nothing else of theirs is touched."""
    retied, broken = [], []
    for tie in ties:
        modules = [_module_at(model, p) for p in tie.paths]
        if any(m is None for m in modules):
            continue  # a layer removed (pruned away): nothing left to tie
        first = modules[0]
        shared = first._parameters.get(tie.attr) if tie.attr else None
        if all(m is first for m in modules) or shared is not None and all(
                m._parameters.get(tie.attr) is shared for m in modules):
            continue  # still one module, or still one parameter: the step kept the tie
        changed, whole = 0, True
        for other in modules[1:]:
            if other is first:
                continue
            changed += _share_derived(first, other, tie.attr)
            mine = _derived(first, tie.attr)
            whole &= mine is not None and _derived(other, tie.attr) is mine
        if not whole:
            broken.append(str(tie))
        elif changed:
            retied.append(str(tie))
    # a layer's weight and bias are two ties of the same layers: named once, as broken when
    # either is (the weight is what costs)
    broken = list(dict.fromkeys(broken))
    return [t for t in dict.fromkeys(retied) if t not in broken], broken


def _module_at(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return get_submodule(model, path)
    except ModelError:
        return None


def _own_tensors(module: nn.Module, attr: str) -> dict[str, dict]:
    """The module's own parameter / buffer stores holding tensors named after ``attr``."""
    return {store: {n: t for n, t in getattr(module, store).items()
                    if t is not None and attr and n.startswith(attr)}
            for store in ("_parameters", "_buffers")}


def _share_derived(first: nn.Module, other: nn.Module, attr: str) -> int:
    """Point ``other``'s tensors derived from ``attr`` at ``first``'s equal ones; how many."""
    if type(first) is not type(other):
        return 0
    count = 0
    for store, tensors in _own_tensors(first, attr).items():
        theirs = getattr(other, store)
        for name, tensor in tensors.items():
            twin = theirs.get(name)
            if (twin is None or twin is tensor or tensor.numel() <= 1
                    or twin.shape != tensor.shape or twin.dtype != tensor.dtype):
                continue
            if torch.equal(twin.detach(), tensor.detach()):
                theirs[name] = tensor
                count += 1
    return count


def _derived(module: nn.Module, attr: str) -> torch.Tensor | None:
    """The biggest tensor the module stores for ``attr``: the tied weight in its new form."""
    tensors = [t for group in _own_tensors(module, attr).values() for t in group.values()]
    return max(tensors, key=torch.Tensor.numel, default=None)
