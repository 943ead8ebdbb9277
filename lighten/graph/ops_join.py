"""Handlers for operators that join tensors or cut one into parts.

A broadcasting add / mul merges the spaces of its operands (a residual, an SE gate) and slices a
parameter it meets (a layer scale); ``torch.cat`` lays spaces side by side along the channel axis
or shares them along another (a ViT cls token); ``expand`` keeps the channel axis; ``chunk`` /
``split`` of the channel axis ties its parts like a grouped conv's groups (ShuffleNetV2) or pins
them when their sizes are written into the forward.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import torch
from torch import fx

from lighten.errors import UnsupportedError
from lighten.graph.layout import Layout, Seg, Untied, op_name, shape_of, where
from lighten.graph.ops_params import Const, attach_param, derived_meets

if TYPE_CHECKING:
    from lighten.graph.analysis import Analysis


def _elementwise(an: Analysis, node: fx.Node) -> Layout | None:
    out = shape_of(node)
    if out is None:
        return None
    result: Layout | None = None
    stored: list[fx.Node] = []
    derived: list[fx.Node] = []
    for arg in node.args:
        if not isinstance(arg, fx.Node):
            continue
        shape = shape_of(arg)
        if shape is None or len(shape) == 0:
            continue
        lead = len(out) - len(shape)
        layout = an.layouts.get(arg)
        if layout is None:
            if arg in an.consts and any(d > 1 for d in shape):
                stored.append(arg)
            elif arg in an.derived:
                derived.append(arg)
            continue
        layout = an.resolve(layout)
        axis = layout.axis + lead
        if shape[layout.axis] == 1 and out[axis] != 1:
            continue  # broadcast along the channel axis: no coupling
        if result is None:
            result = Layout(axis, layout.segs)
        elif result.axis != axis:
            raise UnsupportedError(f"{where(node)}: {op_name(node)} combines tensors with "
                                   f"channels on different axes ({result.axis} vs {axis})")
        else:
            an.unify(result, layout, node)
    if result is None:  # only broadcast operands: channels follow the first tensor operand
        first = next((a for a in node.args if isinstance(a, fx.Node)
                      and an.layouts.get(a) is not None), None)
        result = an.layouts.get(first) if first is not None else None
    if result is not None:
        for arg in stored:
            attach_param(an, node, arg, an.resolve(result))
        for arg in derived:
            derived_meets(an, node, arg, an.resolve(result))
    return an.resolve(result) if result is not None else None


def _cat(an: Analysis, node: fx.Node) -> Layout:
    """Along the channel axis spaces sit side by side; along another axis the tensors share
    channels, and a parameter among them (a ViT cls token) is sliced with them."""
    tensors = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    followed = [t for t in tensors if an.layouts.get(t) is not None]
    stored = [t for t in tensors if t not in followed and t in an.consts]
    if not followed or len(followed) + len(stored) < len(tensors):
        an.input(node, next((t for t in tensors if t not in followed and t not in stored),
                            tensors[0]))  # raises: channels that cannot be followed
    layouts = [an.input(node, t) for t in followed]
    rank = len(shape_of(node))
    dim = dim % rank
    if all(lay.axis == dim for lay in layouts):
        if stored:
            raise UnsupportedError(f"{where(node)}: torch.cat adds the channels of "
                                   f"{an.consts[stored[0]].source.target!r} (a parameter "
                                   "or buffer) to followed channels; structured pruning "
                                   "cannot follow it")
        return Layout(dim, tuple(seg for lay in layouts for seg in lay.segs))
    for lay in layouts[1:]:
        an.check_axis(node, lay, layouts[0].axis, "torch.cat")
        an.unify(layouts[0], lay, node)
    for arg in stored:
        attach_param(an, node, arg, an.resolve(layouts[0]))
    return an.resolve(layouts[0])


def _broadcast(an: Analysis, node: fx.Node) -> Layout | None:
    """``expand`` / ``expand_as``: new leading axes, size-1 axes widened. The channel axis
    must keep its size (-1, computed, or ``expand_as`` a tensor with the same channels, which
    joins the group); a size written into the forward pins the channels. Expanding a
    parameter (a ViT cls token) leaves a constant that joins a group where it meets channels
    (a cat along another axis, an add)."""
    src, other = node.args[0], None
    out, shape = shape_of(node), shape_of(src)
    lead = len(out) - len(shape)
    if node.target == "expand":
        sizes = node.args[1:] or (node.kwargs.get("size"),)
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
            sizes = sizes[0]
        if len(sizes) != len(out):  # x.expand(y.shape): computed at run time
            sizes = [None] * len(out)
    else:
        other, sizes = node.args[1], [None] * len(out)
    kept = [i >= lead and (sizes[i] == -1 or other is not None) for i in range(len(out))]
    literal = [s if type(s) is int and s != -1 else None for s in sizes]
    into = an.layouts.get(other) if isinstance(other, fx.Node) else None
    into = an.resolve(into) if isinstance(into, Layout) else None
    if src in an.consts and an.layouts.get(src) is None:
        const = an.consts[src]
        an.consts[node] = Const(const.source, tuple(
            const.literal[i - lead] if kept[i] else literal[i] for i in range(len(out))),
            None if const.axes is None else (None,) * lead + const.axes)
        if into is None:
            return None
        attach_param(an, node, node, into)  # cls.expand_as(x): the parameter takes x's channels
        return into
    x = an.input(node)
    a = x.axis + lead
    if out[a] != shape[x.axis]:
        raise UnsupportedError(f"{where(node)}: {op_name(node)} changes the channel axis "
                               f"({shape} -> {out}); structured pruning can follow an expand "
                               "only where the channel axis keeps its size")
    if literal[a] is not None:
        an.pin(x, f"{where(node)}: {op_name(node)} hard-codes {literal[a]} channels")
    result = Layout(a, x.segs)
    if into is not None:  # the output takes other's shape: its channels are these
        an.check_axis(node, into, a, op_name(node))
        an.unify(result, into, node)
    elif other in an.consts:
        attach_param(an, node, other, result)
    elif other is not None:
        raise UnsupportedError(f"{where(node)}: {op_name(node)} takes its shape from a "
                               "tensor whose channels cannot be followed")
    return an.resolve(result)


def _chunk(an: Analysis, node: fx.Node) -> tuple[Layout, ...]:
    """``chunk`` / ``split`` (ShuffleNetV2's ``x1, x2 = x.chunk(2, dim=1)``). Along another
    axis every part keeps the channels. Along the channel axis the parts are cut from the
    run-time width: ``chunk(n)`` or ``split(C // n)`` must cut a pruned tensor at the same
    place, so the n parts are tied (they keep the same channels, as a grouped conv's
    groups); sizes written into the forward (``split([4, 12])``) pin the parts whole."""
    x = an.input(node)
    rank = len(shape_of(node.args[0]))
    meta = node.meta.get("tensor_meta")
    shapes = [tuple(m.shape) for m in meta] if isinstance(meta, (tuple, list)) else []
    if not shapes or any(len(s) != rank for s in shapes):
        raise UnsupportedError(f"{where(node)}: {op_name(node)} without tensor shapes; "
                               "structured pruning cannot follow it")
    chunk = node.target in ("chunk", torch.chunk)
    how = node.args[1] if len(node.args) > 1 else next(
        (node.kwargs[k] for k in ("chunks", "split_size_or_sections", "split_size")
         if k in node.kwargs), None)
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    if dim % rank != x.axis:
        return tuple(x for _ in shapes)
    sizes = [s[x.axis] for s in shapes]
    equal = len(set(sizes)) == 1 and len(sizes) > 1 and (
        (chunk and how == len(sizes)) or _counts_channels(how, node.args[0], x.axis, rank)
        == len(sizes))
    if equal:
        try:
            part = an.tie(x, len(sizes), node)
            return tuple(part for _ in sizes)
        except Untied as why:
            reason = (f"{where(node)}: {op_name(node)} cuts {x.width} channels into "
                      f"{len(sizes)} parts that pruning cannot keep alike ({why})")
    elif isinstance(how, fx.Node) or (isinstance(how, (list, tuple)) and any(
            isinstance(h, fx.Node) for h in how)):
        raise UnsupportedError(f"{where(node)}: {op_name(node)} cuts the channel axis at "
                               "sizes computed at run time; structured pruning follows "
                               "chunk(n) and split(x.size(1) // n) (or keeps sizes written "
                               "as numbers whole)")
    else:
        reason = (f"{where(node)}: {op_name(node)} cuts the channels at sizes {sizes} "
                  "that pruning would move (written into the forward, or unequal chunks)")
    return _pieces(an, x, sizes, reason)


def _pieces(an: Analysis, x: Layout, sizes: list[int], reason: str) -> tuple[Layout, ...]:
    """``x`` cut at ``sizes``, kept whole: ``x`` is pinned and each part is a new pinned
    space (a cut may fall inside a run of channels kept as one, a shuffled block)."""
    an.pin(x, reason)
    return tuple(Layout(x.axis, (Seg(an.new_space(n, reason), n),)) for n in sizes)


def _counts_channels(how, src: fx.Node, axis: int, rank: int) -> int | None:
    """``n`` when ``how`` is ``src``'s channel count divided by n (``x.size(1) // n``,
    ``x.shape[1] // n``), else None."""
    if not (isinstance(how, fx.Node) and how.target is operator.floordiv
            and type(how.args[1]) is int):
        return None
    size = how.args[0]
    if not isinstance(size, fx.Node):
        return None
    if size.target == "size" and len(size.args) == 2:  # x.size(1)
        owner, dim = size.args
    elif size.target is operator.getitem and isinstance(size.args[0], fx.Node):
        whole, dim = size.args  # x.shape[1], x.size()[1]
        if not ((whole.target == "size" and len(whole.args) == 1)
                or (whole.target is getattr and whole.args[1] == "shape")):
            return None
        owner = whole.args[0]
    else:
        return None
    if owner is not src or type(dim) is not int or dim % rank != axis:
        return None
    return how.args[1]


# kind (lighten.graph.facts) -> handler(analysis, node) -> the node's layout
HANDLERS = {
    "elementwise": _elementwise,
    "cat": _cat,
    "broadcast": _broadcast,
    "chunk": _chunk,
}
