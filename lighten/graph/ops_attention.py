"""Handlers for the transformer families: attention, attention heads and token mixing.

``nn.MultiheadAttention`` as one call (the embedding is its ``in_proj`` columns and
``out_proj`` rows); written-out attention, whose head split is kept whole while the embedding
around it prunes; a Linear along a non-channel axis (MLP-Mixer's token mixing), whose hidden
width is a second followed axis -- a *side* space carried through activations into the Linear
that reads it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import fx, nn

from lighten.errors import UnsupportedError
from lighten.graph.facts import node_kind
from lighten.graph.layout import Layout, Seg, op_name, shape_of, where

if TYPE_CHECKING:
    from lighten.graph.analysis import Analysis


def _attention(an: Analysis, node: fx.Node) -> tuple[Layout, None]:
    """``nn.MultiheadAttention`` (or its pruned form) as one call: query, key and value share
    the embedding channels (``in_proj_weight``'s columns; last axis, batch first or not);
    the output's channels are ``out_proj``'s rows. Prune its heads with prune.heads."""
    name, mha = node.target, an.modules[node.target]
    args = [node.args[i] if i < len(node.args) else node.kwargs.get(key)
            for i, key in enumerate(("query", "key", "value"))]
    xs = [an.input(node, arg) for arg in args]
    rank = len(shape_of(args[0]))
    for x in xs:
        an.check_axis(node, x, rank - 1, type(mha).__name__)
    width = mha.out_proj.out_features
    if (isinstance(mha, nn.MultiheadAttention) and not mha._qkv_same_embed_dim) or \
            getattr(mha, "bias_k", None) is not None or getattr(mha, "add_zero_attn", False):
        why = (f"module {name!r}: {type(mha).__name__} with kdim/vdim, add_bias_kv or "
               "add_zero_attn is kept whole")
        for x in xs:
            an.pin(x, why)
        return Layout(rank - 1, (Seg(an.new_space(width, why), width),)), None
    for x in xs[1:]:
        an.unify(xs[0], x, node)
    first_call = (name, "in") not in an.bound
    x = an.bind(name, "in", an.resolve(xs[0]), node)
    out = an.bind(name, "out", Layout(rank - 1, (Seg(an.new_space(width), width),)), node)
    if first_call:
        if any(seg.block != 1 for seg in x.segs):
            raise UnsupportedError(f"module {name!r}: attention over flattened channels; "
                                   "structured pruning cannot slice it")
        an.attach(x, name, "param:in_proj_weight:1")
        an.attach(out, f"{name}.out_proj", "out")
    return an.resolve(out), None


def into_heads(an: Analysis, node: fx.Node, x: Layout) -> None:
    """The channel axis split into attention heads and moved (``view(b, t, h, d)
    .transpose(1, 2)``, a fused ``qkv.reshape(b, n, 3, h, d).permute(...)``): those channels
    (q/k/v's outputs) are kept whole and not followed further; the projection reading the
    heads back gets a pinned input. The embedding channels around stay prunable."""
    why = f"split into attention heads at {where(node)}"
    an.pin(x, f"{why} (kept whole; remove heads with prune.heads)")
    an.derived[node] = f"from channels {why}"


def across(an: Analysis, node: fx.Node, x: Layout) -> Layout:
    """A Linear applied along an axis that is not the channel axis (MLP-Mixer's token
    mixing: ``x.transpose(1, 2)`` -> ``Linear(tokens, hidden)`` -> ``Linear(hidden,
    tokens)``): the channels pass through on their axis; the features it writes on the last
    axis are a *side* space, followed through activations into the next Linear, which
    reads them (its input columns). What it reads is tokens (never pruned) unless it is
    such a side space; a side space used any other way is pinned (the token count)."""
    name, linear = node.target, an.modules[node.target]
    rank = len(shape_of(node))
    first_call = (name, "out") not in an.bound
    side = an.side.get(node.args[0])
    if side is not None and side[0].axis == rank - 1:
        an.side_read.add((node.args[0], node))
        inner = an.bind(name, "in", side[0], node)
        if first_call:
            an.attach(inner, name, "in")
    out = an.bind(name, "out", Layout(
        rank - 1, (Seg(an.new_space(linear.out_features), linear.out_features),)), node)
    if first_call:
        an.attach(out, name, "out")
    an.side[node] = (an.resolve(out), name)
    return Layout(x.axis, x.segs)


def follow_side(an: Analysis, node: fx.Node) -> None:
    """Carry side spaces (see :func:`across`) through shape-keeping activations; pin them
    wherever else they go. Runs after every node's handler."""
    for arg in node.all_input_nodes:
        side = an.side.get(arg)
        if side is None or (arg, node) in an.side_read or an.side.get(node) is side:
            continue
        kind = node_kind(node, an.modules)
        if kind == "same" and shape_of(node) == shape_of(arg) and node not in an.side:
            an.side[node] = side
            continue
        an.pin(side[0], f"the features {side[1]!r} writes along a non-channel axis (token "
                        f"mixing) go to {where(node)} ({op_name(node)}); they are "
                        "followed only through activations into a Linear that reads them")


# kind (lighten.graph.facts) -> handler(analysis, node) -> the node's layout
HANDLERS = {
    "attention": _attention,
}
