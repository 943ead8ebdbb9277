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
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lighten.errors import ModelError
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


def _unstructured_trial(model: nn.Module, example: torch.Tensor) -> Trial:
    from lighten.prune.magnitude import prunable_weights

    return Trial(set(prunable_weights(model)))


def _structured_trial(model: nn.Module, example: torch.Tensor) -> Trial:
    """Members of the groups prune.channels (conv producers) or prune.neurons (Linear
    producers) would prune; pins say why the others stay."""
    from lighten.graph import channel_groups
    from lighten.prune.structured import prunable_groups

    changed: set[str] = set()
    for scope in ("channels", "neurons"):
        for group in prunable_groups(model, example, scope=scope):
            changed.update(m.module for m in group.members)
    why: dict[str, str] = {}
    for group in channel_groups(model, example):
        for m in group.members:
            if m.module not in changed:
                reason = ("; ".join(group.pinned) if group.pinned else
                          "its channels cannot be removed (one channel)" if group.size <= 1 else
                          "no Conv/Linear creates these channels")
                why.setdefault(m.module, f"kept whole: {reason}")
    return Trial(changed, why)


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
    """A trial that runs a quantizer on a copy: a module counts when it became its int form."""
    def trial(model: nn.Module, example: torch.Tensor) -> Trial:
        notes: list[str] = []
        copied = copy.deepcopy(model)
        run(copied, example, notes)
        changed, covered = set(), set()
        for name, module in model.named_modules():
            target = quantized(module)
            if target is None:
                continue
            covered.add(name)
            try:
                new = copied.get_submodule(name)
            except AttributeError:
                continue
            if isinstance(new, target):
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
    tracer = SpecTracer()
    out = {}
    for name, module in leaves:
        if name in called or _inside(name, called):  # or inside a called one
            out[name] = (YES, None)
        elif name and tracer.is_leaf_module(module, name):
            out[name] = (NO, "not in the traced graph (never called in forward)")
        else:
            out[name] = ("inlined", "fx traced through it: graph tools see its ops, not the module")
    return out


def _measure_facts(model, leaves, example) -> tuple[dict[str, tuple[str, str | None]], dict]:
    """Run one forward under FlopCounterMode; a module is measurable when it (or a module
    holding it, like a MultiheadAttention its out_proj) ran there. A row's MACs are its own:
    its module's count less its children's, so the column adds up to the model's."""
    from torch.utils.flop_counter import FlopCounterMode

    ran: set[str] = set()

    def hook(name):
        return lambda *_: ran.add(name)

    hooks = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()]
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            model(example)
    except Exception as e:
        reason = f"FLOP counting failed: {_first_line(e)}"
        return {name: (NO, reason) for name, _ in leaves}, {}
    finally:
        for h in hooks:
            h.remove()
    prefix = type(model).__name__
    flops = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}

    def total(name: str) -> int:
        return flops.get(f"{prefix}.{name}" if name else prefix, 0)

    macs = {name: (total(name) - sum(total(f"{name}.{c}" if name else c)
                                     for c, _ in m.named_children())) // 2
            for name, m in leaves}
    facts = {name: (YES, None) if name in ran or _inside(name, ran)
             else (NO, "never called in forward") for name, m in leaves}
    return facts, macs


def _export(module: nn.Module, example: torch.Tensor) -> tuple[str | None, list]:
    """(error or None, TracerWarnings): the warnings flag Python control flow frozen by tracing."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            torch.onnx.export(module, (example,), io.BytesIO(), dynamo=False, opset_version=17)
        except Exception as e:
            return _first_line(e), []
    return None, [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]


def _forward_span(module: nn.Module) -> tuple[str, int, int] | None:
    try:
        lines, first = inspect.getsourcelines(type(module).forward)
        return inspect.getsourcefile(type(module).forward) or "", first, first + len(lines) - 1
    except (OSError, TypeError):
        return None


def _blame_warnings(model: nn.Module, leaves, caught) -> dict[str, str]:
    """Leaf name -> warning, via the innermost module whose forward source holds the warning."""
    spans = {name: _forward_span(m) for name, m in model.named_modules()}
    out: dict[str, str] = {}
    for w in caught:
        owners = [n for n, sp in spans.items()
                  if sp and sp[0] == w.filename and sp[1] <= w.lineno <= sp[2]]
        owner = max(owners, key=len, default="")
        for name, _ in leaves:
            if owner == "" or name == owner or name.startswith(owner + "."):
                where = "" if name == owner else f"`{owner or type(model).__name__}` "
                out.setdefault(name, f"{where}forward line {w.lineno}: "
                                     f"{str(w.message).split('. ')[0]}")
    return out


def _export_facts(model, leaves, example) -> dict[str, tuple[str, str | None]]:
    """Export the whole model; on failure re-export each leaf alone to find the culprit."""
    error, caught = _export(model, example)
    if error is None:
        frozen = _blame_warnings(model, leaves, caught)
        return {name: ("frozen", f"ONNX trace froze Python control flow: {frozen[name]}")
                if name in frozen else (YES, None) for name, _ in leaves}
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
