"""``lighten check``: before compressing, say per module what each technique can do with it.

Whole-model facts (fx tracing, MAC counting, ONNX export) are probed once and then attributed to
modules; per-module facts (prunable, quantizable) are DATA in :data:`MODULE_FACTS`, so a new
technique adds one entry instead of another ``isinstance`` ladder.
"""

from __future__ import annotations

import inspect
import io
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lighten.errors import ModelError
from lighten.quant.modules import QUANTIZABLE

YES = "yes"
NO = "no"
NOT_APPLICABLE = "-"


@dataclass(frozen=True)
class ModuleFact:
    """Whether a technique applies to a module; ``otherwise`` is the cell text when it does not."""

    applies: Callable[[nn.Module], bool]
    reason: str
    otherwise: str = NO


def _has_matrix_weight(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, nn.Parameter) and weight.dim() >= 2


QUANTIZABLE_TYPES = QUANTIZABLE  # what quant.ptq / qat / mixed turn into int8 layers

MODULE_FACTS: dict[str, ModuleFact] = {
    "prunable": ModuleFact(
        _has_matrix_weight,
        "no `weight` Parameter of dim >= 2",
    ),
    "prunable (structured)": ModuleFact(
        lambda m: isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)),
        "prune.channels/neurons slice Conv/Linear (BN/LayerNorm follow them)",
    ),
    "quantizable": ModuleFact(
        lambda m: isinstance(m, QUANTIZABLE_TYPES),
        "static int8 covers Conv1d/2d/3d and Linear only",
        otherwise="stays float",
    ),
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
    return [(name, m) for name, m in model.named_modules() if not any(True for _ in m.children())]


# ------------------------------------------------------------------------- whole-model probes


def _untraceable(model: nn.Module) -> dict[str, str]:
    """name -> error for every module fx would trace into and cannot (its own leaves excluded)."""
    from torch import fx

    tracer = fx.Tracer()
    failing = {}
    for name, module in model.named_modules():
        if name and tracer.is_leaf_module(module, name):
            continue  # fx never traces inside these (torch.nn built-ins)
        try:
            fx.symbolic_trace(module)
        except Exception as e:
            failing[name] = _first_line(e)
    return failing


def _trace_facts(model: nn.Module, leaves) -> dict[str, tuple[str, str | None]]:
    """name -> (cell, reason). Failures are blamed on the innermost module that will not trace."""
    from torch import fx

    try:
        graph = fx.symbolic_trace(model).graph
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
    tracer = fx.Tracer()
    out = {}
    for name, module in leaves:
        if name in called:
            out[name] = (YES, None)
        elif name and tracer.is_leaf_module(module, name):
            out[name] = (NO, "not in the traced graph (never called in forward)")
        else:
            out[name] = ("inlined", "fx traced through it: graph tools see its ops, not the module")
    return out


def _measure_facts(model, leaves, example) -> tuple[dict[str, tuple[str, str | None]], dict]:
    """Run one forward under FlopCounterMode; a module is measurable when it ran there."""
    from torch.utils.flop_counter import FlopCounterMode

    ran: set[nn.Module] = set()
    hooks = [m.register_forward_hook(lambda mod, *_: ran.add(mod)) for _, m in leaves]
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
    macs = {name: flops.get(f"{prefix}.{name}" if name else prefix, 0) // 2 for name, _ in leaves}
    facts = {name: (YES, None) if m in ran else (NO, "never called in forward")
             for name, m in leaves}
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

    hooks = [m.register_forward_pre_hook(grab) for _, m in leaves]
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


def check_model(model: nn.Module, input_shape: Sequence[int]) -> list[CheckRow]:
    """One row per leaf module: what tracing, MAC counting, ONNX export and each technique make
    of it. ``input_shape`` excludes the batch dimension, e.g. (1, 28, 28)."""
    try:
        shape = tuple(int(d) for d in input_shape)
    except (TypeError, ValueError):
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise ModelError(f"input shape {input_shape!r} is invalid; "
                         "pass positive sizes without the batch, like 1,28,28")
    example = torch.zeros(1, *shape)
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
    finally:
        model.train(was_training)

    rows = []
    for name, module in leaves:
        params = sum(p.numel() for p in module.parameters(recurse=False))
        cells, why = {}, []
        for fact, (cell, reason) in (("traceable", traced[name]), ("measurable", measured[name]),
                                     ("exportable", exported[name])):
            cells[fact] = cell
            if reason:
                why.append(f"{fact}: {reason}")
        for fact, rule in MODULE_FACTS.items():
            if params == 0:
                cells[fact] = NOT_APPLICABLE  # nothing stored, nothing to compress
            elif rule.applies(module):
                cells[fact] = YES
            else:
                cells[fact] = rule.otherwise
                why.append(f"{fact}: {rule.reason}")
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
