"""Slimmable layers (Yu et al. 2018, "Slimmable Neural Networks") and the channel plan that
places them.

One set of weights, several widths: a :class:`SlimConv` / :class:`SlimLinear` keeps its full
weight and, at width index ``active``, computes with the rows and columns that width keeps; a
:class:`SwitchableBatchNorm` holds one private BatchNorm (statistics and affine) per width,
because a narrower network feeds each BN other statistics.

Which channels a width keeps comes from lighten's channel-dependency analysis
(:func:`lighten.graph.channel_groups`, the groups prune.channels slices): every channel group
keeps its first ``ceil(w x size)`` channels, and every member of the group (the producing conv,
its BN, the consumers' input columns, both sides of a residual add) slices the same ones. A
group the layers here cannot slice (pinned by the model's input/output or a hard-coded view, a
LayerNorm, a grouped conv, a per-channel parameter) stays at full width; a model with no group
left is refused.

:meth:`SlimConv.materialize` (and the Linear / BN ones) gives the standard layer of one width
with its weights physically sliced: what ``export --width`` writes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lighten.errors import UnsupportedError
from lighten.modules import register_module_type, set_submodule

Ranges = list[list[int]]  # kept indices of one axis at one width, as [start, stop) runs


def to_ranges(keep: Tensor) -> Ranges:
    """Sorted indices -> [start, stop) runs (JSON in the artifact; a prefix is one run)."""
    runs: Ranges = []
    for i in keep.tolist():
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return runs


def from_ranges(runs: Ranges) -> Tensor:
    return torch.cat([torch.arange(a, b) for a, b in runs]) if runs else torch.zeros(0, dtype=int)


def _count(runs: Ranges) -> int:
    return sum(b - a for a, b in runs)


def _take(t: Tensor, axis: int, runs: Ranges) -> Tensor:
    """``t`` along ``axis`` at the kept indices: a view for a prefix (the usual case)."""
    if len(runs) == 1 and runs[0][0] == 0:
        return t if runs[0][1] == t.shape[axis] else t.narrow(axis, 0, runs[0][1])
    return t.index_select(axis, from_ranges(runs).to(t.device))


class _Slim(nn.Module):
    """What the slimmable layers share: per width, the kept runs of each sliced axis."""

    def __init__(self, outs: list[Ranges], ins: list[Ranges]):
        super().__init__()
        self.outs = [[list(r) for r in runs] for runs in outs]
        self.ins = [[list(r) for r in runs] for runs in ins]
        self.active = 0  # index into the widths (set by SlimmableModel.set_width)

    def widths(self) -> int:
        return len(self.outs)


@register_module_type
class SlimConv(_Slim):
    """A Conv1d/Conv2d (groups 1, or depthwise) whose width ``active`` uses
    ``weight[outs][:, ins]``; a depthwise conv slices its channels on both sides at once."""

    artifact_type = "lighten.dynamic:SlimConv"

    def __init__(self, dims: int, in_channels: int, out_channels: int, kernel_size, *,
                 stride=1, padding=0, dilation=1, depthwise: bool = False, bias: bool = True,
                 outs: list[Ranges], ins: list[Ranges]):
        super().__init__(outs, ins)
        self.dims, self.depthwise = int(dims), bool(depthwise)
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = tuple(kernel_size)
        self.stride, self.dilation = tuple(stride), tuple(dilation)
        self.padding = padding if isinstance(padding, str) else tuple(padding)
        per_group = 1 if self.depthwise else self.in_channels
        self.weight = nn.Parameter(torch.empty(self.out_channels, per_group, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(self.out_channels)) if bias else None

    @classmethod
    def wrap(cls, conv: nn.Conv1d | nn.Conv2d, outs, ins) -> SlimConv:
        """Takes over ``conv``'s parameters (the same tensors, not copies)."""
        new = cls(conv.weight.dim() - 2, conv.in_channels, conv.out_channels, conv.kernel_size,
                  stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                  depthwise=conv.groups > 1, bias=conv.bias is not None, outs=outs, ins=ins)
        new.weight, new.bias = conv.weight, conv.bias
        return new

    def artifact_config(self) -> dict[str, Any]:
        return {"dims": self.dims, "in_channels": self.in_channels,
                "out_channels": self.out_channels, "kernel_size": list(self.kernel_size),
                "stride": list(self.stride), "dilation": list(self.dilation),
                "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                "depthwise": self.depthwise, "bias": self.bias is not None,
                "outs": self.outs, "ins": self.ins}

    @classmethod
    def from_artifact(cls, config: dict) -> SlimConv:
        c = dict(config)
        return cls(c.pop("dims"), c.pop("in_channels"), c.pop("out_channels"),
                   c.pop("kernel_size"), **c)

    def sliced(self, a: int) -> tuple[Tensor, Tensor | None, int]:
        """(weight, bias, groups) of width ``a``."""
        w = _take(self.weight, 0, self.outs[a])
        if not self.depthwise:
            w = _take(w, 1, self.ins[a])
        b = None if self.bias is None else _take(self.bias, 0, self.outs[a])
        return w, b, (w.shape[0] if self.depthwise else 1)

    def forward(self, x: Tensor) -> Tensor:
        w, b, groups = self.sliced(self.active)
        conv = F.conv1d if self.dims == 1 else F.conv2d
        return conv(x, w, b, self.stride, self.padding, self.dilation, groups)

    def materialize(self, a: int) -> nn.Module:
        w, b, groups = self.sliced(a)
        cls = nn.Conv1d if self.dims == 1 else nn.Conv2d
        conv = cls(w.shape[1] * groups, w.shape[0], self.kernel_size, stride=self.stride,
                   padding=self.padding, dilation=self.dilation, groups=groups,
                   bias=b is not None)
        with torch.no_grad():
            conv.weight.copy_(w)
            if b is not None:
                conv.bias.copy_(b)
        return conv


@register_module_type
class SlimLinear(_Slim):
    """A Linear whose width ``active`` uses ``weight[outs][:, ins]``."""

    artifact_type = "lighten.dynamic:SlimLinear"

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True,
                 outs: list[Ranges], ins: list[Ranges]):
        super().__init__(outs, ins)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features))
        self.bias = nn.Parameter(torch.empty(self.out_features)) if bias else None

    @classmethod
    def wrap(cls, linear: nn.Linear, outs, ins) -> SlimLinear:
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  outs=outs, ins=ins)
        new.weight, new.bias = linear.weight, linear.bias
        return new

    def artifact_config(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "outs": self.outs, "ins": self.ins}

    @classmethod
    def from_artifact(cls, config: dict) -> SlimLinear:
        c = dict(config)
        return cls(c.pop("in_features"), c.pop("out_features"), **c)

    def sliced(self, a: int) -> tuple[Tensor, Tensor | None]:
        w = _take(_take(self.weight, 0, self.outs[a]), 1, self.ins[a])
        return w, None if self.bias is None else _take(self.bias, 0, self.outs[a])

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, *self.sliced(self.active))

    def materialize(self, a: int) -> nn.Module:
        w, b = self.sliced(a)
        linear = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        with torch.no_grad():
            linear.weight.copy_(w)
            if b is not None:
                linear.bias.copy_(b)
        return linear


@register_module_type
class SwitchableBatchNorm(nn.Module):
    """One private BatchNorm per width (``bns[a]``: that width's channels, statistics and
    affine), started as slices of the original BN."""

    artifact_type = "lighten.dynamic:SwitchableBatchNorm"

    def __init__(self, dims: int, sizes: list[int], *, eps: float = 1e-5, momentum=0.1,
                 affine: bool = True, track_running_stats: bool = True):
        super().__init__()
        cls = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
        self.dims, self.sizes = int(dims), [int(s) for s in sizes]
        self.bns = nn.ModuleList(cls(s, eps=eps, momentum=momentum, affine=affine,
                                     track_running_stats=track_running_stats) for s in sizes)
        self.active = 0

    @classmethod
    def wrap(cls, bn: nn.modules.batchnorm._BatchNorm, keeps: list[Ranges]) -> SwitchableBatchNorm:
        new = cls(1 if isinstance(bn, nn.BatchNorm1d) else 2, [_count(k) for k in keeps],
                  eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                  track_running_stats=bn.track_running_stats)
        with torch.no_grad():
            for one, runs in zip(new.bns, keeps, strict=True):
                for name in ("weight", "bias", "running_mean", "running_var"):
                    src = getattr(bn, name)
                    if src is not None:
                        getattr(one, name).copy_(_take(src.detach(), 0, runs))
                if bn.num_batches_tracked is not None:
                    one.num_batches_tracked.copy_(bn.num_batches_tracked)
        return new

    def artifact_config(self) -> dict[str, Any]:
        bn = self.bns[0]
        return {"dims": self.dims, "sizes": self.sizes, "eps": bn.eps, "momentum": bn.momentum,
                "affine": bn.affine, "track_running_stats": bn.track_running_stats}

    @classmethod
    def from_artifact(cls, config: dict) -> SwitchableBatchNorm:
        c = dict(config)
        return cls(c.pop("dims"), c.pop("sizes"), **c)

    def forward(self, x: Tensor) -> Tensor:
        return self.bns[self.active](x)

    def materialize(self, a: int) -> nn.Module:
        import copy

        return copy.deepcopy(self.bns[a])


SLIM_TYPES = (SlimConv, SlimLinear, SwitchableBatchNorm)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


# ----------------------------------------------------------------------------- the plan


def _why_not(module: nn.Module, member) -> str | None:
    """Why this layer cannot slice the member's axis (None: it can)."""
    if member.kind.startswith("param:") or member.transposed:
        return f"{type(module).__name__} holds a per-channel tensor"
    if type(module) in (nn.Conv1d, nn.Conv2d):
        if module.padding_mode != "zeros":
            return f"conv padding_mode {module.padding_mode!r}"
        if module.groups == 1 and member.kind in ("out", "in"):
            return None
        if (member.kind == "depthwise" and module.groups == module.in_channels
                == module.out_channels and member.block == 1):
            return None
        return f"grouped conv (groups={module.groups})"
    if type(module) is nn.Linear and member.kind in ("out", "in"):
        return None
    if type(module) in _BN and member.kind == "norm":
        return None
    return f"{type(module).__name__} ({member.kind})"


def width_channels(size: int, width: float, round_to: int = 1) -> int:
    """Channels a group of ``size`` keeps at ``width``: ceil(width x size), rounded up to a
    multiple of ``round_to``, at least 1, at most ``size``."""
    k = max(1, math.ceil(width * size - 1e-9))
    if round_to > 1:
        k = -(-k // round_to) * round_to
    return min(size, k)


def plan_widths(model: nn.Module, example: Tensor, widths: list[float], *, ignore=(),
                round_to: int = 1) -> tuple[dict, list, list[str]]:
    """Per sliced layer axis ``(module, kind)`` the kept runs at each width; the slimmed
    groups; and one note per group left at full width (why)."""
    from lighten.graph import channel_groups
    from lighten.prune.surgery import axis_length

    groups = channel_groups(model, example)
    notes, slimmed = [], []
    for g in groups:
        if g.pinned or g.size < 2:
            if g.size >= 2 and g.producers():
                notes.append(f"{g.producers()[0].module}: kept whole ({'; '.join(g.pinned)})")
            continue
        producers = [m.module for m in g.producers()]
        if not producers:
            continue
        if any(p in ignore for p in producers):
            notes.append(f"{producers[0]}: kept whole (ignore)")
            continue
        reasons = [r for m in g.members if (r := _why_not(model.get_submodule(m.module), m))]
        if reasons:
            notes.append(f"{producers[0]}: kept whole ({reasons[0]})")
            continue
        slimmed.append(g)
    if not slimmed:
        raise UnsupportedError(
            "dynamic.slimmable: no channel group of the model can be slimmed ("
            + ("; ".join(notes[:3]) or "no conv or Linear produces a channel group")
            + "); it needs convs (groups 1 or depthwise) / Linear layers with BatchNorm whose "
            "channels are not fixed by the model's output or a hard-coded view")
    masks: dict[tuple[str, str], list[Tensor]] = {}
    for g in slimmed:
        for m in g.members:
            length = axis_length(model.get_submodule(m.module), m.kind)
            per_width = masks.setdefault((m.module, m.kind),
                                         [torch.ones(length, dtype=torch.bool) for _ in widths])
            for a, w in enumerate(widths):
                gone = torch.arange(width_channels(g.size, w, round_to), g.size)
                idx = m.offset + gone[:, None] * m.block + torch.arange(m.block)
                per_width[a][idx.flatten()] = False
    keeps = {key: [to_ranges(mask.nonzero().flatten()) for mask in per_width]
             for key, per_width in masks.items()}
    return keeps, slimmed, notes


def make_slimmable_(model: nn.Module, keeps: dict, widths: int) -> list[str]:
    """Replace every sliced conv/Linear by its Slim layer and every BatchNorm by a
    SwitchableBatchNorm (a full-width BN too: its inputs change with the width), in place;
    returns the replaced module names."""
    full = {name: None for name, _ in model.named_modules()}
    by_module: dict[str, dict[str, list[Ranges]]] = {}
    for (name, kind), runs in keeps.items():
        by_module.setdefault(name, {})[kind] = runs
    replaced = []
    for name in full:
        if not name:
            continue
        module = model.get_submodule(name)
        kinds = by_module.get(name, {})
        if type(module) in _BN:
            n = module.num_features
            new = SwitchableBatchNorm.wrap(module, kinds.get("norm", [[[0, n]]] * widths))
        elif not kinds:
            continue
        elif type(module) is nn.Linear:
            new = SlimLinear.wrap(module, *_out_in(kinds, module.out_features,
                                                   module.in_features, widths))
        else:  # a conv (plan_widths admits nothing else)
            if "depthwise" in kinds:
                runs = kinds["depthwise"]
                new = SlimConv.wrap(module, runs, runs)
            else:
                new = SlimConv.wrap(module, *_out_in(kinds, module.out_channels,
                                                     module.in_channels, widths))
        set_submodule(model, name, new)
        replaced.append(name)
    return replaced


def _out_in(kinds: dict, n_out: int, n_in: int, widths: int) -> tuple[list, list]:
    return (kinds.get("out", [[[0, n_out]]] * widths), kinds.get("in", [[[0, n_in]]] * widths))


def set_active_(model: nn.Module, a: int) -> None:
    for module in model.modules():
        if isinstance(module, SLIM_TYPES):
            module.active = a


def materialize(model: nn.Module, a: int) -> nn.Module:
    """A copy of ``model`` (holding Slim layers) with each replaced by the standard layer of
    width ``a``, its weights physically sliced: no Slim layer left."""
    import copy

    plain = copy.deepcopy(model)
    for name, module in list(plain.named_modules()):
        if isinstance(module, SLIM_TYPES):
            new = module.materialize(a)
            if name:
                set_submodule(plain, name, new)
            else:
                plain = new
    return plain


__all__ = ["SlimConv", "SlimLinear", "SwitchableBatchNorm", "make_slimmable_", "materialize",
           "plan_widths", "set_active_", "width_channels"]
