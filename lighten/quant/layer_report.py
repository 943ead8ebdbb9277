"""Per-layer quantization table: bits, weight-scale statistics and output SQNR against float.

A quantized module states its own facts (:class:`QuantFacts`) through a ``quant_facts()`` method
or a function registered here with :func:`register_quant_facts`; this file never asks "which
class is it?" beyond that one lookup, so a new quantized module type only has to add either.

What is compared, per quantized layer ``N`` of the quantized model, on the same input batches:

* the **reference output** is what the float model (the stage's input) computes at ``N``. When
  the quantizer folded the BatchNorm that follows ``N`` (that BN is gone from the quantized
  model), it is the float *BN's* output; when the layer absorbed the following ReLU / ReLU6,
  that activation is applied to it. So a ``QuantConv2d`` (or ``QuantConv1d`` / ``QuantConv3d``)
  from ``quant.ptq`` is compared with ``relu(bn(conv(x)))`` of the float model, a
  ``WeightOnlyConv2d`` with ``conv(x)``.
* ``sqnr_db``: the quantized layer alone, fed the float model's input at ``N`` (its own error:
  input, weight and output rounding). The table is sorted by it, worst first.
* ``sqnr_in_model_db``: the layer's output inside the quantized model (errors of earlier layers
  included), against the reference output.
* ``logits_sqnr_db``: the whole model's output.

SQNR = 10 log10(sum ref^2 / sum (out - ref)^2) over all batches; ``None`` with a ``note`` when
it cannot be computed (identical outputs, no same-named float layer, shapes differ, ...).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from lighten.errors import DataError
from lighten.task import batch_inputs, batch_rows

TABLE_VERSION = 1
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class QuantFacts:
    """What a quantized module is, in the report's words.

    ``activation_bits`` is an int, ``"float"`` (weight-only) or ``"dynamic"`` (ranges measured
    at run time). ``weight_range_bits`` is the range the codes really use (7 with reduce_range).
    ``absorbed`` is the activation the layer applies itself (its float twin's follower).
    """

    weight_bits: int | None
    activation_bits: int | str
    granularity: str  # "per-channel", "per-tensor", "group", "-" (no weights)
    weight_scale: torch.Tensor | None = None
    group_size: int | None = None
    weight_range_bits: int | None = None
    absorbed: str = "none"


FactsFn = Callable[[nn.Module], QuantFacts]
_FACTS: dict[type, FactsFn] = {}


def register_quant_facts(*types: type) -> Callable[[FactsFn], FactsFn]:
    """Decorator: ``fn(module) -> QuantFacts`` describes modules of ``types`` (and subclasses)."""

    def decorate(fn: FactsFn) -> FactsFn:
        for t in types:
            _FACTS[t] = fn
        return fn

    return decorate


def quant_facts(module: nn.Module) -> QuantFacts | None:
    """The module's own ``quant_facts()``, else a registered function; None for float modules."""
    own = getattr(module, "quant_facts", None)
    if callable(own):
        return own()
    _load_builtin_facts()
    for cls in type(module).__mro__:
        if cls in _FACTS:
            return _FACTS[cls](module)
    return None


def has_quantized_layers(model: nn.Module) -> bool:
    return any(quant_facts(m) is not None for m in model.modules())


# ------------------------------------------------------------------------ built-in module facts


def _bits_of(qmax: int, *, signed: bool = True) -> int:
    """Bits a code range [.., qmax] needs (symmetric signed: 2^(b-1)-1 = qmax)."""
    return int(math.log2(qmax + 1)) + (1 if signed else 0)


_LOADED = False


def _load_builtin_facts() -> None:
    """Register facts for lighten's own quantized modules (imported lazily: they import steps)."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from lighten.quant.dynamic import DynamicQuantLinear
    from lighten.quant.embedding import Int8Embedding
    from lighten.quant.modules import QuantAct, _QuantLayer
    from lighten.quant.weight_only import _WeightOnlyLayer

    @register_quant_facts(_QuantLayer)
    def _static(m) -> QuantFacts:  # QuantConv* / QuantLinear (quant.ptq, quant.qat, quant.mixed)
        return QuantFacts(
            weight_bits=m.weight_bits, activation_bits=m.activation_bits,
            granularity="per-channel" if m.per_channel else "per-tensor",
            weight_scale=m.weight_scale, weight_range_bits=_bits_of(m.weight_spec.qmax),
            absorbed=m.activation)

    @register_quant_facts(DynamicQuantLinear)
    def _dynamic(m) -> QuantFacts:
        return QuantFacts(
            weight_bits=m.bits, activation_bits="dynamic",
            granularity="per-channel" if m.per_channel else "per-tensor",
            weight_scale=m.weight_scale, weight_range_bits=_bits_of(m.qmax))

    @register_quant_facts(Int8Embedding)
    def _embedding(m) -> QuantFacts:  # a lookup: rows gathered, no activation quantization
        return QuantFacts(weight_bits=m.bits, activation_bits="float", granularity="per-row",
                          weight_scale=m.weight_scale, weight_range_bits=m.bits)

    @register_quant_facts(_WeightOnlyLayer)
    def _weight_only(m) -> QuantFacts:
        grouped = m.group_size is not None and m.stored_group_size < m.cols
        return QuantFacts(
            weight_bits=m.bits, activation_bits="float",
            granularity="group" if grouped else "per-channel",
            weight_scale=m.weight_scale, group_size=m.stored_group_size if grouped else None,
            weight_range_bits=m.bits)

    @register_quant_facts(QuantAct)  # a quantized ReLU after a residual add: no weights
    def _act(m) -> QuantFacts:
        return QuantFacts(weight_bits=None, activation_bits=m.activation_bits, granularity="-")


# ------------------------------------------------------------------------------------ the table


@dataclass
class LayerRow:
    name: str
    kind: str
    weight_bits: int | None
    weight_range_bits: int | None
    activation_bits: int | str
    granularity: str
    group_size: int | None
    scale_min: float | None
    scale_median: float | None
    scale_max: float | None
    sqnr_db: float | None
    sqnr_in_model_db: float | None
    compared_with: str
    note: str = ""


@dataclass
class LayerTable:
    rows: list[LayerRow]
    logits_sqnr_db: float | None
    samples: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"version": TABLE_VERSION, "compared_with": "the stage's input model",
                "samples": self.samples, "logits_sqnr_db": self.logits_sqnr_db,
                "rows": [asdict(r) for r in self.rows], "notes": list(self.notes)}


class _Power:
    """Signal and noise power summed over batches (float64)."""

    def __init__(self) -> None:
        self.signal = self.noise = 0.0
        self.problem = ""

    def add(self, out: torch.Tensor, ref: torch.Tensor) -> None:
        if out.shape != ref.shape:
            self.problem = f"output shape {list(out.shape)} vs float {list(ref.shape)}"
            return
        ref64 = ref.double()
        self.signal += float(ref64.pow(2).sum())
        self.noise += float((out.double() - ref64).pow(2).sum())

    def db(self) -> tuple[float | None, str]:
        if self.problem:
            return None, self.problem
        if self.noise == 0.0:
            return None, "identical to float"
        if self.signal == 0.0:
            return None, "float output is all zero"
        return 10.0 * math.log10(self.signal / self.noise), ""


@torch.no_grad()
def layer_table(reference: nn.Module, quantized: nn.Module, batches: Iterable[torch.Tensor],
                ) -> LayerTable:
    """One row per quantized layer of ``quantized``, compared with ``reference`` (its float
    input model) on ``batches`` (input tensors, ``lighten.task.Inputs`` tuples or
    ``(inputs, targets)`` pairs); sorted worst
    SQNR first. Neither model is changed."""
    facts = {n: f for n, m in quantized.named_modules() if (f := quant_facts(m)) is not None}
    ref_modules = dict(reference.named_modules())
    q_modules = dict(quantized.named_modules())
    sources, notes = _reference_points(reference, quantized, facts)
    alone = {n: _Power() for n in facts}
    in_model = {n: _Power() for n in facts}
    logits, samples = _Power(), 0
    modes = {m: m.training for model in (reference, quantized) for m in model.modules()}
    reference.eval()
    quantized.eval()
    try:
        for batch in batches:
            args = batch_inputs(batch)  # model(*args): one tensor, or several inputs
            samples += batch_rows(args)
            inputs = _record(reference, [n for n in sources if n in ref_modules], inputs=True)
            ref_out = _record(reference, sorted(set(sources.values())), inputs=False)
            q_out = _record(quantized, list(facts), inputs=False)
            try:
                y_ref = reference(*args)
                y_q = quantized(*args)
            finally:
                for rec in (inputs, ref_out, q_out):
                    rec.remove()
            logits.add(y_q, y_ref)
            for name, f in facts.items():
                refs = ref_out.seen.get(sources.get(name), [])
                refs = [_apply(r, f.absorbed) for r in refs]
                _compare(in_model[name], q_out.seen.get(name, []), refs)
                outs = [_main_output(q_modules[name](*args))
                        for args in inputs.seen.get(name, [])]
                _compare(alone[name], outs, refs)
    finally:
        for m, training in modes.items():
            m.training = training
    if samples == 0:
        raise DataError("layer_table got no input batches; pass at least one batch of inputs")
    rows = [_row(n, q_modules[n], f, alone[n], in_model[n], sources.get(n))
            for n, f in facts.items()]
    rows.sort(key=lambda r: (r.sqnr_db is None, r.sqnr_db if r.sqnr_db is not None else 0.0))
    return LayerTable(rows, logits.db()[0], samples, notes)


def _reference_points(reference: nn.Module, quantized: nn.Module, facts: dict
                      ) -> tuple[dict[str, str], list[str]]:
    """``{quantized layer name: float module whose output is its reference}`` (the layer itself,
    or its BatchNorm when the quantized model no longer has that BN: it was folded)."""
    ref_modules = dict(reference.named_modules())
    q_modules = dict(quantized.named_modules())
    gone = [n for n, m in ref_modules.items()
            if isinstance(m, _BATCHNORMS) and not isinstance(q_modules.get(n), _BATCHNORMS)]
    folded_into: dict[str, str] = {}
    notes: list[str] = []
    if gone:  # which layer each vanished BN belonged to: fold a throwaway copy and ask
        from lighten.arch.fold import fold_batchnorm_report

        report = fold_batchnorm_report(copy.deepcopy(reference))
        folded_into = {layer: bn for layer, bn in report.folded if bn in gone}
        if report.method != "fx":
            notes.append(f"BN pairs found without fx tracing ({report.trace_error})")
    sources = {n: folded_into.get(n, n) for n in facts if n in ref_modules}
    return sources, notes


class _Recorder:
    """Forward hooks that keep each call's inputs (tuple) or output, per module name."""

    def __init__(self) -> None:
        self.seen: dict[str, list] = {}
        self.handles: list = []

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _record(model: nn.Module, names: list[str], *, inputs: bool) -> _Recorder:
    rec = _Recorder()
    modules = dict(model.named_modules())
    for name in names:
        def hook(module, args, output, name=name):
            value = tuple(a.detach() if torch.is_tensor(a) else a for a in args) if inputs \
                else _main_output(output).detach()
            rec.seen.setdefault(name, []).append(value)
        rec.handles.append(modules[name].register_forward_hook(hook))
    return rec


def _main_output(output):
    """The tensor compared: the output itself, or the first of a tuple (an RNN's sequence)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _apply(x: torch.Tensor, activation: str) -> torch.Tensor:
    from lighten.quant.modules import apply_activation

    return apply_activation(x, activation)


def _compare(power: _Power, outs: list, refs: list) -> None:
    if not outs or not refs:
        power.problem = power.problem or "not reached by the inputs"
        return
    if len(outs) != len(refs):
        power.problem = f"called {len(outs)} times vs {len(refs)} in the float model"
        return
    for out, ref in zip(outs, refs, strict=True):
        power.add(out, ref)


def _row(name: str, module: nn.Module, f: QuantFacts, alone: _Power, in_model: _Power,
         source: str | None) -> LayerRow:
    if source is None:
        sqnr, note, sqnr_model, compared = None, "no layer of that name in the float model", \
            None, "-"
    else:
        sqnr, note = alone.db()
        sqnr_model, note_model = in_model.db()
        note = note or note_model
        compared = f"{name} + {source} (folded)" if source != name else name
        if f.absorbed != "none":
            compared += f" + {f.absorbed}"
    stats = _scale_stats(f.weight_scale)
    return LayerRow(
        name=name, kind=type(module).__name__, weight_bits=f.weight_bits,
        weight_range_bits=f.weight_range_bits, activation_bits=f.activation_bits,
        granularity=f.granularity, group_size=f.group_size, scale_min=stats[0],
        scale_median=stats[1], scale_max=stats[2], sqnr_db=sqnr, sqnr_in_model_db=sqnr_model,
        compared_with=compared, note=note)


def _scale_stats(scale: torch.Tensor | None) -> tuple[float | None, ...]:
    if scale is None or scale.numel() == 0:
        return None, None, None
    s = scale.detach().float().flatten()
    return float(s.min()), float(s.median()), float(s.max())


def write_layer_table(path, reference: nn.Module, quantized: nn.Module,
                      batches: Iterable[torch.Tensor]) -> LayerTable:
    """Compute :func:`layer_table` and write it as JSON, atomically, at ``path``."""
    import json

    from lighten.provenance import atomic_write_text

    table = layer_table(reference, quantized, batches)
    atomic_write_text(path, json.dumps(table.to_dict(), indent=2))
    return table
