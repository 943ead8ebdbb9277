"""``arch.nas`` candidates: one architecture of the space, built by surgery on a copy of the
user's model, with fresh weights, and what it costs.

Building from the model itself (not from a generic template) keeps everything the model does
between its layers (its residual adds, its pooling, its head) and means a candidate saves as an
artifact like any stage: the artifact's edit log describes resized standard layers, dropped
blocks (``prune.layers``' registered ``SkippedBlock``) and ``nn.Sequential`` separable pairs.

Widths change through :func:`resize_groups_`: every member of a channel group gets an index
list along its axis through the same per-layer surgery prune.channels uses. From scratch
(``inherit=False``) the list is ``arange(n) % size`` (growing repeats channels, shrinking keeps
the first ``n``) and all weights are then re-initialised, so which channels were kept does not
matter. With ``inherit=True`` the candidate is a sub-network of the trained model: each group
keeps its ``n`` most important channels (DepGraph's ``group_l2``, computed once per depth
choice), a stage keeps its first blocks, no group grows past the model's width, and only layers
whose kernel or block type changed start fresh.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import nn

from lighten.arch.nas_space import DerivedSpace, module_keys, resizable_groups, stage_of_groups
from lighten.modules import set_submodule
from lighten.prune.structured import round_step
from lighten.prune.surgery import axis_length, prune_module_

__all__ = ["COSTS", "CandidateBuilder", "build_candidate", "fit_to_budget", "layer_macs",
           "reinit_", "resize_groups_", "stage_widths"]

LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
MIN_SCALE = 0.05
MAX_SCALE = 4.0
BISECT_STEPS = 8


def resize_groups_(model: nn.Module, groups: list, sizes: list[int],
                   orders: list[torch.Tensor] | None = None) -> None:
    """Give every group ``sizes[i]`` channels, in place: the first ``sizes[i]`` of
    ``orders[i]`` (channel indices, most important first; kept in their original order), or
    without ``orders`` the first channels repeated as needed (weights then need
    re-initialising)."""
    segments: dict[tuple[str, str], list[tuple[int, int, torch.Tensor]]] = {}
    for i, (g, n) in enumerate(zip(groups, sizes, strict=True)):
        if n == g.size:
            continue
        if orders is not None:
            if n > g.size:
                raise ValueError(f"an inherited group cannot grow ({g.size} -> {n} channels)")
            channels = orders[i][:n].sort().values
        else:
            channels = torch.arange(n) % g.size
        for m in g.members:
            segments.setdefault((m.module, m.kind), []).append(
                (m.offset, g.size * m.block, m.indices(channels)))
    for (name, kind), segs in segments.items():
        module = model.get_submodule(name)
        length, pos, parts = axis_length(module, kind), 0, []
        for start, span, idx in sorted(segs, key=lambda s: s[0]):
            parts += [torch.arange(pos, start), idx]
            pos = start + span
        parts.append(torch.arange(pos, length))
        prune_module_(module, kind, torch.cat(parts))


def reinit_(model: nn.Module, seed: int) -> nn.Module:
    """Fresh weights for every layer that can reset itself (seeded; the RNG is restored)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in model.modules():
            if m is not model and hasattr(m, "reset_parameters"):
                m.reset_parameters()
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
    return model


def _width(size: int, mult: float, round_to: int) -> int:
    """Channels for ``size`` x ``mult``: multiples of ``round_to`` where the model's width is
    one (CPU kernels work in channel blocks), else the nearest integer; x1 keeps ``size``."""
    n = size * mult
    if mult == 1.0:
        return size
    if size % round_to == 0:
        return max(round_to, int(round(n / round_to)) * round_to)
    return max(1, int(round(n)))


def _new_conv(conv: nn.Conv2d, kernel: int, separable: bool) -> nn.Module:
    k = kernel or conv.kernel_size[0]
    if not separable:
        return nn.Conv2d(conv.in_channels, conv.out_channels, k, stride=conv.stride,
                         padding=k // 2, groups=conv.groups, bias=conv.bias is not None)
    dw = nn.Conv2d(conv.in_channels, conv.in_channels, k, stride=conv.stride, padding=k // 2,
                   groups=conv.in_channels, bias=False)
    pw = nn.Conv2d(conv.in_channels, conv.out_channels, 1, bias=conv.bias is not None)
    return nn.Sequential(dw, pw)


class CandidateBuilder:
    """Builds candidates of one space. The channel groups of a depth choice are traced once
    and reused (member names do not change with widths)."""

    def __init__(self, model: nn.Module, space: DerivedSpace, example: tuple, *,
                 inherit: bool = False):
        self.model, self.space, self.example = model, space, example
        self.inherit = inherit
        self._meta = copy.deepcopy(model).to("meta")  # costs are counted on shapes only
        self._plans: dict[tuple, list[tuple]] = {}
        self._orders: dict[tuple, list[torch.Tensor]] = {}
        self._positions: dict[tuple, dict[str, int]] = {}

    def _shallow(self, arch: dict, meta: bool = False) -> nn.Module:
        m = copy.deepcopy(self._meta if meta else self.model)
        for s in self.space.stages:  # depth: the last removable blocks of the stage go
            depth = arch.get(f"{s.name}.depth")
            if depth is not None:
                for path in s.blocks[max(0, depth - s.fixed_blocks):]:
                    set_submodule(m, path, self.space.residual[path].replacement())
        return m

    def _plan(self, m: nn.Module, arch: dict) -> list[tuple]:
        """(group, stage name or None, inside a block?) per resizable group of ``m``."""
        depths = tuple(arch.get(f"{s.name}.depth") for s in self.space.stages)
        if depths not in self._plans:
            m = m if not _on_meta(m) else self._shallow(arch)  # tracing needs real tensors
            keys, _ = module_keys(m, self.example)
            groups, _ = resizable_groups(m, self.example, self.space.ignore)
            where = stage_of_groups(m, groups, keys, [s.key for s in self.space.stages])
            self._plans[depths] = [
                (g, None if i is None else self.space.stages[i].name, inner)
                for g, (i, inner) in zip(groups, where, strict=True)]
            if self.inherit:
                from lighten.prune.importance import group_l2

                self._orders[depths] = [group_l2(m, g).argsort(descending=True)
                                        for g in groups]
            self._positions[depths] = _positions(m, self.example)
        return self._plans[depths]

    def macs(self, m: nn.Module, arch: dict) -> int:
        """Conv / Linear MACs of a candidate built for ``arch`` (meta or not), from its layer
        shapes and the output positions of each layer, which widths do not change."""
        depths = tuple(arch.get(f"{s.name}.depth") for s in self.space.stages)
        self._plan(m, arch)
        positions = self._positions[depths]
        total = 0
        for name, layer in m.named_modules():
            if not isinstance(layer, LAYERS):
                continue
            where = positions.get(name, positions.get(name.rpartition(".")[0]))
            if where is None:
                continue  # never called
            if isinstance(layer, nn.Linear):
                total += where * layer.out_features * layer.in_features
            else:
                k = math.prod(layer.kernel_size)
                total += where * layer.out_channels * (layer.in_channels // layer.groups) * k
        return total

    def __call__(self, arch: dict, *, scale: float = 1.0, seed: int = 0,
                 meta: bool = False) -> nn.Module:
        """The model turned into ``arch`` with every width times ``scale``: fresh weights, or
        with ``inherit`` the trained model's most important channels (``meta``: on the meta
        device, shapes only, for counting its cost fast)."""
        m = self._shallow(arch, meta)
        plan = self._plan(m, arch)
        sizes = []
        for g, name, inner in plan:
            mult = 1.0 if name is None else arch.get(f"{name}.width", 1.0) * scale
            if inner and name is not None:
                mult *= arch.get(f"{name}.expansion", 1.0)
            # round_to counts a layer's channels; a grouped conv has several per group channel
            n = _width(g.size, mult, round_step(g, self.space.round_to))
            sizes.append(min(n, g.size) if self.inherit else n)
        depths = tuple(arch.get(f"{s.name}.depth") for s in self.space.stages)
        resize_groups_(m, [g for g, _, _ in plan], sizes,
                       self._orders[depths] if self.inherit else None)
        fresh: list[nn.Module] = []
        for s in self.space.stages:  # kernel size / depthwise-separable, per stage
            kernel, block = arch.get(f"{s.name}.kernel"), arch.get(f"{s.name}.block", "conv")
            names = dict(m.named_modules())
            for name in s.convs:
                if name not in names:
                    continue  # inside a dropped block
                conv = names[name]
                sep = block == "separable" and name in s.separable
                if sep or (kernel and kernel != conv.kernel_size[0]):
                    new = _new_conv(conv, kernel, sep).to(conv.weight.device)
                    set_submodule(m, name, new)
                    fresh.append(new)
        if meta:
            return m
        if not self.inherit:
            return reinit_(m, seed)
        reinit_(nn.ModuleList(fresh), seed)  # only the layers whose kind changed start fresh
        return m


def _positions(model: nn.Module, example: tuple) -> dict[str, int]:
    """Output positions (elements per channel, batch 1) of every Conv / Linear call."""
    found: dict[str, int] = {}

    def hook(name):
        def record(module, args, out) -> None:
            width = module.out_features if isinstance(module, nn.Linear) else \
                module.out_channels
            found.setdefault(name, out[:1].numel() // width)
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, LAYERS)]
    try:
        with torch.no_grad():
            model.eval()(*(x[:1] for x in example))
    finally:
        for h in handles:
            h.remove()
    return found


def _on_meta(m: nn.Module) -> bool:
    return any(p.is_meta for p in m.parameters())


def build_candidate(model: nn.Module, space: DerivedSpace, arch: dict, example: tuple, *,
                    scale: float = 1.0, seed: int = 0, inherit: bool = False) -> nn.Module:
    """``model`` (not changed) turned into ``arch`` with every width times ``scale``."""
    return CandidateBuilder(model, space, example, inherit=inherit)(arch, scale=scale,
                                                                    seed=seed)


def stage_widths(model: nn.Module, space: DerivedSpace, example: tuple) -> dict[str, int]:
    """The widest channel group of each stage of a candidate (what its widths came to)."""
    keys, _ = module_keys(model, example)
    groups, _ = resizable_groups(model, example)
    out = {s.name: 0 for s in space.stages}
    for g, (index, _) in zip(groups, stage_of_groups(model, groups, keys,
                                                     [s.key for s in space.stages]), strict=True):
        if index is not None:
            name = space.stages[index].name
            out[name] = max(out[name], g.size)
    return out


def _bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def layer_macs(model: nn.Module, example: tuple) -> int:
    """MACs of the Conv / Linear layers, from one forward (hooks): what the search compares
    candidates by, ~20x faster than the traced count (``lighten.measure.count_macs``, which
    the step scales it to and checks the result with)."""
    total = 0

    def hook(module, args, out) -> None:
        nonlocal total
        if isinstance(module, nn.Linear):
            total += out.numel() * module.in_features
        else:  # (N, C_out, *spatial) outputs, C_in / groups x kernel each
            k = 1
            for d in module.kernel_size:
                k *= d
            total += out.numel() * (module.in_channels // module.groups) * k

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    device = "meta" if _on_meta(model) else "cpu"
    try:
        with torch.no_grad():
            model(*(x[:1].to(device) for x in example))
    finally:
        for h in handles:
            h.remove()
    return total


def _macs(model: nn.Module, example: tuple) -> int:
    from lighten.measure import count_macs

    return count_macs(model, example)


def _params(model: nn.Module, example: tuple) -> int:
    """Parameters (what ``lighten.measure.count_params`` counts for float models; works on
    the meta device)."""
    return sum(p.numel() for p in model.parameters())


# budget kind -> counted cost of a model (example inputs at batch 1)
COSTS: dict[str, Callable[[nn.Module, tuple], float]] = {
    "macs": _macs, "params": _params, "bytes": lambda m, e: _bytes(m)}


def fit_to_budget(build: Callable[[float], nn.Module], cost: Callable[[nn.Module], float],
                  budget: float) -> tuple[nn.Module | None, float, float]:
    """(model, scale, cost) of the largest uniform width ``scale`` in [MIN_SCALE, MAX_SCALE]
    (bisected) whose model fits the budget; (None, 0, cost at MIN_SCALE) when none does.
    Every sampled shape thus becomes a candidate *at* the budget: the search compares shapes
    at equal cost instead of rejecting them or rewarding a smaller spend."""
    lo_model = build(MIN_SCALE)
    lo_cost = cost(lo_model)
    if lo_cost > budget:
        return None, 0.0, lo_cost
    best = (lo_model, MIN_SCALE, lo_cost)
    lo, hi = MIN_SCALE, MAX_SCALE
    for probe in (1.0, MAX_SCALE):  # most shapes fit somewhere between these
        model = build(probe)
        c = cost(model)
        if c > budget:
            hi = probe
            break
        lo, best = probe, (model, probe, c)
    else:
        return best
    for _ in range(BISECT_STEPS):
        mid = (lo + hi) / 2
        model = build(mid)
        c = cost(model)
        if c <= budget:
            lo, best = mid, (model, mid, c)
        else:
            hi = mid
    return best
