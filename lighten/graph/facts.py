"""Per-operator facts as data: how channels flow through each module type, function and method.

The analysis dispatches on the *kind* these tables give (:mod:`.analysis` maps each kind to its
handler); adding an operator that behaves like a known one is one table entry, no code. Module
kinds live in each layer type's spec (:mod:`lighten.layers`); :data:`MODULE_KINDS` is a live view.
Users extend :data:`FUNCTION_KINDS` for their own functions (the refusal message says how).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import fx, nn

from lighten.layers import module_kinds_view

# How channels flow through an operator, by kind:
#   conv / linear   consume channels on the input, create a new space on the output
#   convt           a transposed conv: as conv, but its weight holds outputs on axis 1
#   batchnorm       per-channel parameters on axis 1; layout unchanged
#   layernorm       per-feature parameters on the last axis; layout unchanged
#   groupnorm       mixes channels within groups: coupled spaces stay whole
#   same            shape-preserving along the channel axis (activations, pooling, dropout)
#   elementwise     broadcasting binary op: operands with that channel axis share one space
#   cat             concatenation: along the channel axis spaces sit side by side
#   reshape         flatten / view: allowed when the channel axis survives (or is flattened last),
#                   or splits it in two / merges it back (the two halves of a channel shuffle)
#   broadcast       expand / expand_as: new leading axes; the channel axis must keep its size
#   permute         transpose / permute: the channel axis moves; swapping the two halves of a
#                   split channel axis is a channel shuffle
#   shuffle         nn.ChannelShuffle
#   reduce          mean/sum over non-channel axes; a mean (var, std) over the channel axis
#                   with keepdim is a normalization statistic: one pinned channel, broadcast back
#   chunk           chunk / split: along the channel axis, equal parts computed at run time are
#                   tied (kept alike, as a grouped conv's groups); fixed sizes pin the parts
#   layer_norm      F.layer_norm over the channel axis (a LayerNorm2d written with permutes)
#   fresh           x.new_empty(...) and kin: a new tensor whose channel axis is 1 (a drop-path
#                   mask) or x's
#   (none)          a function torch.fx.wrap keeps as a leaf, or a leaf module without a kind,
#                   is probed: channels pass through when it acts on each channel on its own
#   attention       nn.MultiheadAttention: query/key/value share its embedding channels (in_proj
#                   columns, last axis); its output's are out_proj's rows; returns (out, weights)
#   roll            torch.roll along axes other than the channel axis (a shifted window)
#   meta            returns no tensor (x.size(), x.dim(), getattr)
#   getitem         indexing: one output of a call returning several, or axes added around the
#                   channels (s[:, :, None, None])
#   refuse          moves or selects channels (unbind, repeat): not analysable

# Module kinds live in each layer type's spec (lighten.layers); this is a live view of them.
MODULE_KINDS: Mapping[type[nn.Module], str] = module_kinds_view()

FUNCTION_KINDS: dict[Callable, str] = {
    **{fn: "same" for fn in (
        F.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.mish, F.hardswish,
        F.hardsigmoid, F.hardtanh, F.softplus, F.dropout, F.max_pool1d, F.max_pool2d,
        F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
        F.adaptive_max_pool2d, F.interpolate, F.pad, torch.relu, torch.sigmoid, torch.tanh,
        F.sigmoid, F.tanh, torch.clamp, torch.clone,
        # normalization written out (ConvNeXt's channels-first LayerNorm), stochastic depth
        # traced through (timm's drop_path in training mode)
        torch.sqrt, torch.rsqrt, torch.exp, torch.abs, operator.neg, torch.zeros_like,
        torch.ones_like, torch.rand_like, torch.randn_like, torch.empty_like, torch.bernoulli)},
    **{fn: "elementwise" for fn in (
        operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd,
        operator.imul, torch.add, torch.sub, torch.mul, torch.div, torch.maximum,
        torch.minimum, operator.pow, torch.pow)},
    torch.cat: "cat", torch.concat: "cat",
    torch.flatten: "reshape", torch.reshape: "reshape",
    torch.mean: "reduce", torch.sum: "reduce", torch.amax: "reduce", torch.var: "reduce",
    torch.std: "reduce",
    getattr: "meta", operator.getitem: "getitem",
    torch.permute: "permute", torch.transpose: "permute",
    torch.split: "chunk", torch.chunk: "chunk",  # channel splits (ShuffleNetV2)
    F.layer_norm: "layer_norm",
    torch.roll: "roll",  # shifted windows roll spatial axes (Swin)
}

METHOD_KINDS: dict[str, str] = {
    **{m: "same" for m in ("relu", "relu_", "sigmoid", "tanh", "clamp", "contiguous", "clone",
                           "float", "detach", "sqrt", "rsqrt", "exp", "abs", "neg", "bernoulli_")},
    **{m: "elementwise" for m in ("add", "add_", "sub", "mul", "mul_", "div", "pow", "div_",
                                  "sub_")},
    "flatten": "reshape", "view": "reshape", "reshape": "reshape", "unsqueeze": "reshape",
    "mean": "reduce", "sum": "reduce", "amax": "reduce", "var": "reduce", "std": "reduce",
    "size": "meta", "dim": "meta",
    "permute": "permute", "transpose": "permute", "t": "permute",
    "expand": "broadcast", "expand_as": "broadcast",
    "split": "chunk", "chunk": "chunk",
    **{m: "fresh" for m in ("new_empty", "new_zeros", "new_ones", "new_full")},
    "roll": "roll",
    **{m: "refuse" for m in ("unbind", "repeat")},
}


def module_kind(module: nn.Module) -> str | None:
    """``module``'s graph kind: its type's, else the nearest base class's (None: no kind)."""
    for cls in type(module).__mro__:
        if cls in MODULE_KINDS:
            return MODULE_KINDS[cls]
    return None


def node_kind(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """The kind of the operator ``node`` calls (None: the tables lack it)."""
    if node.op == "call_module":
        return module_kind(modules[node.target])
    kinds = FUNCTION_KINDS if node.op == "call_function" else METHOD_KINDS
    return kinds.get(node.target)
