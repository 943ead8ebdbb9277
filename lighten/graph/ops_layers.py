"""Handlers for the layers that own channels: convs (grouped, depthwise, transposed), Linear, norms.

These create channel spaces (a producer's outputs) and attach the weight axes that surgery
slices: ``out`` / ``in`` / ``depthwise`` / ``norm`` members. ``F.layer_norm`` written out (a
channels-first LayerNorm) is here too: it binds the same ``norm`` member as ``nn.LayerNorm``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import fx

from lighten.errors import UnsupportedError
from lighten.graph.facts import module_kind
from lighten.graph.layout import Layout, Seg, Untied, shape_of, where
from lighten.graph.ops_attention import across
from lighten.graph.ops_params import attach_param

if TYPE_CHECKING:
    from lighten.graph.analysis import Analysis


def _conv(an: Analysis, node: fx.Node, transposed: bool = False) -> Layout:
    """Groups=1 and depthwise as usual. A conv with g groups ties its inputs (and outputs)
    into g copies: every group keeps the same channels, so it stays a g-group conv.

    A transposed conv is the mirror image: its weight is (in, out/groups, k...), so axis 0
    holds every group's inputs and axis 1 the out/g outputs all groups share (members say
    ``transposed``; the bias holds g copies). Stride, padding and output_padding only change
    the spatial size; a depthwise one (weight (C, 1, k...)) passes through like a conv."""
    name, conv = node.target, an.modules[node.target]
    x = an.input(node)
    an.check_axis(node, x, 1, "a transposed convolution" if transposed else "a convolution")
    first_call = (name, "in") not in an.bound
    x = an.bind(name, "in", x, node)
    g = conv.groups
    if g > 1 and g == conv.in_channels == conv.out_channels:  # depthwise: passes through
        if first_call:
            an.attach(x, name, "depthwise")
        return x
    try:
        unit = an.tie(x, g, node)
    except Untied as why:
        kind = "grouped transposed conv" if transposed else "grouped conv"
        reason = f"{kind} {name!r} (groups={g}) is kept whole: {why}"
        an.pin(x, reason)
        out = an.bind(name, "out", Layout(
            1, (Seg(an.new_space(conv.out_channels, reason), conv.out_channels),)), node)
        if first_call and not transposed:
            an.attach(out, name, "out")
        return out
    n = conv.out_channels // g
    out = an.bind(name, "out", Layout(1, (Seg(an.new_space(n), n),) * g), node)
    if first_call and transposed:
        an.attach(x, name, "in", transposed=True)
        an.attach(Layout(1, out.segs[:1]), name, "out", transposed=True)
    elif first_call:
        an.attach(unit, name, "in")
        an.attach(out, name, "out")
    return out


def _convt(an: Analysis, node: fx.Node) -> Layout:
    return _conv(an, node, transposed=True)


def _linear(an: Analysis, node: fx.Node) -> Layout:
    name, linear = node.target, an.modules[node.target]
    rank = len(shape_of(node))
    if node.args[0] in an.derived:  # reads heads back (an attention's out projection)
        why = f"module {name!r} reads values {an.derived[node.args[0]]}"
        width = linear.in_features
        x = Layout(rank - 1, (Seg(an.new_space(width, why), width),))
    else:
        x = an.input(node)
    if x.axis != rank - 1:
        if not all("model input" in an.pins[an.find(seg.space)] for seg in x.segs):
            return across(an, node, x)
        # a (B, T, F) model input read by a Linear: its features are the last axis (the
        # input's channels are never pruned, whichever axis holds them)
        x = Layout(rank - 1, (Seg(an.new_space(linear.in_features, "model input"),
                                  linear.in_features),))
    an.check_axis(node, x, rank - 1, "a Linear layer")
    first_call = (name, "out") not in an.bound
    x = an.bind(name, "in", x, node)
    out = an.bind(name, "out", Layout(
        rank - 1, (Seg(an.new_space(linear.out_features), linear.out_features),)), node)
    if first_call:
        an.attach(x, name, "in")
        an.attach(out, name, "out")
    return out


def _norm(an: Analysis, node: fx.Node, axis: int) -> Layout:
    name, module = node.target, an.modules[node.target]
    x = an.input(node)
    an.check_axis(node, x, axis, type(module).__name__)
    first_call = (name, "in") not in an.bound
    x = an.bind(name, "in", x, node)
    if first_call:
        an.attach(x, name, "norm")
    return x


def _batchnorm(an: Analysis, node: fx.Node) -> Layout:
    return _norm(an, node, 1)  # per channel: blocks (after a shuffle) are fine


def _layernorm(an: Analysis, node: fx.Node) -> Layout:
    module = an.modules[node.target]
    rank = len(shape_of(node))
    if len(module.normalized_shape) != 1:
        raise UnsupportedError(f"module {node.target!r}: LayerNorm over "
                               f"{tuple(module.normalized_shape)} mixes channels with other "
                               "axes; normalize over the feature axis only")
    if any(seg.block != 1 for seg in an.input(node).segs):
        raise UnsupportedError(f"module {node.target!r}: normalization over flattened "
                               "channels")
    return _norm(an, node, rank - 1)


def _groupnorm(an: Analysis, node: fx.Node) -> Layout:
    x = an.input(node)
    an.pin(x, f"GroupNorm {node.target!r} is kept whole")
    return x


def _layer_norm(an: Analysis, node: fx.Node) -> Layout:
    """``F.layer_norm`` over the channel axis (a LayerNorm2d: permute, F.layer_norm,
    permute back). An ``nn.LayerNorm`` subclass's own weight joins as its ``norm`` member
    (its ``normalized_shape`` is updated); another module's weight and bias as parameters,
    where the normalized shape is computed (``x.shape[-1:]``), not written as a number."""
    x = an.input(node)
    rank = len(shape_of(node))
    an.check_axis(node, x, rank - 1, "layer_norm")
    if any(seg.block != 1 for seg in x.segs):
        raise UnsupportedError(f"{where(node)}: layer_norm over flattened channels")
    args = [node.args[i] if i < len(node.args) else node.kwargs.get(k)
            for i, k in enumerate(("input", "normalized_shape", "weight", "bias"))]
    shape, stored = args[1], [a for a in args[2:] if isinstance(a, fx.Node)]
    literal = isinstance(shape, (tuple, list)) and all(type(d) is int for d in shape)
    if literal and len(shape) != 1:
        raise UnsupportedError(f"{where(node)}: layer_norm over {tuple(shape)} mixes "
                               "channels with other axes; normalize over the channel axis "
                               "only")
    if any(a not in an.consts for a in stored):
        raise UnsupportedError(f"{where(node)}: layer_norm with a computed weight or bias; "
                               "structured pruning cannot slice it")
    owners = {an.consts[a].source.target.rpartition(".") for a in stored}
    owner = next(iter(owners))[0] if len(owners) == len(stored) > 0 else None
    module = an.originals.get(owner) if owner is not None else None
    if module is not None and module_kind(module) == "layernorm" and all(
            an.consts[a].source.target.endswith((".weight", ".bias")) for a in stored):
        first_call = (owner, "in") not in an.bound
        x = an.bind(owner, "in", x, node)
        if first_call:
            an.attach(x, owner, "norm")
        return x
    if literal:
        an.pin(x, f"{where(node)}: layer_norm hard-codes normalized_shape "
                  f"{tuple(shape)}; pass x.shape[-1:] to prune these channels")
    for arg in stored:
        attach_param(an, node, arg, x)
    return an.resolve(x)


# kind (lighten.graph.facts) -> handler(analysis, node) -> the node's layout
HANDLERS = {
    "conv": _conv,
    "convt": _convt,
    "linear": _linear,
    "batchnorm": _batchnorm,
    "layernorm": _layernorm,
    "groupnorm": _groupnorm,
    "layer_norm": _layer_norm,
}
