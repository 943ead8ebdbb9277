"""``arch.fold``: reorganize a model's traced graph into fewer, larger ops with the same outputs.

Passes, in order, each on a fresh ``torch.fx`` trace of the current model:

1. **dropout**: every dropout module becomes ``nn.Identity`` (a no-op in eval).
2. **dead**: modules whose every output is unused (fx dead-code elimination) become
   ``nn.Identity``, so the deployed graph and eager PyTorch stop computing them.
3. **re-parameterize**: RepVGG-style sums of conv(+BN) / BN / identity branches of one input
   become one conv (:mod:`lighten.arch.reparam`).
4. **batchnorm**: BN folded into the conv/linear before it (:func:`lighten.arch.fold`), then a
   BN right *before* a linear or an unpadded conv folded into that layer's input side.
5. **merge**: a Linear read only by another Linear, or any conv read only by a 1x1 conv (stride
   1, no padding), becomes one layer when that does not add MACs; the second becomes Identity.

Every replacement is a standard layer, ``nn.Identity``, an ``nn.Sequential`` of them or the
registered :class:`~lighten.arch.reparam.Zero`, so the result saves and reloads as an artifact.
After each pass the outputs on the check inputs are compared with the original model's; a pass
that moves them more than ``atol`` is undone and noted (it never happened on the zoo). What is
left adjacent afterwards -- conv/linear then an activation -- is what ONNX Runtime and OpenVINO
fuse into one kernel (FusedConv / Gemm+activation); it gets a ``fuse`` row.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from pydantic import Field
from torch import fx, nn

from lighten.arch import reparam
from lighten.modules import require_modules, set_submodule
from lighten.registry import register_step
from lighten.step import StepConfig, StepContext

__all__ = ["Change", "FoldConfig", "FoldResult", "reorganize_"]

_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
             nn.FeatureAlphaDropout)
_LINEARISH = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class FoldConfig(StepConfig):
    dropout: bool = Field(True, description="replace dropout modules by Identity")
    dead: bool = Field(True, description="replace modules whose outputs are never used")
    reparam: bool = Field(True, description="fuse RepVGG-style multi-branch sums into one conv")
    batchnorm: bool = Field(True, description="fold BatchNorm into the conv/linear beside it")
    merge: bool = Field(True, description="merge Linear->Linear and conv->1x1 conv pairs")
    atol: float = Field(1e-4, gt=0, description="largest output change a pass may cause")
    ignore: list[str] = Field(default_factory=list, description="modules left alone")


@dataclass
class Change:
    module: str
    action: str  # fold, drop, reparam, merge, fuse
    before: str
    after: str
    params_before: int = 0
    params_after: int = 0


@dataclass
class FoldResult:
    changes: list[Change] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    max_abs_diff: float = 0.0
    traced: bool = True

    def count(self, action: str) -> int:
        return sum(c.action == action for c in self.changes)


def _params(m: nn.Module | None) -> int:
    return sum(p.numel() for p in m.parameters()) if m is not None else 0


def _describe(m: nn.Module) -> str:
    if isinstance(m, _LINEARISH) and not isinstance(m, nn.Linear):
        k = "x".join(map(str, m.kernel_size))
        g = f", g{m.groups}" if m.groups > 1 else ""
        return f"{type(m).__name__} {m.in_channels}->{m.out_channels} {k}{g}"
    if isinstance(m, nn.Linear):
        return f"Linear {m.in_features}->{m.out_features}"
    return type(m).__name__


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flat(o)]
    return []


def _run(model: nn.Module, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [t.detach().double() for t in _flat(model(*inputs))]


def _diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b, strict=True)):
        return float("inf")
    return max((float((x - y).abs().max()) for x, y in zip(a, b, strict=True)), default=0.0)


def _ignored(name: str, ignore: Sequence[str]) -> bool:
    return any(name == s or name.startswith(s + ".") for s in ignore)


def _trace(model: nn.Module) -> fx.GraphModule:
    from lighten.layers import symbolic_trace

    return symbolic_trace(model)


def _calls(gm: fx.GraphModule) -> dict[str, int]:
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    return calls


# ------------------------------------------------------------------------------------- passes


def _drop_dropout(model, ignore, out: FoldResult) -> None:
    for name, m in list(model.named_modules()):
        if name and isinstance(m, _DROPOUTS) and not _ignored(name, ignore):
            set_submodule(model, name, nn.Identity())
            out.changes.append(Change(name, "drop", _describe(m), "Identity (no-op in eval)"))


def _drop_dead(model, ignore, out: FoldResult) -> None:
    gm = _trace(model)
    before = _calls(gm)
    read = {n.target.rsplit(".", 1)[0] for n in gm.graph.nodes if n.op == "get_attr"}
    gm.graph.eliminate_dead_code()
    after = _calls(gm)
    modules = dict(model.named_modules())
    for name in before:
        m = modules[name]
        if (name in after or isinstance(m, nn.Identity) or _ignored(name, ignore)
                or getattr(m, "inplace", False) or any(r == name or r.startswith(name + ".")
                                                      for r in read)):
            continue
        set_submodule(model, name, nn.Identity())
        out.changes.append(Change(name, "drop", _describe(m), "Identity (output never used)",
                                  _params(m), 0))


def _reparam(model, ignore, out: FoldResult) -> None:
    # 1) modules that are exactly one block: replaced whole by Sequential(conv, *activations)
    for name, m in list(model.named_modules()):
        if not name or not list(m.children()) or _ignored(name, ignore):
            continue
        try:
            model.get_submodule(name)
        except AttributeError:  # inside a block already replaced
            continue
        found = reparam.whole_block(m)
        if found is None:
            continue
        new, parts = found
        if any(_ignored(f"{name}.{p}", ignore) for p in parts):
            continue
        set_submodule(model, name, new)
        out.changes.append(Change(name, "reparam", f"{len(parts)} branch modules summed",
                                  "Sequential(" + ", ".join(_describe(x) for x in new) + ")",
                                  _params(m), _params(new)))
    # 2) sums written inline: fused into the main conv, the other branches zeroed
    gm = _trace(model)
    modules = dict(model.named_modules())
    for p in reparam.find_patterns(gm):
        if any(_ignored(n, ignore) for n in p.modules):
            continue
        removable = [t for t in p.terms if t.conv or t.bn]
        terms = removable if len(removable) < len(p.terms) else p.terms
        main, why = reparam.check(reparam.Pattern(p.add, p.adds, p.src, terms), modules)
        if main is None or len(terms) < 2:
            if why:
                out.notes.append(f"arch.fold: sum at {p.add.name} not re-parameterized: {why}")
            continue
        weight, bias = reparam.fused_kernel(terms, modules, main)
        before = sum(_params(modules[n]) for t in terms for n in (t.conv, t.bn) if n)
        fused = reparam.new_conv(modules[main], weight, bias)
        set_submodule(model, main, fused)
        for t in terms:
            if t.conv == main:
                if t.bn:
                    set_submodule(model, t.bn, nn.Identity())
                continue
            if t.conv:
                set_submodule(model, t.conv, reparam.Zero())
                if t.bn:
                    set_submodule(model, t.bn, nn.Identity())
            else:
                set_submodule(model, t.bn, reparam.Zero())
        out.changes.append(Change(main, "reparam", f"{len(terms)} branches summed",
                                  _describe(fused) + " (others -> Zero)", before,
                                  _params(fused)))


def _fold_bn(model, ignore, out: FoldResult, inputs) -> None:
    from lighten.arch.fold import fold_batchnorm_report, fold_pair

    # fold_batchnorm_report has no ignore list: fold a copy, then apply the allowed pairs
    probe = fold_batchnorm_report(copy.deepcopy(model))
    if probe.method != "fx":
        out.notes.append(f"arch.fold: BN pairs found without fx ({probe.trace_error})")
    for bn, reason in probe.skipped:
        out.notes.append(f"arch.fold: BN {bn} not folded: {reason}")
    modules = dict(model.named_modules())
    for layer, bn in probe.folded:
        if _ignored(layer, ignore) or _ignored(bn, ignore):
            continue
        p = _params(modules[layer]) + _params(modules[bn])
        fold_pair(modules[layer], modules[bn])
        set_submodule(model, bn, nn.Identity())
        out.changes.append(Change(bn, "fold", _describe(modules[bn]),
                                  f"into {layer} (after it)", p, _params(modules[layer])))
    _fold_bn_before(model, ignore, out, inputs)


def _fold_bn_before(model, ignore, out: FoldResult, inputs) -> None:
    """``layer(bn(x))`` -> ``layer'(x)`` for a Linear (2-D input) or an unpadded conv."""
    gm = _shaped_trace(model, inputs)
    modules, calls = dict(model.named_modules()), _calls(gm)
    for node in gm.graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, reparam._BATCHNORMS) or len(node.users) != 1:
            continue
        user = reparam.strip_identity(next(iter(node.users)), {})
        layer = modules.get(user.target) if user.op == "call_module" else None
        if layer is None or _ignored(node.target, ignore) or _ignored(user.target, ignore):
            continue
        if calls[node.target] != 1 or calls[user.target] != 1 or bn.running_mean is None:
            continue
        if isinstance(layer, nn.Linear):
            ok = isinstance(bn, nn.BatchNorm1d) and layer.in_features == bn.num_features \
                and _rank(node) == 2
        elif isinstance(layer, _LINEARISH):
            pad = reparam._padding(layer)
            ok = (layer.groups == 1 and pad is not None and not any(pad)
                  and layer.in_channels == bn.num_features)
        else:
            ok = False
        if not ok:
            continue
        with torch.no_grad():
            scale, shift = reparam._bn_affine(bn, bn.num_features)
            w = layer.weight.double()  # (out, in, *k)
            extra = (w * shift.reshape(1, -1, *([1] * (w.dim() - 2)))).flatten(1).sum(1)
            new_w = w * scale.reshape(1, -1, *([1] * (w.dim() - 2)))
            bias = (layer.bias.double() if layer.bias is not None else torch.zeros_like(extra))
            p = _params(layer) + _params(bn)
            layer.weight.copy_(new_w.to(layer.weight.dtype))
            if layer.bias is None:
                layer.bias = nn.Parameter((bias + extra).to(layer.weight.dtype))
            else:
                layer.bias.copy_((bias + extra).to(layer.weight.dtype))
        set_submodule(model, node.target, nn.Identity())
        out.changes.append(Change(node.target, "fold", _describe(bn),
                                  f"into {user.target} (before it)", p, _params(layer)))


def _rank(node: fx.Node) -> int | None:
    meta = node.meta.get("tensor_meta")
    return len(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _shaped_trace(model: nn.Module, inputs) -> fx.GraphModule:
    """A trace whose nodes carry ``meta["tensor_meta"]`` (shapes) from a run on ``inputs``."""
    from torch.fx.passes.shape_prop import ShapeProp

    gm = _trace(model)
    with torch.no_grad():
        ShapeProp(gm).propagate(*inputs)
    return gm


def _merge(model, ignore, out: FoldResult, inputs) -> None:
    gm = _shaped_trace(model, inputs)
    modules, calls = dict(model.named_modules()), _calls(gm)
    done: set[str] = set()
    for node in gm.graph.nodes:
        a = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(a, _LINEARISH) or node.target in done or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        while (user.op == "call_module" and isinstance(modules.get(user.target), nn.Identity)
               and len(user.users) == 1):
            user = next(iter(user.users))
        b = modules.get(user.target) if user.op == "call_module" else None
        if b is None or user.target in done or calls[node.target] != 1 \
                or calls[user.target] != 1:
            continue
        if _ignored(node.target, ignore) or _ignored(user.target, ignore):
            continue
        merged = _merged(a, b)
        if merged is None:
            continue
        macs = _macs(a, node) + _macs(b, user)
        new_macs = _macs(merged, user)
        if new_macs > macs:
            out.notes.append(f"arch.fold: {node.target} -> {user.target} not merged: "
                             f"{new_macs} MACs merged vs {macs} apart")
            continue
        p = _params(a) + _params(b)
        set_submodule(model, node.target, merged)
        set_submodule(model, user.target, nn.Identity())
        done |= {node.target, user.target}
        out.changes.append(Change(node.target, "merge", f"{_describe(a)} + {_describe(b)}",
                                  f"{_describe(merged)} ({user.target} -> Identity)", p,
                                  _params(merged)))


def _macs(layer: nn.Module, node: fx.Node) -> int:
    """MACs of ``layer`` producing ``node``'s output shape (batch 1)."""
    meta = node.meta.get("tensor_meta")
    shape = tuple(meta.shape) if meta is not None else (1,)
    positions = 1
    if isinstance(layer, nn.Linear):
        for s in shape[1:-1]:
            positions *= s
        return positions * layer.in_features * layer.out_features
    for s in shape[2:]:
        positions *= s
    k = 1
    for s in layer.kernel_size:
        k *= s
    return positions * layer.out_channels * (layer.in_channels // layer.groups) * k


@torch.no_grad()
def _merged(a: nn.Module, b: nn.Module) -> nn.Module | None:
    """One layer computing ``b(a(x))``, or None when that is not exact."""
    if not isinstance(b, _LINEARISH):
        return None
    ab = a.bias.double() if a.bias is not None else None
    bb = b.bias.double() if b.bias is not None else None
    if type(a) is nn.Linear and type(b) is nn.Linear:
        w = b.weight.double() @ a.weight.double()
        bias = (b.weight.double() @ ab if ab is not None else 0) + (bb if bb is not None else 0)
        new = nn.Linear(a.in_features, b.out_features, bias=ab is not None or bb is not None)
    elif (type(a) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) and type(b) is type(a)
          and a.groups == 1 and b.groups == 1 and all(k == 1 for k in b.kernel_size)
          and all(s == 1 for s in b.stride) and reparam._padding(b) is not None
          and not any(reparam._padding(b)) and a.padding_mode == "zeros"
          and reparam._padding(a) is not None):
        w2 = b.weight.double().flatten(1)  # (out2, mid)
        w = torch.einsum("om,mi...->oi...", w2, a.weight.double())
        bias = (w2 @ ab if ab is not None else 0) + (bb if bb is not None else 0)
        new = type(a)(a.in_channels, b.out_channels, a.kernel_size, stride=a.stride,
                      padding=reparam._padding(a), dilation=a.dilation,
                      bias=ab is not None or bb is not None)
    else:
        return None
    new.weight.copy_(w.to(a.weight.dtype))
    if new.bias is not None:
        new.bias.copy_(torch.as_tensor(bias, dtype=torch.float64).expand(new.bias.shape)
                       .to(a.weight.dtype))
    return new.to(a.weight.device)


def _fusable(model, out: FoldResult) -> None:
    """A ``fuse`` row for each conv/linear whose only reader is an activation."""
    gm = _trace(model)
    modules = dict(model.named_modules())
    for node in gm.graph.nodes:
        m = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(m, _LINEARISH) or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        while (user.op == "call_module" and isinstance(modules.get(user.target), nn.Identity)
               and len(user.users) == 1):
            user = next(iter(user.users))
        act = reparam.activation_of(user, modules)
        if act is not None:
            out.changes.append(Change(node.target, "fuse", _describe(m),
                                      f"{_describe(m)}+{type(act).__name__}: one kernel on "
                                      "export", _params(m), _params(m)))


# -------------------------------------------------------------------------------- the step


def reorganize_(model: nn.Module, inputs: Sequence[torch.Tensor],
                config: FoldConfig | None = None) -> FoldResult:
    """Reorganize ``model`` (eval mode) in place; ``inputs`` are ``model(*inputs)`` arguments
    the outputs are checked on (real samples are best: BN statistics fit them)."""
    config = config or FoldConfig()
    require_modules(model, config.ignore, key="arch.fold ignore")
    model.eval()
    out = FoldResult()
    reference = _run(model, inputs)
    try:
        _trace(model)
    except Exception as exc:  # fx raises many types for untraceable code
        out.traced = False
        out.notes.append(f"arch.fold: model not traceable ({type(exc).__name__}); only dropout "
                         "removal and BN folding inside nn.Sequential ran")
    passes = [("dropout", config.dropout, _drop_dropout, False),
              ("dead", config.dead and out.traced, _drop_dead, False),
              ("reparam", config.reparam and out.traced, _reparam, False),
              ("batchnorm", config.batchnorm, _fold_bn if out.traced else _fold_bn_seq,
               out.traced),
              ("merge", config.merge and out.traced, _merge, True)]
    for name, enabled, fn, needs_inputs in passes:
        if not enabled:
            continue
        at, snapshot = len(out.changes), copy.deepcopy(model)
        args = (model, config.ignore, out) + ((inputs,) if needs_inputs else ())
        fn(*args)
        diff = _diff(reference, _run(model, inputs))
        if diff > config.atol:
            _restore(model, snapshot)
            del out.changes[at:]
            out.notes.append(f"arch.fold: pass {name} undone: it changed outputs by {diff:.2e}"
                             f" (> atol {config.atol:g}); "
                             + ("float32 rounding alone moves outputs ~1e-6: raise atol"
                                if diff < 1e-4 else "please report the model"))
    if out.traced:
        _fusable(model, out)
    out.max_abs_diff = _diff(reference, _run(model, inputs))
    return out


def _fold_bn_seq(model, ignore, out: FoldResult) -> None:
    from lighten.arch.fold import fold_batchnorm_report

    report = fold_batchnorm_report(model)  # its sequential fallback on untraceable models
    for layer, bn in report.folded:
        out.changes.append(Change(bn, "fold", "BatchNorm", f"into {layer} (after it)"))


def _restore(model: nn.Module, snapshot: nn.Module) -> None:
    """Put ``snapshot``'s children back into ``model`` (an undone pass)."""
    for name, child in snapshot.named_children():
        model._modules[name] = child
    model.load_state_dict(snapshot.state_dict())


def _check_inputs(ctx: StepContext) -> tuple[torch.Tensor, ...]:
    """One batch of real training inputs (BN statistics fit them)."""
    batch = next(ctx.calibration_batches(32, 32))
    return tuple(batch) if isinstance(batch, tuple) else (batch,)


@register_step("arch.fold", FoldConfig, needs_data=lambda c: "example inputs to check outputs")
def arch_fold(model: nn.Module, config: FoldConfig, ctx: StepContext) -> nn.Module:
    """Fold BN, drop dropout/dead modules, merge linear pairs, re-parameterize branch sums."""
    from lighten.measure import count_macs

    inputs = _check_inputs(ctx)
    example = ctx.example_inputs(1)
    macs_before = count_macs(model, example)
    result = reorganize_(model, inputs, config)
    for c in result.changes:
        ctx.layer(c.module, c.action, before=c.before, after=c.after,
                  params=c.params_after, params_before=c.params_before)
    for note in result.notes:
        ctx.note(note)
    counts = {a: result.count(a) for a in ("fold", "drop", "reparam", "merge", "fuse")}
    ctx.note("arch.fold: " + ", ".join(f"{v} {k}" for k, v in counts.items())
             + f"; max abs output difference {result.max_abs_diff:.2e} (atol {config.atol:g})")
    ctx.summary.update(max_abs_diff=result.max_abs_diff, macs_before=macs_before,
                       macs_after=count_macs(model, example), **counts)
    return ctx.finetune(model, config.finetune)
