"""Tiny, symmetric per-layer surgery: keep some indices of one axis of a layer's tensors.

Each function slices the parameters (and running statistics) of one layer in place and updates
the constructor facts (``out_channels``, ``in_features``, ``groups``, ``num_features``...) so the
layer is indistinguishable from one built at the smaller size; the artifact records these facts.
:data:`SURGERY` maps (layer type, member kind) to the function, as data: each layer type's
:class:`lighten.layers.LayerSpec` names its functions here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from lighten.errors import UnsupportedError
from lighten.layers import surgery_view

__all__ = ["SURGERY", "axis_length", "prune_module_", "slice_param"]


def slice_param(module: nn.Module, name: str, keep: torch.Tensor, axis: int) -> None:
    """Keep indices ``keep`` of axis ``axis`` of ``module``'s parameter or buffer ``name``."""
    t = getattr(module, name, None)
    if t is None:
        return
    new = t.detach().index_select(axis, keep).clone()
    if isinstance(t, nn.Parameter):
        setattr(module, name, nn.Parameter(new, requires_grad=t.requires_grad))
    else:
        module._buffers[name] = new  # running statistics


_slice_param = slice_param  # the name other modules knew


def _check_groups(conv: _ConvNd, count: int, what: str) -> None:
    if count == 0 or count % conv.groups:
        raise UnsupportedError(f"keeping {count} {what} of a conv with groups={conv.groups} "
                               "would leave unequal groups; the channel analysis should have "
                               "tied them (please report this model)")


def conv_out(conv: _ConvNd, keep: torch.Tensor) -> None:
    """Filters of every group; a grouped conv must keep as many in each group."""
    _check_groups(conv, len(keep), "filters")
    slice_param(conv, "weight", keep, 0)
    slice_param(conv, "bias", keep, 0)
    conv.out_channels = len(keep)


def conv_in(conv: _ConvNd, keep: torch.Tensor) -> None:
    """``keep`` indexes the weight's input axis, which a conv with g groups shares between its
    groups (in_channels / g long): the same inputs are kept in every group."""
    slice_param(conv, "weight", keep, 1)
    conv.in_channels = len(keep) * conv.groups


def conv_depthwise(conv: _ConvNd, keep: torch.Tensor) -> None:
    """A depthwise conv's channel c is both input c and output c (one filter per channel)."""
    conv.groups = len(keep)
    conv_out(conv, keep)
    conv.in_channels = len(keep)


def conv_transpose_out(conv: _ConvTransposeNd, keep: torch.Tensor) -> None:
    """A transposed conv's weight is (in, out/groups, k...): ``keep`` indexes axis 1, which its
    groups share, so the same outputs are kept in every group (the bias holds each group's)."""
    _check_groups(conv, len(keep) * conv.groups, "filters")
    per_group = conv.weight.shape[1]
    slice_param(conv, "weight", keep, 1)
    slice_param(conv, "bias", (keep + per_group * torch.arange(conv.groups)[:, None]).flatten(), 0)
    conv.out_channels = len(keep) * conv.groups


def conv_transpose_in(conv: _ConvTransposeNd, keep: torch.Tensor) -> None:
    """Weight axis 0 holds every group's inputs: a grouped one keeps as many in each group."""
    _check_groups(conv, len(keep), "inputs")
    slice_param(conv, "weight", keep, 0)
    conv.in_channels = len(keep)


def linear_out(linear: nn.Linear, keep: torch.Tensor) -> None:
    slice_param(linear, "weight", keep, 0)
    slice_param(linear, "bias", keep, 0)
    linear.out_features = len(keep)


def linear_in(linear: nn.Linear, keep: torch.Tensor) -> None:
    slice_param(linear, "weight", keep, 1)
    linear.in_features = len(keep)


def batchnorm(bn: _BatchNorm, keep: torch.Tensor) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        slice_param(bn, name, keep, 0)
    bn.num_features = len(keep)


def layernorm(ln: nn.LayerNorm, keep: torch.Tensor) -> None:
    slice_param(ln, "weight", keep, 0)
    slice_param(ln, "bias", keep, 0)
    ln.normalized_shape = (len(keep),)


# (layer type, member kind) -> function: a live view of the layer specs (lighten.layers), where
# each type's surgery is declared. prune_module_ walks the MRO, so subclasses slice like their base.
SURGERY: Mapping[tuple[type[nn.Module], str], Callable[[nn.Module, torch.Tensor], None]] = (
    surgery_view())

_LENGTH: dict[str, Callable[[nn.Module], int]] = {
    "out": lambda m: m.weight.shape[0],
    "depthwise": lambda m: m.weight.shape[0],
    "in": lambda m: m.weight.shape[1],
    "norm": lambda m: m.num_features if isinstance(m, _BatchNorm) else m.normalized_shape[0],
}


def _stored(kind: str) -> tuple[str, int] | None:
    """(tensor name, axis) of a ``param:NAME:DIM`` member: a module's own parameter or buffer
    combined per channel (a layer scale, a positional embedding)."""
    if not kind.startswith("param:"):
        return None
    name, dim = kind.removeprefix("param:").rsplit(":", 1)
    return name, int(dim)


def axis_length(module: nn.Module, kind: str) -> int:
    """Length of the axis a member of ``kind`` slices."""
    stored = _stored(kind)
    if stored is not None:
        return getattr(module, stored[0]).shape[stored[1]]
    if isinstance(module, _ConvTransposeNd) and kind in ("out", "in"):
        return module.weight.shape[1 if kind == "out" else 0]  # weight (in, out/groups, k...)
    return _LENGTH[kind](module)


def prune_module_(module: nn.Module, kind: str, keep: torch.Tensor) -> None:
    """Keep indices ``keep`` (sorted, int64) of ``module``'s ``kind`` axis, in place."""
    stored = _stored(kind)
    if stored is not None:
        slice_param(module, stored[0], keep.to(torch.long), stored[1])
        return
    for cls in type(module).__mro__:
        fn = SURGERY.get((cls, kind))
        if fn is not None:
            fn(module, keep.to(torch.long))
            return
    raise UnsupportedError(f"no surgery for {type(module).__name__} along {kind!r}")
