"""``lighten check``: before compressing, say per module what each technique can do with it.

Whole-model facts (fx tracing, MAC counting, ONNX export) are probed once and then attributed to
modules. Per-module facts (prunable, quantizable...) are DATA in :data:`MODULE_FACTS`: a rule read
from the module's :class:`lighten.layers.LayerSpec` (the specs the steps read), and where cheap a
*trial* that asks the step itself -- the structured-pruning dependency analysis, head detection,
and each quantizer run on a copy of the model -- so "yes" means the step changes that layer.

Rows are the leaf modules plus every module that holds parameters of its own (a positional
embedding on the model, ``nn.MultiheadAttention``'s ``in_proj_weight``): the rows' params add up
to the model's.
"""

from __future__ import annotations

import copy
import inspect
import io
import linecache
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from lighten.errors import ModelError
from lighten.export import FLOAT_RTOL
from lighten.layers import (
    LAYER_SPECS,
    SpecTracer,
    dynamic_quant_class,
    layer_spec,
    static_quant_class,
    symbolic_trace,
    weight_only_class,
)

YES = "yes"
NO = "no"
NOT_APPLICABLE = "-"


@dataclass(frozen=True)
class Trial:
    """What a step did (or would do) to a model: the modules it changes, why others stay."""

    changed: set[str]
    why: dict[str, str] = field(default_factory=dict)  # module name -> reason it stays


@dataclass(frozen=True)
class ModuleFact:
    """Whether a technique applies to a module; ``otherwise`` is the cell text when it does not.

    ``applies(module)`` is the layer-type rule; ``reason`` (text, or a function of the module)
    says why a type is not covered. ``trial(model, example) -> Trial``, when given, decides for
    the modules the rule accepts; an exception it raises is the reason for all of them.
    """

    applies: Callable[[nn.Module], bool]
    reason: str | Callable[[nn.Module], str]
    otherwise: str = NO
    trial: Callable[[nn.Module, torch.Tensor], Trial] | None = None

    def why(self, module: nn.Module) -> str:
        return self.reason(module) if callable(self.reason) else self.reason


def _has_matrix_weight(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, nn.Parameter) and weight.dim() >= 2


def _type_names(pick: Callable[[object], object]) -> str:
    return "/".join(c.__name__ for c, s in LAYER_SPECS.items() if pick(s)) or "none"


def _spec_reason(fact: str, covered: Callable[[object], object], step: str):
    def reason(module: nn.Module) -> str:
        spec = layer_spec(module)
        if spec is not None and fact in spec.why_not:
            return spec.why_not[fact]
        return f"{step} covers {_type_names(covered)}"
    return reason


# ------------------------------------------------------------------------- trials (the steps)


def _changed(before: nn.Module, after: nn.Module) -> set[str]:
    """Modules of ``before`` that ``after`` replaced or reshaped (same path)."""
    out = set()
    for name, module in before.named_modules():
        try:
            new = after.get_submodule(name)
        except AttributeError:
            out.add(name)
            continue
        shapes = {k: tuple(v.shape) for k, v in module.named_parameters(recurse=False)}
        new_shapes = {k: tuple(v.shape) for k, v in new.named_parameters(recurse=False)}
        if type(new) is not type(module) or shapes != new_shapes:
            out.add(name)
    return out


def _notes_by_module(model: nn.Module, notes: list[str]) -> dict[str, str]:
    """The first note about each module (notes start with the module's name)."""
    out: dict[str, str] = {}
    for name, _ in model.named_modules():
        if not name:
            continue
        for note in notes:
            if note.startswith((f"{name} ", f"{name}:")):
                out.setdefault(name, note.removeprefix(name).lstrip(" :"))
    return out


def _zeros(module: nn.Module) -> int:
    return sum(int((p == 0).sum()) for p in module.parameters(recurse=False))


def _unstructured_trial(model: nn.Module, example: torch.Tensor) -> Trial:
    """prune.magnitude (half of every layer's weights) on a copy: the modules that gained
    zeros."""
    from lighten.prune.magnitude import MagnitudePruneConfig, prune_magnitude_

    pruned = copy.deepcopy(model)
    with torch.no_grad():
        prune_magnitude_(pruned, MagnitudePruneConfig(sparsity=0.5, scope="layer"))
    after = dict(pruned.named_modules())
    return Trial({name for name, m in model.named_modules()
                  if name in after and _zeros(after[name]) > _zeros(m)})


def _structured_trial(model: nn.Module, example: torch.Tensor) -> Trial:
    """Members of the groups prune.channels (conv producers) or prune.neurons (Linear
    producers) would prune; pins say why the others stay."""
    from lighten.graph import channel_groups
    from lighten.prune.structured import prunable_groups
    from lighten.unfused import unfuse_

    traced = copy.deepcopy(model)  # as prune.channels does: stock transformer layers unfused
    unfuse_(traced, attention=False)
    names = {name for name, _ in model.named_modules()}
    changed: set[str] = set()
    for scope in ("channels", "neurons"):
        for group in prunable_groups(traced, example, scope=scope):
            changed.update(_existing_ancestor(m.module, names) for m in group.members)
    why: dict[str, str] = {}
    for group in channel_groups(traced, example):
        for m in group.members:
            if _existing_ancestor(m.module, names) not in changed:
                reason = ("; ".join(group.pinned) if group.pinned else
                          "its channels cannot be removed (one channel)" if group.size <= 1 else
                          "no Conv/Linear creates these channels")
                why.setdefault(_existing_ancestor(m.module, names), f"kept whole: {reason}")
    return Trial(changed, why)


def _existing_ancestor(path: str, names: set[str]) -> str:
    """``path`` itself if the user's model has it, else its nearest ancestor that it has (an
    unfused attention's q_proj belongs to the stock attention row)."""
    while path not in names and path:
        path = path.rpartition(".")[0]
    return path


def _heads_trial(model: nn.Module, example: torch.Tensor) -> Trial:
    """prune.heads (half the heads) on a copy; if it refuses, every attention found says why."""
    from lighten.prune.heads import HeadPruneConfig, find_attention, prune_heads_

    members = set()
    for site in find_attention(model):
        members.add(site.path)
        prefix = f"{site.path}." if site.path else ""
        members.update(prefix + n for n in (*(row for row, _ in site.rows), site.out))
    pruned = copy.deepcopy(model)
    try:
        prune_heads_(pruned, HeadPruneConfig(ratio=0.5), example)
    except Exception as e:  # noqa: BLE001 -- the refusal is the answer for these modules
        return Trial(set(), dict.fromkeys(members, _first_line(e)))
    changed = _changed(model, pruned)
    return Trial(changed, dict.fromkeys(members - changed, "one head: nothing to remove"))


def _quant_trial(run: Callable[[nn.Module, list[str]], None],
                 quantized: Callable[[nn.Module], type | None]) -> Callable:
    """A trial that runs a quantizer on a copy: a module counts when the module now at its path
    is quantized (whatever its type was: a stock attention's out_proj, unfused first)."""
    def trial(model: nn.Module, example: torch.Tensor) -> Trial:
        notes: list[str] = []
        copied = copy.deepcopy(model)
        run(copied, example, notes)
        targets = tuple({t for m in model.modules() if (t := quantized(m)) is not None})

        def is_quantized(m: nn.Module) -> bool:
            return isinstance(m, targets) or type(m).__module__.startswith("lighten.quant")

        changed, covered = set(), set()
        for name, module in model.named_modules():
            if quantized(module) is not None:
                covered.add(name)  # a type the quantizer targets: its notes say why it stays
            try:
                new = copied.get_submodule(name)
            except AttributeError:
                continue
            if is_quantized(new):
                changed.add(name)
        notes_by = _notes_by_module(model, notes)
        return Trial(changed, {n: why for n, why in notes_by.items() if n in covered})
    return trial


def _run_ptq(model, example, notes) -> None:
    from lighten.quant.ptq import PTQConfig, quantize_ptq_

    quantize_ptq_(model, [example], PTQConfig(), notes=notes)


def _run_dynamic(model, example, notes) -> None:
    from lighten.quant.dynamic import quantize_dynamic_

    quantize_dynamic_(model, notes=notes)


def _run_weight_only(model, example, notes) -> None:
    from lighten.quant.weight_only import WeightOnlyConfig, quantize_weight_only_

    quantize_weight_only_(model, WeightOnlyConfig(method="rtn"), notes=notes)


def _attention(module: nn.Module) -> bool:
    """Attention modules holding their projections (a hand-written block's q/k/v/out Linears
    are found by the trial)."""
    from lighten.prune.heads import PrunedMultiheadAttention

    return isinstance(module, (nn.MultiheadAttention, PrunedMultiheadAttention))


MODULE_FACTS: dict[str, ModuleFact] = {
    "prunable": ModuleFact(
        _has_matrix_weight, "no `weight` Parameter of dim >= 2", trial=_unstructured_trial),
    "prunable (structured)": ModuleFact(
        lambda m: bool(getattr(layer_spec(m), "surgery", None)),
        lambda m: (f"no channel surgery for {type(m).__name__} (a LayerSpec with surgery, "
                   "lighten.layers.register_layer_spec, adds it)"),
        trial=_structured_trial),
    "prunable (heads)": ModuleFact(
        _attention, "not attention", otherwise=NOT_APPLICABLE, trial=_heads_trial),
    "quantizable": ModuleFact(
        lambda m: static_quant_class(m) is not None,
        _spec_reason("quantizable", lambda s: s.static_quant, "static int8"),
        otherwise="stays float", trial=_quant_trial(_run_ptq, static_quant_class)),
    "quantizable (dynamic)": ModuleFact(
        lambda m: dynamic_quant_class(m) is not None,
        _spec_reason("quantizable (dynamic)", lambda s: s.dynamic_quant, "quant.dynamic"),
        otherwise=NOT_APPLICABLE, trial=_quant_trial(_run_dynamic, dynamic_quant_class)),
    "quantizable (weight-only)": ModuleFact(
        lambda m: weight_only_class(m) is not None,
        _spec_reason("quantizable (weight-only)", lambda s: s.weight_only, "quant.weight_only"),
        otherwise=NOT_APPLICABLE, trial=_quant_trial(_run_weight_only, weight_only_class)),
}

WHOLE_MODEL_FACTS = ("traceable", "measurable", "exportable")


@dataclass
class CheckRow:
    name: str
    type: str
    params: int
    macs: int | None
    cells: dict[str, str]  # fact -> "yes" / "no" / ... in WHOLE_MODEL_FACTS + MODULE_FACTS order
    why_not: list[str] = field(default_factory=list)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def _leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The rows: leaf modules and every module holding parameters of its own."""
    return [(name, m) for name, m in model.named_modules()
            if not any(True for _ in m.children())
            or any(True for _ in m.parameters(recurse=False))]


def _inside(name: str, names: set[str]) -> bool:
    """Whether a module enclosing ``name`` (the model itself aside) is in ``names``."""
    parts = name.split(".")
    return any(".".join(parts[:i]) in names for i in range(1, len(parts)))


# ------------------------------------------------------------------------- whole-model probes


def _untraceable(model: nn.Module) -> dict[str, str]:
    """name -> error for every module fx would trace into and cannot (its own leaves excluded)."""
    tracer = SpecTracer()
    failing = {}
    for name, module in model.named_modules():
        if name and tracer.is_leaf_module(module, name):
            continue  # fx never traces inside these (torch.nn built-ins, registered specs)
        try:
            symbolic_trace(module)
        except Exception as e:
            failing[name] = _first_line(e)
    return failing


def _trace_facts(model: nn.Module, leaves) -> dict[str, tuple[str, str | None]]:
    """name -> (cell, reason). Failures are blamed on the innermost module that will not trace."""
    try:
        graph = symbolic_trace(model).graph
    except Exception:  # any tracing failure is a fact to report
        failing = _untraceable(model)
        culprits = [n for n in failing if not any(o.startswith(n + ".") or (n == "" and o)
                                                  for o in failing)]
        blame = ", ".join(f"`{c or type(model).__name__}`" for c in culprits)
        out = {}
        for name, _ in leaves:
            if name in failing:
                out[name] = (NO, failing[name])
            else:
                out[name] = (NO, f"the model does not trace because of {blame}")
        return out
    called = {n.target for n in graph.nodes if n.op == "call_module"}
    # a module whose parameters the graph reads is used, called or not (an attention block
    # passing out_proj.weight to F.multi_head_attention_forward)
    read = {str(n.target).rpartition(".")[0] for n in graph.nodes if n.op == "get_attr"}
    tracer = SpecTracer()
    out = {}
    for name, module in leaves:
        if name in called or _inside(name, called):
            out[name] = (YES, None)
        elif name and tracer.is_leaf_module(module, name):
            out[name] = ((YES, None) if name in read
                         else (NO, f"not in the traced graph ({UNUSED})"))
        else:
            out[name] = ("inlined", "fx traced through it: graph tools see its ops, not the module")
    return out


UNUSED = "never called in forward and its parameters never read"


class _ParamReads(TorchFunctionMode):
    """Records the modules whose own parameters a forward reads: as a call's argument
    (``F.linear(x, self.out_proj.weight)``, PyTorch's fused encoder kernel taking every weight)
    or as the tensor a method runs on (``self.pos.expand(...)``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.owners: dict[int, list[str]] = {}
        for name, module in model.named_modules():
            for p in module.parameters(recurse=False):
                self.owners.setdefault(id(p), []).append(name)
        self.read: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for arg in (*args, *kwargs.values()):
            for t in (arg if isinstance(arg, (list, tuple)) else (arg,)):
                if isinstance(t, nn.Parameter):
                    self.read.update(self.owners.get(id(t), ()))
        return func(*args, **kwargs)


def _measure_facts(model, leaves, example) -> tuple[dict[str, tuple[str, str | None]], dict]:
    """Count MACs the way ``lighten measure`` does (one forward, PyTorch's attention fast path
    off so its fused kernel is counted); a module is measurable when that forward called it or
    read its parameters. A row's MACs are its own: its module's count less its children's, so
    the column adds up to the model's."""
    from lighten.measure.macs import count_macs_by_module

    ran: set[str] = set()

    def hook(name):
        return lambda *_: ran.add(name)

    hooks = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()]
    reads = _ParamReads(model)
    try:
        with reads:
            flops = count_macs_by_module(model, example)
    except Exception as e:
        reason = f"MAC counting failed: {_first_line(e.__cause__ or e)}"
        return {name: (NO, reason) for name, _ in leaves}, {}
    finally:
        for h in hooks:
            h.remove()
    macs = {name: flops.get(name, 0) - sum(flops.get(f"{name}.{c}" if name else c, 0)
                                           for c, _ in m.named_children())
            for name, m in leaves}
    used = ran | reads.read
    facts = {}
    for name, m in leaves:
        stores = any(True for _ in m.parameters(recurse=False))
        if name in used or (not stores and _inside(name, used)):
            facts[name] = (YES, None)
        else:
            facts[name] = (NO, UNUSED)
    return facts, macs


# ----------------------------------------------------------------------------- ONNX export


@dataclass(frozen=True)
class Frozen:
    """Where the ONNX trace froze Python control flow (a TracerWarning) that changes the result:
    the innermost module running and the user's line (the innermost frame outside torch)."""

    module: str  # model-relative name ("" = the model)
    kind: str  # its class name
    where: str | None  # "model.py:21 (`if x.sum() > 0:`)"
    message: str  # the warning's first sentence


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


def _where(frame) -> str:
    path = frame.f_code.co_filename
    try:
        shown = os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        shown = path
    shown = path if shown.startswith("..") else shown
    line = linecache.getline(path, frame.f_lineno).strip()
    return f"{shown}:{frame.f_lineno}" + (f" (`{line}`)" if line else "")


def _locate(model: nn.Module, names: dict[int, str], stop) -> tuple[str, str | None]:
    """(innermost module running, user's line) from the frames below ``stop`` (the export)."""
    module, where = None, None
    frame = inspect.currentframe()
    while frame is not None and frame.f_code is not stop:
        path = frame.f_code.co_filename
        if module is None and id(frame.f_locals.get("self")) in names:
            module = names[id(frame.f_locals["self"])]
        if (where is None and not path.startswith(_TORCH_DIR) and path != __file__
                and os.path.basename(path) != "warnings.py"):
            where = _where(frame)
        frame = frame.f_back
    return module or "", where


def _export(module: nn.Module, example: torch.Tensor) -> tuple[str | None, list]:
    """(error or None, :class:`Frozen` findings). The model is exported at batch 1 with a
    dynamic batch, then ONNX Runtime runs it on other inputs at other batch sizes: a finding
    is reported only when the export then differs from PyTorch (or fails)."""
    names = {id(m): n for n, m in module.named_modules()}
    caught: list[tuple[str, str | None, str]] = []

    def show(message, category, *_):
        if issubclass(category, torch.jit.TracerWarning):
            owner, where = _locate(module, names, _export.__code__)
            caught.append((owner, where, str(message).split(". ")[0].rstrip(".")))

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        try:
            torch.onnx.export(module, (example,), buf, dynamo=False, opset_version=17,
                              input_names=["input"], dynamic_axes={"input": {0: "batch"}})
        except Exception as e:
            return _first_line(e), []
    differs = _differs(module, buf.getvalue(), _probes(example))
    if differs is None:
        return None, []
    seen, found = set(), []
    for owner, where, message in caught:
        if (owner, where) not in seen:
            seen.add((owner, where))
            kind = type(module.get_submodule(owner)).__name__
            found.append(Frozen(owner, kind, where, f"{message}; {differs}"))
    return None, found or [Frozen("", type(module).__name__, None, differs)]


def _probes(example: torch.Tensor) -> list[torch.Tensor]:
    """Inputs unlike the batch-1 export example: other batch sizes, signs and values."""
    g = torch.Generator().manual_seed(0)
    shape = tuple(example.shape[1:])
    if not example.is_floating_point():
        high = max(2, int(example.max()) + 1)
        return [torch.randint(0, high, (b, *shape), generator=g, dtype=example.dtype)
                for b in (3, 2)]
    x = torch.randn(3, *shape, generator=g, dtype=example.dtype)
    big = 4 * x.abs() + 1  # all positive, then all negative: a linear feature's sign flips
    return [x, big[:2], -big[1:]]


def _flat(outputs) -> list[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    if isinstance(outputs, (list, tuple)):
        return [t for o in outputs for t in _flat(o)]
    return []


def _differs(model: nn.Module, onnx_bytes: bytes, probes) -> str | None:
    """How the exported model differs from PyTorch on ``probes`` (None: it matches)."""
    try:
        import onnxruntime as ort
    except ImportError:  # nothing to compare with: only a failing export is a finding
        return None
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    try:
        sess = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    except Exception as e:
        return f"ONNX Runtime cannot load the export: {_first_line(e)}"
    for x in probes:
        with torch.no_grad():
            ref = _flat(model(x))
        try:
            got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
        except Exception as e:
            return f"the export fails on a batch of {len(x)}: {_first_line(e)}"
        if len(got) != len(ref):
            return f"the export returns {len(got)} outputs, PyTorch {len(ref)}"
        for out, r in zip(got, ref, strict=True):
            r = r.detach().float().numpy()
            if out.shape != r.shape:
                return (f"on a batch of {len(x)} the export returns shape {tuple(out.shape)}, "
                        f"PyTorch {tuple(r.shape)}")
            diff = float(np.max(np.abs(out - r))) if r.size else 0.0
            scale = max(1.0, float(np.max(np.abs(r)))) if r.size else 1.0
            if not diff <= FLOAT_RTOL * scale:
                return (f"on another input (batch {len(x)}) the export differs from PyTorch "
                        f"by up to {diff:.3g}")
    return None


def _export_facts(model, leaves, example) -> dict[str, tuple[str, str | None]]:
    """Export the whole model and compare it with PyTorch on other inputs; on failure
    re-export each leaf alone to find the culprit."""
    error, frozen = _export(model, example)
    if error is None:
        out: dict[str, tuple[str, str | None]] = {}
        for f in frozen:
            at = f" at {f.where}" if f.where else ""
            inside = f"`{f.module}` ({f.kind})" if f.module else f"`{f.kind}`"
            for name, _ in leaves:
                if f.module == "" or name == f.module or name.startswith(f.module + "."):
                    out.setdefault(name, ("frozen", f"ONNX trace froze Python control flow{at} "
                                                    f"in {inside}: {f.message}"))
        return {name: out.get(name, (YES, None)) for name, _ in leaves}
    inputs: dict[nn.Module, torch.Tensor] = {}

    def grab(mod, args):
        if args and isinstance(args[0], torch.Tensor):
            inputs.setdefault(mod, args[0].detach().clone())

    hooks = [m.register_forward_pre_hook(grab) for _, m in leaves
             if not any(True for _ in m.children())]  # a leaf can be exported alone
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for name, m in leaves:
        own = _export(m, inputs[m])[0] if m in inputs else None
        out[name] = (NO, f"ONNX export: {own}" if own else f"model export failed: {error}")
    return out


# ----------------------------------------------------------------------------------- the check


def _trials(model: nn.Module, example: torch.Tensor) -> dict[str, Trial | str]:
    """fact -> the step's :class:`Trial`, or the first line of the error it raised."""
    out: dict[str, Trial | str] = {}
    for fact, rule in MODULE_FACTS.items():
        if rule.trial is None:
            continue
        try:
            with torch.random.fork_rng(devices=[]):  # checking must not shift the caller's RNG
                out[fact] = rule.trial(model, example)
        except Exception as e:  # the step refusing this model is the answer
            out[fact] = _first_line(e)
    return out


def _cell(rule: ModuleFact, trial: Trial | str | None, name: str,
          module: nn.Module) -> tuple[str, str | None]:
    refused = NO if rule.otherwise == NOT_APPLICABLE else rule.otherwise
    if isinstance(trial, Trial) and name in trial.changed:
        return YES, None
    if isinstance(trial, Trial) and name in trial.why:
        return refused, trial.why[name]
    if not rule.applies(module):  # a "-" (the technique is not for this type) needs no reason
        return rule.otherwise, None if rule.otherwise == NOT_APPLICABLE else rule.why(module)
    if trial is None:
        return YES, None
    if isinstance(trial, str):
        return refused, trial
    return refused, "the step leaves it unchanged in this model"


def check_model(model: nn.Module, input_shape: Sequence[int], *,
                example: torch.Tensor | None = None) -> list[CheckRow]:
    """One row per module holding parameters (and per parameterless leaf): what tracing, MAC
    counting, ONNX export and each technique make of it. ``input_shape`` excludes the batch
    dimension, e.g. (1, 28, 28); ``example`` (batch 1) replaces the zeros input built from it."""
    try:
        shape = tuple(int(d) for d in input_shape)
    except (TypeError, ValueError):
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise ModelError(f"input shape {input_shape!r} is invalid; "
                         "pass positive sizes without the batch, like 1,28,28")
    example = torch.zeros(1, *shape) if example is None else example
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    except Exception as e:
        model.train(was_training)
        raise ModelError(f"the model does not run on input shape {shape} "
                         f"({_first_line(e)}); pass the right --input-shape C,H,W") from None
    try:
        leaves = _leaves(model)
        traced = _trace_facts(model, leaves)
        measured, macs = _measure_facts(model, leaves, example)
        exported = _export_facts(model, leaves, example)
        trials = _trials(model, example)
    finally:
        model.train(was_training)

    rows, seen = [], set()
    for name, module in leaves:
        own = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in own)  # a shared (tied) parameter counts once, where first held
        params = sum(p.numel() for p in own)
        cells, why = {}, []
        for fact, (cell, reason) in (("traceable", traced[name]), ("measurable", measured[name]),
                                     ("exportable", exported[name])):
            cells[fact] = cell
            if reason:
                why.append(f"{fact}: {reason}")
        for fact, rule in MODULE_FACTS.items():
            if params == 0:
                cells[fact] = NOT_APPLICABLE  # nothing stored, nothing to compress
                continue
            cells[fact], reason = _cell(rule, trials.get(fact), name, module)
            if cells[fact] != YES and reason:
                why.append(f"{fact}: {reason}")
        rows.append(CheckRow(name or "(model)", type(module).__name__, params, macs.get(name),
                             cells, why))
    return rows


def format_check(rows: Sequence[CheckRow]) -> str:
    """Fixed-width table for the terminal, with a one-line summary per fact underneath."""
    from lighten.report import format_table, human_count

    facts = [*WHOLE_MODEL_FACTS, *MODULE_FACTS]
    header = ["module", "type", "params", "MACs", *facts, "why not"]
    body = [[r.name, r.type, human_count(r.params), human_count(r.macs),
             *(r.cells[f] for f in facts), "; ".join(r.why_not) or ""] for r in rows]
    table = format_table(header, body, left=[True, True] + [False] * (len(facts) + 2) + [True])
    counts = {f: (sum(r.cells[f] == YES for r in rows),
                  sum(r.cells[f] != NOT_APPLICABLE for r in rows)) for f in facts}
    summary = ", ".join(f"{f} {yes}/{total}" for f, (yes, total) in counts.items())
    return f"{table}\n\n{summary}"
