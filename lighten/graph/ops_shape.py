"""Handlers for operators that move, keep or reshape the channel axis without mixing channels.

Activations and pooling (``same``), view / reshape / flatten (a window partition keeps the
channel axis; a flatten turns a channel into a block of features), permute / transpose, the two
halves of a channel shuffle (a :class:`~.layout.Split` axis, then merged back as blocks),
``nn.ChannelShuffle``, reductions (a mean over the channel axis with keepdim is a normalization
statistic), indexing that only adds axes, ``torch.roll`` of other axes and ``x.new_empty`` kin.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import fx

from lighten.errors import UnsupportedError
from lighten.graph.layout import Layout, Seg, Split, Untied, literal_size, op_name, shape_of, where
from lighten.graph.ops_attention import into_heads

if TYPE_CHECKING:
    from lighten.graph.analysis import Analysis


def _permutation(node: fx.Node, rank: int) -> list[int]:
    """Where each output axis of a transpose / permute / t comes from."""
    args = node.args[1:]
    if node.target == "t":
        return list(reversed(range(rank)))
    if node.target in ("transpose", torch.transpose):
        swap = [args[0] if args else node.kwargs.get("dim0"),
                args[1] if len(args) > 1 else node.kwargs.get("dim1")]
        if all(isinstance(d, int) for d in swap):
            dims = list(range(rank))
            dims[swap[0] % rank], dims[swap[1] % rank] = swap[1] % rank, swap[0] % rank
            return dims
        dims = swap
    else:
        dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
        dims = dims or node.kwargs.get("dims", ())
    if not all(isinstance(d, int) for d in dims) or len(dims) != rank:
        raise UnsupportedError(f"{where(node)}: {op_name(node)} with axes computed at run time; "
                               "structured pruning needs them as constants")
    return [d % rank for d in dims]


def _axis_after_index(index, axis: int, rank: int) -> int | None:
    """Where ``axis`` lands after ``x[index]``: ``None`` adds axes, one ``...``; other axes may
    be sliced or taken at an integer (a ViT's ``x[:, 0]``), the channel axis only as a full
    slice (``:``). None for any index that could select channels."""
    items = list(index) if isinstance(index, tuple) else [index]
    full = slice(None)
    if not all(i is None or i is Ellipsis or isinstance(i, slice) or type(i) is int
               for i in items) or items.count(Ellipsis) > 1:
        return None
    if Ellipsis in items:
        taken = sum(1 for i in items if i is not None and i is not Ellipsis)
        at = items.index(Ellipsis)
        items[at:at + 1] = [full] * (rank - taken)
    out = 0
    dim = 0
    for item in items:
        if item is None:
            out += 1
            continue
        if dim == axis:
            return out if item == full else None
        dim += 1
        out += isinstance(item, slice)  # an integer drops the axis
    return out + axis - dim  # the channel axis is past the index: shifted by the new axes


def _kept_axis(src: tuple[int, ...], out: tuple[int, ...], axis: int) -> int | None:
    """Where channel ``axis`` of ``src`` lands in a reshape to ``out`` that leaves every
    channel's elements in place -- the same size with as many elements before it and after it
    (a window partition (B, H, W, C) -> (B, H/w, w, W/w, w, C) keeps C last) -- or None."""
    before, after = math.prod(src[:axis]), math.prod(src[axis + 1:])
    for j, n in enumerate(out):
        if n == src[axis] and math.prod(out[:j]) == before and math.prod(out[j + 1:]) == after:
            return j
    return None


def _same(an: Analysis, node: fx.Node) -> Layout | Split:
    """Activations, pooling, dropout: the channel axis keeps its place and size."""
    src, out = shape_of(node.args[0]), shape_of(node)
    split = an.layouts.get(node.args[0])
    if isinstance(split, Split):
        if out != src:
            raise UnsupportedError(f"{where(node)}: {op_name(node)} changes the shape of a "
                                   "channel axis split in two; structured pruning cannot "
                                   "follow it")
        return split
    x = an.input(node)
    if out is None or len(out) != len(src) or out[x.axis] != src[x.axis]:
        raise UnsupportedError(f"{where(node)}: {op_name(node)} changes the channel axis "
                               f"({src} -> {out}); structured pruning cannot follow it")
    return x


def _reshape(an: Analysis, node: fx.Node) -> Layout | Split:
    """Keep, flatten, split in two (a shuffle begins) or merge back (a shuffle ends)."""
    split = an.layouts.get(node.args[0])
    if isinstance(split, Split):
        return _merge(an, node, split)
    x = an.input(node)
    src, out = shape_of(node.args[0]), shape_of(node)
    a = x.axis
    moved = _kept_axis(src, out, a)  # a window partition / reverse keeps C where it is
    keeps = moved is not None
    if keeps:
        x, a = Layout(moved, x.segs), moved
    if not keeps and len(out) == len(src) + 1 and out[:a] == src[:a] \
            and out[a + 2:] == src[a + 1:] and out[a] * out[a + 1] == src[a]:
        _refuse_literal(an, node, a + 1, "channels per group")
        return Split(x, out[a])  # (N, C, ...) -> (N, g, C/g, ...)
    if not keeps and len(out) == a + 1 and out[:a] == src[:a] \
            and out[a] == math.prod(src[a:]):
        k = math.prod(src[a + 1:])  # flatten: every channel becomes k features
        x = Layout(a, tuple(Seg(s.space, s.size, s.block * k) for s in x.segs))
    elif not keeps and a == len(src) - 1 and len(out) > len(src) + 1 \
            and out[:a] == src[:a] and math.prod(out[a:]) == src[a]:
        return into_heads(an, node, x)  # a fused qkv: (B, N, 3 * E) -> (B, N, 3, h, d)
    elif not keeps and len(out) > 1 and all(
            "model input" in an.pins[an.find(seg.space)] for seg in x.segs):
        # the model input reshaped (image rows as tokens): never pruned, on axis 1 again
        return Layout(1, (Seg(an.new_space(out[1], "model input"), out[1]),))
    elif not keeps:
        raise UnsupportedError(f"{where(node)}: {op_name(node)} reshapes {src} -> {out} "
                               "and moves the channel axis; structured pruning cannot "
                               "follow it")
    size = literal_size(node, a)
    if size is not None:
        an.pin(x, f"{where(node)}: {op_name(node)} hard-codes {size} channels")
    return x


def _merge(an: Analysis, node: fx.Node, split: Split) -> Layout:
    """A split channel axis viewed back as one: unchanged, or (after the swap) shuffled."""
    src, out = shape_of(node.args[0]), shape_of(node)
    a = split.layout.axis
    if not (len(out) == len(src) - 1 and out[:a] == src[:a] and out[a + 1:] == src[a + 2:]
            and out[a] == src[a] * src[a + 1]):
        raise UnsupportedError(f"{where(node)}: {op_name(node)} reshapes a channel axis "
                               f"split in two ({src} -> {out}); only merging it back (the "
                               "end of a channel shuffle) is understood")
    _refuse_literal(an, node, a, "channels")
    if not split.swapped:
        return an.resolve(split.layout)
    try:  # out channel i*g + j was channel j*C/g + i: part channel i, j-th of a block of g
        part = an.tie(split.layout, split.groups, node)
    except Untied as why:
        raise UnsupportedError(f"{where(node)}: the channel shuffle ending in "
                               f"{op_name(node)} cannot be followed ({why})") from None
    return Layout(a, tuple(Seg(s.space, s.size, s.block * split.groups) for s in part.segs))


def _refuse_literal(an: Analysis, node: fx.Node, axis: int, what: str) -> None:
    """A shuffle's view may not hard-code a size that pruning changes."""
    size = literal_size(node, axis)
    if size is not None:
        raise UnsupportedError(f"{where(node)}: {op_name(node)} hard-codes {size} {what}, "
                               "which pruning changes; compute it from x.size(1) (or pass "
                               "-1) in the model's forward")


def _permute(an: Analysis, node: fx.Node) -> Layout | Split:
    """The channel axis moves; swapping the halves of a split channel axis is a shuffle."""
    perm = _permutation(node, len(shape_of(node.args[0])))
    split = an.layouts.get(node.args[0])
    if isinstance(split, Split):
        a = split.layout.axis
        swap = list(range(len(perm)))
        swap[a], swap[a + 1] = a + 1, a
        if perm != swap and a + 2 == len(perm):  # attention heads: view(b, t, h, d).transpose
            return into_heads(an, node, split.layout)
        if perm != swap:
            raise UnsupportedError(f"{where(node)}: {op_name(node)} moves a channel axis "
                                   "split in two other than by swapping its halves (a "
                                   "channel shuffle); structured pruning cannot follow it")
        return Split(split.layout, split.groups, not split.swapped)
    x = an.input(node)
    return Layout(perm.index(x.axis), x.segs)


def _shuffle(an: Analysis, node: fx.Node) -> Layout:
    """``nn.ChannelShuffle``: its groups are tied copies, interleaved into blocks."""
    x = an.input(node)
    an.check_axis(node, x, 1, "a channel shuffle")
    groups = an.modules[node.target].groups
    try:
        part = an.tie(x, groups, node)
    except Untied as why:
        raise UnsupportedError(f"module {node.target!r}: channel shuffle cannot be followed "
                               f"({why})") from None
    return Layout(1, tuple(Seg(s.space, s.size, s.block * groups) for s in part.segs))


def _reduce(an: Analysis, node: fx.Node) -> Layout:
    """A mean / sum / max over other axes keeps the channels (the axis moves without keepdim);
    over the channel axis only as a normalization statistic (:func:`_statistic`)."""
    x = an.input(node)
    rank = len(shape_of(node.args[0]))
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    spread = node.target in ("var", "std", torch.var, torch.std)  # (dim, unbiased, keepdim)
    at = 3 if spread else 2
    keepdim = node.args[at] if len(node.args) > at else node.kwargs.get("keepdim", False)
    dims = [dims] if isinstance(dims, int) else dims
    if dims is not None and x.axis in {d % rank for d in dims} and keepdim \
            and node.target in ("mean", torch.mean) + ("var", "std", torch.var, torch.std):
        return _statistic(an, node, x)
    if dims is None or x.axis in {d % rank for d in dims}:
        raise UnsupportedError(f"{where(node)}: {op_name(node)} reduces over the channel "
                               "axis; structured pruning would change its result")
    before = sum(1 for d in dims if d % rank < x.axis)
    return Layout(x.axis if keepdim else x.axis - before, x.segs)


def _statistic(an: Analysis, node: fx.Node, x: Layout) -> Layout:
    """A mean (var, std) over the channel axis kept as a size-1 axis: a normalization
    statistic broadcast back over the channels (ConvNeXt's channels-first LayerNorm). As
    with nn.LayerNorm, pruning changes it only by averaging over fewer channels."""
    why = f"{where(node)}: {op_name(node)} over the channel axis (one value)"
    return Layout(x.axis, (Seg(an.new_space(1, why), 1),))


def _meta(an: Analysis, node: fx.Node) -> None:
    """``x.size()``, ``x.dim()``, ``x.shape``: no tensor, no channels."""
    return None


def _getitem(an: Analysis, node: fx.Node) -> Layout | None:
    """Indexing that only adds axes (``s[:, :, None, None]``, an SE gate) moves the channel
    axis; any other indexing of a followed tensor may select channels and is refused."""
    src = node.args[0]
    items = an.layouts.get(src) if isinstance(src, fx.Node) else None
    if isinstance(items, tuple):  # one output of a call returning several (attention)
        index = node.args[1]
        if type(index) is not int or not -len(items) <= index < len(items):
            raise UnsupportedError(f"{where(node)}: {op_name(node)} takes {index!r} of a "
                                   "call's outputs; structured pruning follows one output "
                                   "at a time (out[0])")
        return items[index]
    if isinstance(src, fx.Node) and an.layouts.get(src) is not None:
        x = an.input(node)
        axis = _axis_after_index(node.args[1], x.axis, len(shape_of(src)))
        if axis is None:
            raise UnsupportedError(f"{where(node)}: indexing a tensor ({op_name(node)}) "
                                   "may select channels; structured pruning cannot follow "
                                   "it")
        return Layout(axis, x.segs)
    return None


def _fresh(an: Analysis, node: fx.Node) -> Layout:
    """``x.new_empty(shape)`` and kin: a drop-path mask (channel axis 1), or a tensor shaped
    like ``x`` (its channels); any other shape is refused."""
    x = an.input(node)
    src, out = shape_of(node.args[0]), shape_of(node)
    if out is not None and len(out) == len(src) and out[x.axis] == 1:
        return Layout(x.axis, (Seg(an.new_space(1, f"{where(node)}: a new tensor"), 1),))
    if out != src:
        raise UnsupportedError(f"{where(node)}: {op_name(node)} makes a {out} tensor from "
                               f"a {src} one whose channels are on axis {x.axis}; structured "
                               "pruning cannot tell whether its size follows them")
    size = literal_size(node, x.axis)
    if size is not None:
        an.pin(x, f"{where(node)}: {op_name(node)} hard-codes {size} channels")
    return x


def _roll(an: Analysis, node: fx.Node) -> Layout:
    """``torch.roll`` along other axes (Swin's shifted windows) keeps every channel."""
    x = an.input(node)
    rank = len(shape_of(node))
    dims = node.args[2] if len(node.args) > 2 else node.kwargs.get("dims")
    dims = [dims] if isinstance(dims, int) else dims
    if not dims or not all(isinstance(d, int) for d in dims) \
            or x.axis in {d % rank for d in dims}:
        raise UnsupportedError(f"{where(node)}: {op_name(node)} rolls the channel axis (or "
                               "a flattened tensor, or axes computed at run time); structured "
                               "pruning cannot follow it (use prune.magnitude instead)")
    return x


# kind (lighten.graph.facts) -> handler(analysis, node) -> the node's layout
HANDLERS = {
    "same": _same,
    "reshape": _reshape,
    "permute": _permute,
    "shuffle": _shuffle,
    "reduce": _reduce,
    "meta": _meta,
    "getitem": _getitem,
    "fresh": _fresh,
    "roll": _roll,
}
