"""Cross-layer tying (``share.tie``): structurally identical blocks share one set of weights.

ALBERT (Lan et al. 2020) shares every transformer layer's weights; the same works for the
repeated blocks of a ResNet stage. Blocks are tied at the parameter level: each tied block's
parameters *are* the first block's ``nn.Parameter`` objects, so

* the model stores each tied tensor once: ``state_dict`` holds one storage under several
  names, which the artifact writes as ``alias`` entries and ties again on load
  (:func:`lighten.artifact._retie`);
* fine-tuning keeps them tied: autograd adds every use's gradient into the one parameter and
  the optimizer sees it once.

Normalization layers keep their own parameters unless ``norms: true`` (a BatchNorm's statistics
differ with depth; they are a few hundred bytes). BatchNorm running statistics are never tied.

``blocks: auto`` finds candidates by structure: modules with children whose classes, layer
settings and tensor shapes match (the outermost such modules, so a tied stage is not also tied
inside). ``threshold`` keeps only blocks whose weights are within that relative distance of
their group's first block (blocks that already compute nearly the same); without it every
structurally identical block is tied and ``finetune:`` recovers the accuracy. ``init: mean``
starts the shared weights at the members' mean instead of the first block's.

Order: tie after structural pruning (``prune.channels`` slices each block on its own and so
unties them); ``share.pq`` after tying keeps one PQ module per tied weight (stored once).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from lighten.errors import UnsupportedError
from lighten.modules import require_modules
from lighten.registry import register_step
from lighten.step import StepConfig, StepContext

__all__ = ["TieConfig", "block_signature", "find_tie_groups", "tie_blocks_"]

_NORMS = (_NormBase, nn.LayerNorm, nn.GroupNorm)


class TieConfig(StepConfig):
    blocks: Literal["auto"] | list[list[str]] = Field(
        "auto", description="'auto' (structurally identical blocks) or groups of module names "
        "to tie, e.g. [[layers.1, layers.2]]")
    threshold: float | None = Field(None, ge=0, description="tie only blocks within this "
                                    "relative weight distance of their group's first block")
    norms: bool = Field(False, description="tie normalization layers' parameters too")
    init: Literal["first", "mean"] = Field("first", description="shared weights start as the "
                                           "first block's or the members' mean")
    ignore: list[str] = Field(default_factory=list, description="modules never tied (a block "
                              "that is, holds or lies inside one stays as it is)")

    @field_validator("blocks")
    @classmethod
    def _groups(cls, v):
        if isinstance(v, list):
            for group in v:
                if len(group) < 2 or len(set(group)) != len(group):
                    raise ValueError(f"each blocks group needs two or more distinct module "
                                     f"names, got {group}")
            names = [n for g in v for n in g]
            if len(set(names)) != len(names):
                raise ValueError("a module appears in two blocks groups; each block is tied "
                                 "to one group")
        return v


def _plain(value) -> bool:
    return isinstance(value, (bool, int, float, str, type(None))) or (
        isinstance(value, tuple) and all(_plain(v) for v in value))


def block_signature(block: nn.Module) -> tuple:
    """What makes two blocks compute the same function of their weights: every submodule's
    relative path, class, plain settings (stride, padding, eps...) and tensor shapes."""
    parts = []
    for path, module in block.named_modules():
        settings = tuple(sorted((k, v) for k, v in vars(module).items()
                                if not k.startswith("_") and k != "training" and _plain(v)))
        tensors = tuple((k, tuple(t.shape), t.dtype) for k, t in
                        [*module._parameters.items(), *module._buffers.items()] if t is not None)
        parts.append((path, type(module).__qualname__, settings, tensors))
    return tuple(parts)


def _tied_params(block: nn.Module, norms: bool) -> list[tuple[str, str]]:
    """(module path inside the block, parameter name) of every parameter tied."""
    return [(path, name) for path, module in block.named_modules()
            if norms or not isinstance(module, _NORMS)
            for name, p in module._parameters.items() if p is not None]


def _distance(a: nn.Module, b: nn.Module, params: list[tuple[str, str]]) -> float:
    """Relative distance of two blocks' tied weights (0: the same function)."""
    va = torch.cat([getattr(a.get_submodule(p), n).detach().flatten() for p, n in params])
    vb = torch.cat([getattr(b.get_submodule(p), n).detach().flatten() for p, n in params])
    scale = max(float(va.norm()), float(vb.norm()), 1e-12)
    return float((va - vb).norm()) / scale


def _related(a: str, b: str) -> bool:
    """``a`` is ``b``, inside it, or holds it."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def find_tie_groups(model: nn.Module, *, norms: bool = False,
                    ignore: list[str] | tuple[str, ...] = ()) -> list[list[str]]:
    """Outermost modules with children that share a signature (two or more), in model order."""
    by_sig: dict[tuple, list[str]] = {}
    for name, module in model.named_modules():
        if any(_related(name, i) for i in ignore):
            continue
        if name and module._modules and _tied_params(module, norms):
            by_sig.setdefault(block_signature(module), []).append(name)
    size = {name: sum(p.numel() for p in model.get_submodule(name).parameters())
            for names in by_sig.values() for name in names}
    groups, taken = [], []

    for names in sorted(by_sig.values(), key=lambda ns: -size[ns[0]]):
        free = [n for n in names if not any(_related(n, t) for t in taken)]
        if len(free) >= 2:
            groups.append(free)
            taken += free
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(groups, key=lambda g: order[g[0]])


def _split_by_threshold(model, names: list[str], params, threshold: float | None
                        ) -> list[list[str]]:
    if threshold is None:
        return [names]
    out: list[list[str]] = []
    for name in names:
        block = model.get_submodule(name)
        for group in out:
            if _distance(model.get_submodule(group[0]), block, params) <= threshold:
                group.append(name)
                break
        else:
            out.append([name])
    return [g for g in out if len(g) >= 2]


def tie_blocks_(model: nn.Module, config: TieConfig) -> list[dict]:
    """Tie ``model``'s blocks in place; one row per tied block (its bytes now shared)."""
    require_modules(model, config.ignore, key="ignore")
    if config.blocks == "auto":
        candidates = find_tie_groups(model, norms=config.norms, ignore=config.ignore)
    else:
        candidates = [list(g) for g in config.blocks]
        require_modules(model, [n for g in candidates for n in g], key="share.tie blocks")
        for group in candidates:
            clash = [n for n in group for i in config.ignore if _related(n, i)]
            if clash:
                raise UnsupportedError(f"share.tie: {clash[0]!r} is named in blocks and "
                                       "touches a module in ignore; drop it from one of them")
            first = block_signature(model.get_submodule(group[0]))
            for name in group[1:]:
                if block_signature(model.get_submodule(name)) != first:
                    raise UnsupportedError(f"share.tie: {name!r} is not structurally identical "
                                           f"to {group[0]!r} (module types, settings or shapes "
                                           "differ); tie only blocks built alike")
    rows = []
    for names in candidates:
        params = _tied_params(model.get_submodule(names[0]), config.norms)
        for group in _split_by_threshold(model, names, params, config.threshold):
            rows += _tie_group(model, group, params, config.init)
    if not rows:
        raise UnsupportedError("share.tie found no blocks to tie (no two structurally identical "
                               "modules with parameters" + (", or none within threshold"
                                                            if config.threshold is not None
                                                            else "") + "); name them in blocks:")
    return rows


def _tie_group(model: nn.Module, group: list[str], params, init: str) -> list[dict]:
    first = model.get_submodule(group[0])
    blocks = [model.get_submodule(n) for n in group]
    rows = []
    for name, block in zip(group[1:], blocks[1:], strict=True):
        rows.append({"module": name, "action": "tie", "before": "own weights",
                     "after": f"tied to {group[0]}",
                     "distance": round(_distance(first, block, params), 5)})
    saved = 0
    for path, pname in params:
        shared = getattr(first.get_submodule(path), pname)
        if init == "mean":
            with torch.no_grad():
                shared.copy_(torch.stack([getattr(b.get_submodule(path), pname).detach()
                                          for b in blocks]).mean(0))
        for block in blocks[1:]:
            owner = block.get_submodule(path)
            if owner._parameters[pname] is not shared:
                saved += shared.numel() * shared.element_size()
                owner._parameters[pname] = shared
    for row in rows:
        row["bytes_saved"] = saved // max(len(rows), 1)
    return rows


@register_step("share.tie", TieConfig)
def share_tie(model: nn.Module, config: TieConfig, ctx: StepContext) -> nn.Module:
    """Tie structurally identical blocks (ALBERT-style): one set of weights, stored once."""
    from lighten.measure import count_params

    before = count_params(model)[0]
    rows = tie_blocks_(model, config)
    for row in rows:
        ctx.layer(**row)
    saved = sum(r["bytes_saved"] for r in rows)
    groups = len({r["after"] for r in rows})
    ctx.note(f"share.tie: {len(rows)} blocks tied in {groups} groups; {saved} B of weights "
             f"stored once instead of per block (params {count_params(model)[0]} of {before})")
    ctx.summary.update(tied_blocks=len(rows), tie_bytes_saved=saved)
    ctx.finetune(model, config.finetune)
    return model
