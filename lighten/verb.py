"""The one verb: ``compress(model, config, data=..., target=...) -> (model, Report)``.

Every technique is a step config (``PTQConfig(bits=8)``, ``ChannelPruneConfig(ratio=0.5)``);
``compress`` finds its step through the config's type in the one step registry
(:func:`lighten.registry.step_for_config`), builds the :class:`~lighten.step.StepContext` the
step reads its data, fine-tuning, teacher and deployment target from, runs it and returns the
new model with a structured :class:`Report`. The recipe runner calls the same :func:`run_step`,
so a recipe step and a library call are the same thing::

    from lighten import compress
    from lighten.quant import PTQConfig

    small, report = compress(model, PTQConfig(bits=8), data=bundle)
    small, report = compress(model, {"prune.channels": {"ratio": 0.5}}, data=bundle)
    print(report.render())

Unlike torchao's in-place ``quantize_``, ``compress`` works on a copy: the caller's model is
left as it was (steps replace modules, so the returned model is the result either way). Pass
``inplace=True`` to skip the copy when the input is not needed afterwards.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel
from torch import nn

from lighten.errors import DataError, LightenError, ModelError, RecipeError
from lighten.step import StepContext

if TYPE_CHECKING:
    from lighten.data import DataBundle
    from lighten.registry import StepSpec
    from lighten.training import TrainConfig

__all__ = ["Report", "compress", "resolve_config", "run_step"]

@dataclass
class Report:
    """What one step did, for people (:meth:`render`) and programs (the fields, JSON).

    ``layers`` holds one dict per layer the step touched or deliberately left alone, with at
    least ``module`` and ``action`` (``"sparsify"``, ``"resize"``, ``"remove"``,
    ``"quantize"``, ``"keep float"`` ...), usually ``before`` / ``after`` as short text and a
    ``reason`` where a layer was left alone, plus typed facts (``sparsity``, ``weight_bits``,
    ``out_after`` ...). ``summary`` holds step-level numbers: ``params_before`` /
    ``params_after``, ``nonzero_before`` / ``nonzero_after``, ``seconds`` and whatever the step
    added (``macs_before`` ...).
    """

    step: str
    config: dict
    notes: list[str] = field(default_factory=list)
    layers: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> Report:
        return cls(step=str(data.get("step", "")), config=dict(data.get("config") or {}),
                   notes=list(data.get("notes") or []), layers=list(data.get("layers") or []),
                   summary=dict(data.get("summary") or {}))

    def render(self) -> str:
        """Plain text: a headline, the per-layer table, then the notes."""
        from lighten.report import format_table, human_count, layer_table

        s = self.summary
        head = self.step or "step"
        if "seconds" in s:
            head += f" ({s['seconds']:.1f} s)"
        if "params_before" in s and "params_after" in s:
            head += (f": params {human_count(s['params_before'])} -> "
                     f"{human_count(s['params_after'])}")
            if "nonzero_before" in s and "nonzero_after" in s:
                head += (f", non-zero {human_count(s['nonzero_before'])} -> "
                         f"{human_count(s['nonzero_after'])}")
        out = [head]
        if self.layers:
            header, body = layer_table(self.layers)
            out += ["", format_table(header, body, left=[True] * len(header))]
        if self.notes:
            out += ["", *(f"- {n}" for n in self.notes)]
        return "\n".join(out)


# --------------------------------------------------------------------------------- the verb


def compress(
    model: nn.Module,
    config: BaseModel | Mapping[str, Any] | str,
    *,
    data: DataBundle | None = None,
    target: Any = None,
    baseline: nn.Module | None = None,
    progress: bool = False,
    workdir: str | Path | None = None,
    train: TrainConfig | None = None,
    seed: int = 0,
    inplace: bool = False,
    max_memory: str | int | None = None,
) -> tuple[nn.Module, Report]:
    """Apply one step to ``model``; return the compressed model and what was done.

    ``config`` is a step config (``PTQConfig(bits=8)``), a recipe-style mapping
    ``{"quant.ptq": {"bits": 8}}`` or a step name (its defaults); mappings and names are
    validated as recipe steps are. ``data`` (a :class:`~lighten.data.DataBundle`) gives
    calibration and labelled batches and the fine-tuning set; a step that needs data and gets
    none is refused before anything runs. ``target`` is a :class:`lighten.target.Target` or a
    CPU name (``"avx2"``); None is this machine. ``baseline`` is the teacher for
    ``finetune: {distill: ...}`` and the ``distill`` step; by default a frozen copy of ``model``
    as given, made only when the config can use a teacher (a large model is not held twice
    for nothing). ``train`` is
    the training setup ``finetune:`` starts from (default ``TrainConfig()``). The caller's
    ``model`` is not modified unless ``inplace=True``. ``max_memory`` (``"2GB"``) makes its
    training and calibration fit that much resident memory (:mod:`lighten.memory`); a
    ``with lighten.memory.memory_budget(...)`` block around several calls does the same.
    """
    if max_memory is not None:
        from lighten.memory import memory_budget

        with memory_budget(max_memory):
            return compress(model, config, data=data, target=target, baseline=baseline,
                            progress=progress, workdir=workdir, train=train, seed=seed,
                            inplace=inplace)
    spec, cfg = resolve_config(config)
    data = _as_bundle(data)
    if not isinstance(model, nn.Module):
        raise ModelError(f"compress needs an nn.Module, got {type(model).__name__}")
    _check_data(spec, cfg, data)
    teacher = baseline
    if teacher is None and _may_use_baseline(spec, cfg):
        teacher = frozen_copy(model)
    work = model if inplace else copy.deepcopy(model)
    if train is None:
        from lighten.training import TrainConfig

        train = TrainConfig()
    extra = {} if target is None else {"target": _as_target(target)}  # else this machine
    ctx = StepContext(data=data if data is not None else _NoData(spec.name),
                      train_config=train, baseline=teacher,
                      workdir=Path(workdir) if workdir is not None else Path(tempfile.gettempdir()),
                      seed=seed, progress=progress, **extra)
    try:
        return run_step(work, cfg, ctx)
    except LightenError:
        raise
    except Exception:
        # a model that cannot take the data's inputs: say that instead (the caller's model,
        # untouched unless inplace, where the failed step may have half changed it)
        if data is not None and not inplace:
            _check_runs(model, data)
        raise


def _as_bundle(data) -> DataBundle | None:
    """A DataBundle, or the ``(train, test)`` pair of datasets a ``python:`` data hook returns."""
    from lighten.data import DataBundle, bundle_from_datasets

    if data is None or isinstance(data, DataBundle):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return bundle_from_datasets(*data)
    raise DataError(f"data= takes a DataBundle (lighten.data.load_data, bundle_from_datasets) "
                    f"or a (train, test) pair of datasets, got {type(data).__name__}")


def _check_runs(model: nn.Module, data: DataBundle) -> None:
    """Whether ``model`` runs on the data's inputs: a mismatch (the usual cause of a raw error
    deep inside a step) becomes one line naming the shapes."""
    from lighten.models import check_model_runs

    check_model_runs(model, data.task, name="the model",
                     fix="; give data whose inputs the model takes")


def _may_use_baseline(spec: StepSpec, config: BaseModel) -> bool:
    """Whether ``config`` can read the baseline: the distill step, or a ``finetune:`` that
    distills (from the baseline unless it names another teacher)."""
    if spec.name == "distill":
        return True
    finetune = getattr(config, "finetune", None)
    return finetune is not None and finetune.distills


def run_step(model: nn.Module, config: BaseModel, ctx: StepContext) -> tuple[nn.Module, Report]:
    """Run the step ``config`` belongs to on ``model`` (in place, as steps do) with ``ctx``;
    what :func:`compress` and the recipe runner both call."""
    from lighten.measure import count_params
    from lighten.memory import PeakMemory, step_footprint
    from lighten.registry import step_for_config
    from lighten.ties import tied_groups

    spec = step_for_config(config)
    _check_data(spec, config, None if isinstance(ctx.data, _NoData) else ctx.data)
    _check_float(spec, model)
    notes_at, layers_at = len(ctx.notes), len(ctx.layers)
    _bake_parametrizations(model, spec.name, ctx)
    params_before, nonzero_before = count_params(model)
    ties = tied_groups(model)
    start = time.perf_counter()
    # under a memory budget, calibration batches are sized from this (measured before the
    # step attaches any hook or observer to the model)
    ctx.memory_footprint = step_footprint(model, ctx.example_inputs)
    with PeakMemory() as peak:
        result = spec.apply(model, config, ctx)
    if not isinstance(result, nn.Module):
        raise TypeError(f"step {spec.name} returned {type(result).__name__}, not a model")
    if getattr(result, "exit_heads", None) is not None:  # kept heads: do they still fit?
        from lighten.distill.heads import drop_stale_exit_heads

        for note in drop_stale_exit_heads(result, ctx.example_inputs()):
            ctx.note(f"{spec.name}: {note}")
    seconds = time.perf_counter() - start
    _keep_ties(result, ties, spec.name, ctx)
    params_after, nonzero_after = count_params(result)
    summary = {**ctx.summary, "params_before": params_before, "params_after": params_after,
               "nonzero_before": nonzero_before, "nonzero_after": nonzero_after,
               "seconds": round(seconds, 3)}
    if peak.peak_mb is not None:
        summary["peak_memory_mib"] = round(peak.peak_mb, 1)
    report = Report(step=spec.name, config=config.model_dump(mode="json"),
                    notes=list(ctx.notes[notes_at:]), layers=list(ctx.layers[layers_at:]),
                    summary=summary)
    return result.eval(), report


def _bake_parametrizations(model: nn.Module, step: str, ctx: StepContext) -> None:
    """weight_norm / spectral_norm layers hide their weight behind a parametrization, so
    sensitivity, clustering and energy would read the wrong tensor (a user's quant.mixed gave
    such layers 2 bits): each becomes the plain weight it computes with, before the step."""
    from lighten.modules import bake_parametrizations_

    baked = bake_parametrizations_(model)
    if baked:
        more = f" and {len(baked) - 3} more" if len(baked) > 3 else ""
        ctx.note(f"{step}: parametrized {', '.join(baked[:3])}{more} folded into plain "
                 "weights (weight_norm / spectral_norm: the weight each layer computes with)")


def _keep_ties(result: nn.Module, ties: list, step: str, ctx: StepContext) -> None:
    """Layers that shared a weight before the step share its new form after (stored once);
    where they cannot, the note says which and how to keep them tied."""
    from lighten.ties import retie

    retied, broken = retie(result, ties)
    if retied:
        more = f"; and {len(retied) - 2} more groups" if len(retied) > 2 else ""
        groups = f"{len(retied)} group{'s' if len(retied) > 1 else ''}"
        ctx.note(f"{step}: tied weights stay stored once ({groups}): "
                 f"{'; '.join(retied[:2])}{more}")
    for paths in broken:
        ctx.note(f"{step}: {paths} shared one weight and now store it separately (more bytes "
                 "than before); to keep the tie, leave them all as they were (ignore: the "
                 "ones this step changed) or change them all alike")


def _check_float(spec: StepSpec, model: nn.Module) -> None:
    """Every step works on float weights: one on an already quantized model is refused (the
    recipe form of this rule is :func:`lighten.recipe.check_step_order`); a storage-only step
    (``StepSpec.storage_only``) may follow."""
    from lighten.errors import UnsupportedError
    from lighten.quant.layer_report import has_quantized_layers

    if has_quantized_layers(model) and not spec.storage_only:
        raise UnsupportedError(f"{spec.name} cannot run on a quantized model: it works on float "
                               "weights; apply it to the model before quantizing (quantization "
                               "is the last step)")


def resolve_config(config: BaseModel | Mapping[str, Any] | str) -> tuple[StepSpec, BaseModel]:
    """(step, typed config) for a config object, ``{name: options}`` or a step name."""
    from lighten.registry import step_for_config

    if isinstance(config, BaseModel):
        return step_for_config(config), config
    if isinstance(config, str):
        entry: Mapping = {config: None}
    elif isinstance(config, Mapping) and len(config) == 1:
        entry = config
    else:
        raise RecipeError("compress: config must be a step config (e.g. PTQConfig(bits=8)), a "
                          "mapping with one step {'quant.ptq': {'bits': 8}}, or a step name; got "
                          f"{_short(config)}")
    from lighten.recipe import parse_step

    parsed = parse_step(dict(entry), where="compress")
    return step_for_config(parsed.config), parsed.config


def _short(value: Any) -> str:
    if isinstance(value, Mapping):
        return f"a mapping with keys {', '.join(map(str, value)) or 'none'}"
    return type(value).__name__


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy in eval mode whose parameters do not train (the teacher, the reference)."""
    clone = copy.deepcopy(model).eval()
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


def _as_target(target: Any):
    from lighten.target import Target

    return Target(cpu=target) if isinstance(target, str) else target


# ---------------------------------------------------------------------------------- data


def _check_data(spec: StepSpec, config: BaseModel, data: Any) -> None:
    need = spec.data_needed(config)
    if need and data is None:
        raise DataError(f"{spec.name} needs {need}; pass data= (a DataBundle: "
                        "lighten.load_data(...) or lighten.data.bundle_from_datasets(train, "
                        "test))")


class _NoData:
    """Stands in for the DataBundle when ``compress`` got none: a step that reads data its
    ``needs_data`` did not declare gets one clear error instead of an AttributeError."""

    def __init__(self, step: str):
        self._step = step

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise DataError(f"{self._step} needs data with this config (it asked for the data's "
                        f"{name}); pass data= (a DataBundle: lighten.load_data(...) or "
                        "lighten.data.bundle_from_datasets(train, test))")


# --------------------------------------------------------------------- per-layer row helpers


def zero_fractions(weights: Mapping[str, Any]) -> dict[str, float]:
    """Share of zeros of each named tensor (taken before a pruning step, for its rows)."""
    return {name: float((w == 0).sum()) / max(w.numel(), 1) for name, w in weights.items()}


def record_sparsity(ctx: StepContext, weights: Mapping[str, Any], before: Mapping[str, float],
                    action: str = "sparsify") -> None:
    """One row per pruned tensor: share of zeros before and after."""
    for name, w in weights.items():
        after = float((w == 0).sum()) / max(w.numel(), 1)
        was = before.get(name, 0.0)
        ctx.layer(name, action, before=f"{was:.1%} zero", after=f"{after:.1%} zero",
                  params=int(w.numel()), sparsity_before=round(was, 4), sparsity=round(after, 4))


def layer_widths(model: nn.Module) -> dict[str, tuple[str, tuple[int, ...]]]:
    """(type name, weight shape) of every module holding a weight (taken before a structural
    step, for its rows)."""
    import torch

    out = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if name and isinstance(weight, torch.Tensor):
            out[name] = (type(module).__name__, tuple(weight.shape))
    return out


def record_widths(ctx: StepContext, before: Mapping[str, tuple[str, tuple[int, ...]]],
                  model: nn.Module) -> None:
    """One row per layer whose weight changed shape (``resize``) or that is gone
    (``remove``): the output/input widths before and after."""
    now = layer_widths(model)
    for name, (kind, shape) in before.items():
        if name not in now:
            ctx.layer(name, "remove", type=kind, before=_width(kind, shape), after="-",
                      shape_before=list(shape))
        elif now[name][1] != shape:
            after = now[name][1]
            ctx.layer(name, "resize", type=kind, before=_width(kind, shape),
                      after=_width(kind, after),
                      shape_before=list(shape), shape_after=list(after))


def _width(kind: str, shape: tuple[int, ...]) -> str:
    """``out 16, in 8`` for a weight matrix or kernel, ``16`` for a vector (a norm's scale)."""
    if len(shape) >= 2:
        out, into = (shape[1], shape[0]) if kind.startswith("ConvTranspose") else shape[:2]
        return f"out {out}, in {into}"  # a transposed conv's weight is (in, out/groups, k...)
    return str(shape[0]) if shape else "scalar"


def module_types(model: nn.Module) -> dict[str, str]:
    """Class name of every submodule (taken before a quantization step, for its rows)."""
    return {name: type(m).__name__ for name, m in model.named_modules() if name}


# float layer kinds a quantizer may leave alone; each left one gets a "keep float" row
_QUANTIZABLE_KINDS = (nn.Linear, nn.modules.conv._ConvNd, nn.RNNBase, nn.MultiheadAttention)


def record_quant_layers(ctx: StepContext, before: Mapping[str, str], model: nn.Module,
                        notes: list[str], ignore=()) -> None:
    """One row per quantized module (bits, granularity) and per weight layer left in float,
    with the reason from the step's notes (``"<module> left in float: <why>"``), else
    ``ignore:`` or the step having no quantized form of that layer type."""
    from lighten.quant.layer_report import quant_facts

    done: list[str] = []  # rows already written: their children are covered
    no_form: dict[str, list[str]] = {}  # layer type -> layers this step has no form of
    for name, module in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in done):
            continue
        facts = quant_facts(module)
        if facts is None and not isinstance(module, _QUANTIZABLE_KINDS):
            continue
        done.append(name)
        reason = _reason(name, notes)
        if facts is None:
            if reason is None and name not in ignore:
                no_form.setdefault(type(module).__name__, []).append(name)
            reason = reason or ("listed in ignore" if name in ignore else
                                f"this step has no quantized form of {type(module).__name__}")
            ctx.layer(name, "keep float", type=type(module).__name__,
                      before=before.get(name, "-"), after="float", reason=reason)
            continue
        a = facts.activation_bits
        after = ("-" if facts.weight_bits is None else f"w{facts.weight_bits}") + (
            f"a{a}" if isinstance(a, int) else f", {a} activations")
        if facts.group_size:
            after += f", groups of {facts.group_size}"
        ctx.layer(name, "quantize", type=type(module).__name__, before=before.get(name, "-"),
                  after=after, weight_bits=facts.weight_bits, activation_bits=a,
                  granularity=facts.granularity, group_size=facts.group_size, reason=reason)
    for kind, names in no_form.items():  # said where users look, not only in the layer table
        ctx.note(f"{len(names)} {kind} layer(s) stay float ({', '.join(names[:3])}"
                 f"{', ...' if len(names) > 3 else ''}): this step has no quantized form of "
                 f"{kind}")


def _reason(name: str, notes: list[str]) -> str | None:
    """The first note about module ``name`` (``"name ...: why"``), without the name."""
    for note in notes:
        if note.startswith((f"{name} ", f"{name}:")) and ": " in note:
            return note.split(": ", 1)[1]
    return None
