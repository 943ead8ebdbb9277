"""Fold eval-mode BatchNorm into the conv / linear layer right before it.

``y = gamma * (W x + b - mean) / sqrt(var + eps) + beta`` is again a layer with
``W' = W * gamma / sqrt(var + eps)`` (per output channel) and ``b' = (b - mean) * that + beta``.
Quantization must see the folded weights, or the BN rescaling happens after rounding.

Pairs come from a torch.fx trace (any traceable model); when the model cannot be traced, only
adjacent pairs inside ``nn.Sequential`` containers are folded, and the report says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

_PRODUCERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass
class FoldReport:
    folded: list[tuple[str, str]] = field(default_factory=list)  # (layer name, bn name)
    method: str = "fx"  # "fx" or "sequential"
    trace_error: str | None = None  # why fx could not trace, when method == "sequential"
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (bn name, reason)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every foldable BatchNorm in place and return ``model`` (report: see below)."""
    fold_batchnorm_report(model)
    return model


def fold_batchnorm_report(model: nn.Module) -> FoldReport:
    """Fold in place and say what was folded, how the pairs were found, and what was not."""
    report = FoldReport()
    try:
        pairs = _pairs_from_fx(model, report)
    except Exception as exc:  # fx raises many types for untraceable code
        report.method = "sequential"
        report.trace_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        pairs = _pairs_from_sequential(model)
    modules = dict(model.named_modules())
    for layer_name, bn_name in pairs:
        layer, bn = modules[layer_name], modules[bn_name]
        if not bn.track_running_stats or bn.running_mean is None:
            report.skipped.append((bn_name, "no running statistics (track_running_stats=False)"))
            continue
        if _out_channels(layer) != bn.num_features:
            report.skipped.append((bn_name, f"{bn.num_features} features vs {layer_name} output"))
            continue
        fold_pair(layer, bn)
        model.set_submodule(bn_name, nn.Identity())
        report.folded.append((layer_name, bn_name))
    return report


@torch.no_grad()
def fold_pair(layer: nn.Module, bn: nn.Module) -> None:
    """Fold ``bn``'s eval-mode affine transform into ``layer``'s weight and bias (in place)."""
    w = layer.weight.double()
    mean, var = bn.running_mean.double(), bn.running_var.double()
    gamma = bn.weight.double() if bn.affine else torch.ones_like(mean)
    beta = bn.bias.double() if bn.affine else torch.zeros_like(mean)
    factor = gamma / torch.sqrt(var + bn.eps)  # (C_out,)
    bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(mean)
    layer.weight.copy_((w * factor.reshape(-1, *([1] * (w.dim() - 1)))).to(layer.weight.dtype))
    new_bias = ((bias - mean) * factor + beta).to(layer.weight.dtype)
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias)
    else:
        layer.bias.copy_(new_bias)


def _out_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _pairs_from_fx(model: nn.Module, report: FoldReport) -> list[tuple[str, str]]:
    from torch import fx

    graph = fx.symbolic_trace(model).graph
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], _BATCHNORMS):
            continue
        src = node.args[0] if node.args else None
        if not (isinstance(src, fx.Node) and src.op == "call_module"
                and isinstance(modules[src.target], _PRODUCERS)):
            continue
        if len(src.users) != 1:
            report.skipped.append((node.target, f"{src.target}'s output is also used elsewhere"))
        elif calls[src.target] != 1 or calls[node.target] != 1:
            report.skipped.append((node.target, "layer or BN module is called more than once"))
        else:
            pairs.append((src.target, node.target))
    return pairs


def _pairs_from_sequential(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (a_name, a), (b_name, b) in zip(children, children[1:], strict=False):
            if isinstance(a, _PRODUCERS) and isinstance(b, _BATCHNORMS):
                prefix = f"{name}." if name else ""
                pairs.append((prefix + a_name, prefix + b_name))
    return pairs
