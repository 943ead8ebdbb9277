"""Parameters and buffers the forward combines with channels, and values computed from them.

A parameter added or multiplied per channel, or concatenated along another axis, maybe expanded,
indexed ``w[:, None, None]`` or viewed ``(1, -1, 1, 1)`` (a :class:`Const`), joins the group as
a ``param:NAME:DIM`` member of its owner and is sliced with the channels. A value computed from
parameters alone (a relative position bias, a window mask) is *derived*: no channels flow
through it, and where it meets followed channels it pins them.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import fx

from lighten.errors import UnsupportedError
from lighten.graph.facts import node_kind
from lighten.graph.layout import Layout, literal_size, op_name, shape_of, where

if TYPE_CHECKING:
    from lighten.graph.analysis import Analysis


@dataclass(frozen=True)
class Const:
    """A value made from one module parameter or buffer (``source``, its get_attr node), maybe
    expanded (a ViT cls token): ``literal`` is, per axis of the value, the size an expand
    hard-coded there (None where kept or computed at run time)."""

    source: fx.Node
    literal: tuple[int | None, ...]
    # per axis of the value, the source's axis it is (None: added); None: the source's axes are
    # the value's last ones (an expand adds leading axes)
    axes: tuple[int | None, ...] | None = None


def attach_param(an: Analysis, node: fx.Node, arg: fx.Node, layout: Layout) -> None:
    """A parameter or buffer combined per channel (a layer scale, a positional embedding, a
    cls token concatenated along another axis) is sliced with the channels: it joins the
    group as member ``param:NAME:DIM`` of its owner. ``arg`` may be it expanded."""
    const = an.consts[arg]
    at = layout.axis - (len(shape_of(node)) - len(shape_of(arg)))  # the channel axis in arg
    if at < 0:
        return  # broadcast along the channel axis: no coupling
    if const.literal[at] is not None:
        an.pin(layout, f"{where(arg)}: {op_name(arg)} hard-codes "
                       f"{const.literal[at]} channels")
        return
    arg = const.source
    shape = shape_of(arg)
    dim = (at - (len(const.literal) - len(shape)) if const.axes is None
           else const.axes[at] if const.axes[at] is not None else -1)
    if dim < 0 or shape[dim] == 1:
        return  # broadcast along the channel axis: no coupling
    owner, _, name = arg.target.rpartition(".")
    module = an.originals.get(owner)
    if module is None or not (name in module._parameters or name in module._buffers):
        raise UnsupportedError(f"{where(node)}: {op_name(node)} with a constant of shape "
                               f"{shape} that is not a parameter or buffer of a module; "
                               "structured pruning cannot slice it (register it with "
                               "nn.Parameter or register_buffer)")
    if shape[dim] != layout.width:
        raise UnsupportedError(f"{where(node)}: {arg.target!r} has {shape[dim]} channels "
                               f"where the tensor it meets has {layout.width}; a parameter "
                               "that widens the channel axis is not followed")
    if name in module._non_persistent_buffers_set:
        # not in the state_dict: a sliced copy could not be saved, the reload would be wrong
        an.pin(layout, f"{where(node)}: {arg.target!r} is a non-persistent buffer "
                       "(register_buffer(..., persistent=False)); make it persistent to "
                       "prune these channels")
        return
    if any(seg.block != 1 for seg in layout.segs):
        raise UnsupportedError(f"{where(node)}: {op_name(node)} with {arg.target!r} over "
                               "flattened channels; structured pruning cannot slice it")
    kind = f"param:{name}:{dim}"
    if (owner, kind) not in an.bound:
        an.bound[(owner, kind)] = layout
        an.attach(layout, owner, kind)
    else:
        an.bind(owner, kind, layout, node)


def const_view(an: Analysis, node: fx.Node) -> bool:
    """A parameter indexed with ``None`` / ``:`` (``w[:, None, None]``), viewed or unsqueezed
    with size-1 axes only (``gamma.view(1, -1, 1, 1)``) stays that parameter: where it meets
    channels it is sliced with them. Records it and says whether it did."""
    if node.target not in (operator.getitem, "view", "reshape", "unsqueeze", torch.reshape):
        return False
    src = node.args[0] if node.args else None
    if not isinstance(src, fx.Node) or src not in an.consts or an.layouts.get(src):
        return False
    const, shape, out = an.consts[src], shape_of(src), shape_of(node)
    if shape is None or out is None:
        return False
    if node.target is operator.getitem:
        axes, literal = _index_axes(node.args[1], len(shape)), [None] * len(out)
    else:
        axes = _view_axes(shape, out)
        literal = [None if node.target == "unsqueeze" or out[i] == 1
                   else literal_size(node, i) for i in range(len(out))]
    if axes is None or len(axes) != len(out):
        return False
    base = _source_axes(const, len(shape_of(const.source)))
    an.consts[node] = Const(const.source, tuple(
        lit if lit is not None else None if a is None else const.literal[a]
        for a, lit in zip(axes, literal, strict=True)),
        tuple(None if a is None else base[a] for a in axes))
    return True


def from_constants(an: Analysis, node: fx.Node) -> bool:
    """Whether ``node`` is computed from parameters and buffers alone (a relative position
    bias gathered from its table, a window attention mask); it is then recorded in
    ``Analysis.derived`` and no channels flow through it. A parameter that is only expanded
    keeps its own tracking (a cls token joins a channel group where it meets channels)."""
    inputs = node.all_input_nodes
    if shape_of(node) is None or not inputs \
            or any(an.layouts.get(a) is not None for a in inputs) \
            or not any(a in an.consts or a in an.derived for a in inputs):
        return False
    kind = node_kind(node, an.modules)
    if kind == "meta" or (kind == "broadcast" and node.args[0] in an.consts):
        return False
    an.derived[node] = next((an.derived[a] for a in inputs if a in an.derived),
                            "computed from parameters or buffers")
    return True


def derived_meets(an: Analysis, node: fx.Node, arg: fx.Node, layout: Layout) -> None:
    """A value whose channels are not followed (see ``Analysis.derived``) meets followed
    channels: where it varies along the channel axis, those channels must stay."""
    shape, out = shape_of(arg), shape_of(node)
    at = layout.axis - (len(out) - len(shape))
    if at >= 0 and shape[at] > 1:
        an.pin(layout, f"{where(node)}: {op_name(node)} combines these channels with "
                       f"{arg.name!r} ({an.derived[arg]}), which structured pruning "
                       "cannot slice (combine the parameter itself, or add the layers "
                       "making these channels to ignore:)")


def _index_axes(index, rank: int) -> list[int | None] | None:
    """Per output axis of ``t[index]``, the axis of ``t`` it is (None: added by ``None``);
    None unless the index holds only ``None``, ``:``, ``...`` and integers."""
    items = list(index) if isinstance(index, tuple) else [index]
    if items.count(Ellipsis) > 1 or not all(
            i is None or i is Ellipsis or type(i) is int
            or (isinstance(i, slice) and i == slice(None)) for i in items):
        return None
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items[at:at + 1] = [slice(None)] * (rank - sum(i is not None for i in items) + 1)
    axes, dim = [], 0
    for item in items:
        if item is None:
            axes.append(None)
            continue
        if isinstance(item, slice):
            axes.append(dim)
        dim += 1
    return axes + list(range(dim, rank))


def _view_axes(src: tuple[int, ...], out: tuple[int, ...]) -> list[int | None] | None:
    """Per output axis of a view that only adds or drops size-1 axes, the source axis it is."""
    big_src = [i for i, n in enumerate(src) if n != 1]
    big_out = [i for i, n in enumerate(out) if n != 1]
    if [src[i] for i in big_src] != [out[i] for i in big_out]:
        return None
    axes: list[int | None] = [None] * len(out)
    for o, i in zip(big_out, big_src, strict=True):
        axes[o] = i
    return axes


def _source_axes(const: Const, rank: int) -> tuple[int | None, ...]:
    """Per axis of a constant's value, the axis of its parameter (None: added)."""
    if const.axes is not None:
        return const.axes
    lead = len(const.literal) - rank
    return tuple(i - lead if i >= lead else None for i in range(len(const.literal)))
