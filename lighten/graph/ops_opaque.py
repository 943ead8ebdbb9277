"""Calls the tables do not describe, probed at run time: followed only if they act per channel.

A ``torch.fx.wrap``'d function (timm's ``drop_path``), a leaf module without a graph kind, or an
operation the tables lack is run twice on random inputs -- all channels, then a shuffled subset
-- and followed when the subset's outputs are the matching outputs; otherwise it is refused with
an error naming the node and what the user can register.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import fx, nn

from lighten.errors import UnsupportedError
from lighten.graph.layout import Layout, op_name, shape_of, where

if TYPE_CHECKING:
    from lighten.graph.analysis import Analysis


def leaf(an: Analysis, node: fx.Node) -> Layout:
    """A call the tracer keeps whole -- a function wrapped with ``torch.fx.wrap`` (a
    ``drop_path``), a leaf module without a kind -- or an operation the tables lack. Its
    channels pass through when it acts on each channel on its own, which is checked by
    running it (on a copy, random inputs, the same random seed each time): dropping and
    reordering channels of its input must drop and reorder them in its output, nothing
    else. Otherwise it is refused, naming the node and what the user can do."""
    followed = [a for a in node.all_input_nodes if an.layouts.get(a) is not None]
    why = _not_channelwise(node, followed, an.layouts, an.modules)
    if why is None:
        return an.input(node, followed[0])
    if node.op == "call_module":
        module = an.modules[node.target]
        name = type(module).__name__
        raise UnsupportedError(
            f"module {node.target!r} ({name}) is not understood by the channel analysis "
            f"({why}); structured pruning cannot follow it. If it acts on each channel on its "
            f"own, register_layer_spec(LayerSpec({name}, graph_kind='same')) "
            "(lighten.layers); if it mixes channels (an RNN such as GRU or LSTM does), use "
            "prune.magnitude, which needs no channel analysis")
    fix = (f"; if channels pass through it, lighten.graph.FUNCTION_KINDS[{op_name(node)}] "
           "= 'same'" if node.op == "call_function" else "")
    raise UnsupportedError(f"{where(node)}: operation {op_name(node)} is not understood "
                           f"({why}); structured pruning cannot follow it{fix} (or use "
                           "prune.magnitude instead)")


def _not_channelwise(node: fx.Node, followed: list[fx.Node], layouts: dict,
                     modules: dict[str, nn.Module]) -> str | None:
    """Why the call at ``node`` cannot be shown to act on each channel on its own (None: it
    can): it must take one tensor with channels and nothing else computed, keep its shape, and
    give ``f(x[:, idx])[:, j] == f(x)[:, idx[j]]`` for a random subset ``idx`` in random order."""
    if len(followed) != 1:
        return "it takes no tensor with channels" if not followed else \
            "it takes several tensors with channels"
    src = followed[0]
    layout = layouts[src]
    if not isinstance(layout, Layout):
        return "its input is a channel axis split in two, or several outputs"
    if any(a is not src for a in node.all_input_nodes):
        return "it takes values computed at run time besides the channels"
    shape, out = shape_of(src), shape_of(node)
    dtype = getattr(src.meta.get("tensor_meta"), "dtype", None)
    if out != shape:
        return f"it changes the shape {shape} -> {out}"
    if dtype is None or not dtype.is_floating_point:
        return "its input is not a float tensor"
    axis, width = layout.axis, shape[layout.axis]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(dtype)
    idx = torch.randperm(width, generator=gen)[:max(1, width - 1 - width // 3)]

    def call(t: torch.Tensor):
        args = fx.node.map_arg(node.args, lambda _n: t)
        kwargs = fx.node.map_arg(node.kwargs, lambda _n: t)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(0)  # the same dropped samples (a drop path) in both calls
            if node.op == "call_module":
                return copy.deepcopy(modules[node.target])(*args, **kwargs)
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            return node.target(*args, **kwargs)

    try:
        full, part = call(x), call(x.index_select(axis, idx))
    except Exception as err:  # noqa: BLE001 -- any failure means "not per channel"
        return f"it fails on fewer channels ({type(err).__name__})"
    if not (isinstance(full, torch.Tensor) and isinstance(part, torch.Tensor)
            and part.shape == full.index_select(axis, idx).shape
            and torch.allclose(part, full.index_select(axis, idx), rtol=1e-4, atol=1e-5)):
        return "its output channels do not follow its input channels one to one"
    return None
