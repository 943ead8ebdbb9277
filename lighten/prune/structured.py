"""Structured pruning that physically removes channels (``prune.channels``) and Linear neurons
(``prune.neurons``): the model really gets smaller and faster, not just sparser.

The work is split in three: :mod:`lighten.graph` says which channels are coupled (groups),
:mod:`lighten.prune.importance` scores each group's channels, :mod:`lighten.prune.surgery` slices
the layers. This module only decides how many channels each group loses -- by ``ratio``, or by a
MAC / parameter budget found by bisection on the ratio, measured with ``lighten.measure`` -- and
repeats prune -> fine-tune ``iterative_steps`` times.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn
from torch.nn.modules.conv import _ConvNd

from lighten.errors import ModelError, UnsupportedError
from lighten.graph import Group, channel_groups
from lighten.layers import CONV_KINDS, layer_spec
from lighten.modules import require_modules
from lighten.prune.channel_sensitivity import ChannelSensitivity
from lighten.prune.importance import (
    NEEDS_GRADIENTS,
    accumulate_gradients,
    make_importance,
    task_summed_loss,
)
from lighten.prune.surgery import axis_length, prune_module_
from lighten.registry import register_step
from lighten.step import PruneStepConfig, StepContext
from lighten.target import Target

__all__ = ["ChannelPruneConfig", "NeuronPruneConfig", "PruneReport", "apply_keep_",
           "plan_keep", "prunable_groups", "prune_channels_"]

Scope = Literal["channels", "neurons"]
Finetuner = Callable[[nn.Module, float], None]  # (model, share of the fine-tune budget)
Batches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]  # labelled (x, y)
MAX_RATIO = 0.95  # never search beyond removing 95% of a group


class ChannelPruneConfig(PruneStepConfig):
    ratio: float | None = Field(None, gt=0, lt=1, description="fraction of channels removed")
    target_macs: float | None = Field(None, gt=0, lt=1,
                                      description="fraction of the baseline MACs kept")
    target_params: float | None = Field(None, gt=0, lt=1,
                                        description="fraction of the baseline parameters kept")
    importance: Literal["l1", "l2", "group_l2", "fpgm", "bn_scale", "taylor", "random"] = "l2"
    iterative_steps: int = Field(1, ge=1, description="prune a bit, fine-tune, repeat")
    ignore: list[str] = Field(default_factory=list,
                              description="modules whose output channels are kept")
    global_ranking: bool = Field(False, description="rank channels across layers, not per layer")
    calibration_samples: int = Field(256, ge=1, description="labelled samples for taylor")
    ratios: Literal["auto"] | dict[str, Annotated[float, Field(ge=0, lt=1)]] | None = Field(
        None, description="per-group ratios: 'auto' (from a sensitivity analysis: each group "
        "pruned alone, accuracy measured, meeting target_macs / target_params losing least) or "
        "{module: fraction removed} (groups not named lose `ratio`, default none)")
    auto_samples: int = Field(1000, ge=1, description="training samples ratios: auto evaluates")
    round_to: int | Literal["auto"] | None = Field(
        None, description="keep channel counts at multiples of this: CPU conv kernels work "
        "in blocks of 8 (AVX2) or 16 (AVX-512) channels and pad a partial block, so only "
        "whole blocks removed make the model faster; 'auto' = the deployment target's block "
        "(deploy: cpu)")

    @field_validator("round_to")
    @classmethod
    def _positive_round_to(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError(f"round_to must be a positive integer or 'auto', got {v}")
        return v

    def channel_multiple(self, target: Target | None = None) -> int | None:
        """``round_to`` as a number (``auto``: the target CPU's channel block; no target given,
        the CPU this runs on)."""
        if self.round_to != "auto":
            return self.round_to
        return (target or Target.this_machine()).simd_channel_block

    @model_validator(mode="after")
    def _one_target(self):
        given = [k for k in ("ratio", "target_macs", "target_params") if getattr(self, k)]
        if isinstance(self.ratios, dict):
            if self.target_macs or self.target_params or self.global_ranking:
                raise ValueError("ratios: {module: fraction} fixes every group's ratio; it does "
                                 "not combine with target_macs / target_params / global_ranking "
                                 "(use ratios: auto for a budget)")
            return self
        if len(given) != 1:
            raise ValueError("give exactly one of ratio (fraction removed), target_macs or "
                             f"target_params (fraction kept); got {given or 'none'}")
        if self.ratios == "auto" and (self.ratio or self.global_ranking):
            raise ValueError("ratios: auto spends a target_macs / target_params budget per group; "
                             "it does not combine with ratio or global_ranking")
        return self


class NeuronPruneConfig(ChannelPruneConfig):
    """Same keys as ``prune.channels``; applies to hidden features of Linear layers."""


@dataclass
class PruneReport:
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    channels_before: int
    channels_after: int
    notes: list[str] = field(default_factory=list)
    sensitivity: ChannelSensitivity | None = None  # the last ratios: auto analysis
    scope: Scope = "channels"  # what was counted: conv channels or Linear neurons

    def summary(self, step: str) -> str:
        return (f"{step}: {self.channels_before} -> {self.channels_after} prunable {self.scope}; "
                f"MACs {self.macs_after / max(self.macs_before, 1):.1%} and params "
                f"{self.params_after / max(self.params_before, 1):.1%} of before")


# ----------------------------------------------------------------------------- groups


def _conv_like(module: nn.Module) -> bool:
    """A convolution, or a layer whose LayerSpec says it computes like one (lighten.layers)."""
    spec = layer_spec(module)
    return isinstance(module, _ConvNd) or (spec is not None and spec.graph_kind in CONV_KINDS)


def _in_scope(group: Group, model: nn.Module, scope: Scope) -> bool:
    """channels: made by a conv, or a transformer's embedding width (read by attention's
    in_proj columns); neurons: the other Linear-made features (MLP hidden widths)."""
    kinds = [_conv_like(model.get_submodule(m.module)) for m in group.producers()]
    kinds.append(any(m.kind == "param:in_proj_weight:1" or _reads_attention(model, m)
                     for m in group.members))
    producers = bool(group.producers())
    return producers and any(kinds) if scope == "channels" else producers and not any(kinds)


def _reads_attention(model: nn.Module, member) -> bool:
    """The input columns of an unfused attention's q/k/v projection: the embedding width,
    prune.channels' as for ``nn.MultiheadAttention`` (``in_proj_weight`` columns)."""
    from lighten.unfused import UnfusedMultiheadAttention

    parent, _, name = member.module.rpartition(".")
    return (member.kind == "in" and name in ("q_proj", "k_proj", "v_proj")
            and isinstance(model.get_submodule(parent), UnfusedMultiheadAttention))


def prunable_groups(model: nn.Module, example_input: torch.Tensor, *, scope: Scope = "channels",
                    ignore: Iterable[str] = ()) -> list[Group]:
    """Groups this step may prune: unpinned, in scope, not produced by an ignored module."""
    ignore = list(ignore)
    require_modules(model, ignore, key="ignore")
    groups = []
    for group in channel_groups(model, example_input):
        ignored = [m.module for m in group.producers() if m.module in ignore]
        if ignored:
            group.pinned.append(f"ignored {ignored[0]!r}")
        if group.prunable and _in_scope(group, model, scope):
            groups.append(group)
    return groups


# ----------------------------------------------------------------------------- planning


def plan_keep(groups: list[Group], scores: list[torch.Tensor | None],
              ratio: float | Sequence[float], *, global_ranking: bool = False,
              round_to: int | None = None) -> list[torch.Tensor]:
    """Sorted indices to keep per group, removing ``ratio`` of each (one ratio, or one per
    group); every group keeps at least one channel (and a multiple of ``round_to`` channels when
    given, adding back the best-scored removed ones)."""
    if global_ranking:
        keeps = _plan_global(groups, scores, ratio)
    else:
        ratios = [ratio] * len(groups) if isinstance(ratio, (int, float)) else list(ratio)
        keeps = [keep_lowest_removed(group, s, r)
                 for group, s, r in zip(groups, scores, ratios, strict=True)]
    if round_to and round_to > 1:
        keeps = [_round_up(keep, group.size, s, round_step(group, round_to))
                 for keep, group, s in zip(keeps, groups, scores, strict=True)]
    return keeps


def keep_lowest_removed(group: Group, scores: torch.Tensor | None,
                         ratio: float) -> torch.Tensor:
    """The group's channels minus its ``ratio`` lowest-scored (all of them without scores)."""
    n_remove = 0 if scores is None else min(round(ratio * group.size), group.size - 1)
    order = (torch.sort(scores, stable=True).indices if scores is not None
             else torch.arange(group.size))
    return order[n_remove:].sort().values


def round_step(group: Group, round_to: int) -> int:
    """Group channels per ``round_to`` layer channels. One group channel can be several channels
    of a layer (a grouped conv keeps the same channels in each of its g groups), so widths are
    multiples of ``round_to`` once the group keeps multiples of ``round_to / gcd(round_to, k)``,
    ``k`` = layer channels per group channel."""
    per_layer: dict[str, int] = {}
    for m in group.producers():
        per_layer[m.module] = per_layer.get(m.module, 0) + m.block
    k = max(per_layer.values(), default=1)
    return round_to // math.gcd(round_to, k)


def _round_up(keep: torch.Tensor, size: int, scores: torch.Tensor | None, multiple: int,
              *, at_least: int = 0) -> torch.Tensor:
    """Grow ``keep`` to the next multiple of ``multiple`` that holds ``at_least`` channels (at
    most ``size``), adding the best-scored removed channels."""
    need = max(len(keep), at_least)
    want = min(size, -(-need // multiple) * multiple)
    if want == len(keep) or scores is None:
        return keep
    removed = _removed(keep, size)
    best = removed[torch.sort(scores[removed], descending=True, stable=True).indices]
    return torch.cat([keep, best[: want - len(keep)]]).sort().values


def _plan_global(groups, scores, ratio) -> list[torch.Tensor]:
    """One ranking over all groups; scores are divided by their group mean to be comparable."""
    flat = [(float(v) / (float(s.mean()) + 1e-12), g, c)
            for g, s in enumerate(scores) if s is not None for c, v in enumerate(s)]
    budget = round(ratio * len(flat))
    left = [group.size for group in groups]
    removed: list[set[int]] = [set() for _ in groups]
    for _, g, c in sorted(flat, key=lambda t: t[0]):
        if budget == 0:
            break
        if left[g] > 1:
            removed[g].add(c)
            left[g] -= 1
            budget -= 1
    return [torch.tensor([c for c in range(group.size) if c not in gone], dtype=torch.long)
            for group, gone in zip(groups, removed, strict=True)]


def apply_keep_(model: nn.Module, groups: list[Group], keeps: list[torch.Tensor]) -> None:
    """Slice every member of every group. Masks are built per layer axis first, so offsets
    (concatenations) stay valid however many groups share one layer."""
    masks: dict[tuple[str, str], torch.Tensor] = {}
    for group, keep in zip(groups, keeps, strict=True):
        removed = torch.ones(group.size, dtype=torch.bool)
        removed[keep] = False
        gone = removed.nonzero().flatten()
        if len(gone) == 0:
            continue
        for m in group.members:
            module = model.get_submodule(m.module)
            mask = masks.setdefault((m.module, m.kind),
                                    torch.ones(axis_length(module, m.kind), dtype=torch.bool))
            idx = m.offset + gone[:, None] * m.block + torch.arange(m.block)  # (gone, block)
            mask[idx.flatten()] = False
    _untie_attention_(model, {name for name, _ in masks})
    for (name, kind), mask in masks.items():
        prune_module_(model.get_submodule(name), kind, mask.nonzero().flatten())


def _unfuse_stock_layers(model: nn.Module, ignore, notes: list[str]) -> list[str]:
    """PyTorch's encoder/decoder layers and stacks cannot be traced (fused fast paths):
    replace them by their unfused equivalents (:mod:`lighten.unfused`); attention modules
    outside them stay whole (the channel analysis reads them as one call)."""
    from lighten.unfused import unfuse_

    return unfuse_(model, ignore=ignore, attention=False, notes=notes)


def _untie_attention_(model: nn.Module, names: Iterable[str]) -> None:
    """``nn.MultiheadAttention`` ties its inner width to its embedding width: one whose
    embedding channels (in_proj columns, out_proj rows) are sliced is first replaced by an
    equivalent PrunedMultiheadAttention that keeps its inner width apart."""
    from lighten.modules import set_submodule
    from lighten.prune.heads import untie_attention

    for name in names:
        for path in dict.fromkeys((name, name.rpartition(".")[0])):
            module = model.get_submodule(path)
            if path and isinstance(module, nn.MultiheadAttention):
                set_submodule(model, path, untie_attention(module))


# ----------------------------------------------------------------------------- targets


def _measure(model: nn.Module, what: str, input_shape) -> int:
    from lighten.measure import count_macs, count_params

    return count_macs(model, input_shape) if what == "macs" else count_params(model)[0]


def _measure_keeps(model: nn.Module, groups: list[Group], keeps: list[torch.Tensor], what: str,
                   input_shape) -> int:
    """MACs or parameters of a pruned copy of ``model`` (``model`` itself is untouched)."""
    trial = copy.deepcopy(model)
    apply_keep_(trial, groups, keeps)
    return _measure(trial, what, input_shape)


def _ratio_for(model, groups, scores, *, what: str, goal: float, input_shape,
               global_ranking: bool, round_to: int | None) -> float:
    """Smallest ratio whose pruned copy measures <= goal (bisection; MACs fall with ratio)."""
    def value(ratio: float) -> int:
        keeps = plan_keep(groups, scores, ratio, global_ranking=global_ranking,
                          round_to=round_to)
        return _measure_keeps(model, groups, keeps, what, input_shape)

    lo, hi = 0.0, MAX_RATIO
    if value(hi) > goal:
        return hi
    for _ in range(12):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if value(mid) <= goal else (mid, hi)
    return hi


def _plan_step(model, groups, scores, config: ChannelPruneConfig, *, step: tuple[int, int],
               goal: float | None, what: str, input_shape, round_to: int | None,
               report: PruneReport, eval_batches: Batches | None,
               progress: bool) -> list[torch.Tensor]:
    """Channels each group keeps in iterative ``step`` (i, k): fixed ratios (``ratio``, named
    ``ratios``) take their share of the step; a ``goal`` is met by a uniform ratio (bisected)
    or per-group ratios (``ratios: auto``), widths rounded and then refilled up to it."""
    i, k = step
    if goal is None:
        if isinstance(config.ratios, dict):
            ratio = [_step_ratio(r, i, k)
                     for r in _named_ratios(groups, config.ratios, config.ratio or 0.0)]
        else:
            ratio = _step_ratio(config.ratio, i, k)
        return plan_keep(groups, scores, ratio, global_ranking=config.global_ranking,
                         round_to=round_to)
    if config.ratios == "auto":
        ratio = _auto_ratios(model, groups, scores, eval_batches, what=what, goal=goal,
                             input_shape=input_shape, round_to=round_to, report=report,
                             progress=progress)
    else:
        ratio = _ratio_for(model, groups, scores, what=what, goal=goal, input_shape=input_shape,
                           global_ranking=config.global_ranking, round_to=round_to)
    keeps = plan_keep(groups, scores, ratio, global_ranking=config.global_ranking,
                      round_to=round_to)
    if round_to and round_to > 1:
        keeps = _fill_to_goal(model, groups, scores, keeps, what=what, goal=goal,
                              input_shape=input_shape, step=round_to,
                              sensitivity=report.sensitivity if config.ratios == "auto" else None)
    return keeps


def _step_ratio(ratio: float, i: int, k: int) -> float:
    """The share of what is left that step ``i`` of ``k`` removes, so ``k`` steps remove
    ``ratio`` of the original channels in equal parts."""
    return 1 - (1 - ratio * i / k) / (1 - ratio * (i - 1) / k)


def _named_ratios(groups: list[Group], ratios: dict[str, float], default: float) -> list[float]:
    """Per group, the ratio given for one of the modules producing its channels, else
    ``default``; coupled modules (a residual stage) share channels, so share one ratio."""
    from lighten.prune.channel_sensitivity import group_label

    known = {m.module for g in groups for m in g.producers()}
    unknown = sorted(set(ratios) - known)
    if unknown:
        raise UnsupportedError(f"ratios: {unknown[0]!r} produces no prunable channels here; "
                               f"name one of {', '.join(sorted(known)[:8])}"
                               + (", ..." if len(known) > 8 else ""))
    out = []
    for group in groups:
        named = {m.module: ratios[m.module] for m in group.producers() if m.module in ratios}
        if len(set(named.values())) > 1:
            raise UnsupportedError(f"ratios: {', '.join(sorted(named))} share their channels "
                                   f"(group {group_label(group)}) but were given different "
                                   "ratios; give one of them, or the same ratio")
        out.append(next(iter(named.values())) if named else default)
    return out


def _auto_ratios(model, groups, scores, eval_batches: Batches | None, *, what: str,
                 goal: float, input_shape, round_to: int | None, report: PruneReport,
                 progress: bool) -> list[float]:
    """Per-group ratios from each group's measured sensitivity, meeting ``goal``."""
    from lighten.prune.channel_sensitivity import derive_group_ratios, measure_channel_sensitivity

    if eval_batches is None:
        raise UnsupportedError("ratios: auto needs labelled data to measure each group's "
                               "sensitivity; pass eval_batches= (the recipe step takes them "
                               "from the training set)")
    pairs = list(eval_batches())
    inputs = torch.cat([x for x, _ in pairs]) if pairs else torch.empty(0)
    labels = torch.cat([y for _, y in pairs]) if pairs else torch.empty(0, dtype=torch.long)
    table = measure_channel_sensitivity(
        model, groups, lambda g, r: keep_lowest_removed(groups[g], scores[g], r), apply_keep_,
        inputs, labels, progress=progress)

    def fits(ratios: list[float]) -> bool:
        keeps = plan_keep(groups, scores, ratios, round_to=round_to)
        return _measure_keeps(model, groups, keeps, what, input_shape) <= goal

    ratios = derive_group_ratios(table, fits)
    report.notes.append(f"ratios auto (sensitivity on {table.samples} samples, "
                        f"{table.seconds:.0f} s): " + ", ".join(
                            f"{label}={'kept' if s is None else f'{r:.2f}'}"
                            for label, r, s in zip(table.labels, ratios, scores, strict=True)))
    report.sensitivity = table
    return ratios


def _fill_to_goal(model, groups, scores, keeps, *, what: str, goal: float, input_shape,
                  step: int, sensitivity: ChannelSensitivity | None = None
                  ) -> list[torch.Tensor]:
    """Give channels back, ``step`` at a time, while the pruned model still measures <= goal.

    With ``round_to`` every width moves in jumps of ``step``, so the bisection lands well under
    the target (39% of the MACs for a 50% goal on ResNet-20). Which group gets channels back
    first: with a ``sensitivity`` table (``ratios: auto``), the one whose measured accuracy
    drop shrinks most per MAC (or parameter) the channels cost; otherwise the one whose best
    removed channel scores highest relative to its group's mean. A group that no longer fits
    is never tried again, since the model only grows.
    """
    def value(candidate: list[torch.Tensor]) -> int:
        return _measure_keeps(model, groups, candidate, what, input_shape)

    def grow(g: int) -> list[torch.Tensor]:
        grown = _round_up(keeps[g], groups[g].size, scores[g], round_step(groups[g], step),
                          at_least=len(keeps[g]) + 1)
        return keeps[:g] + [grown] + keeps[g + 1:]

    def regained(g: int, candidate: list[torch.Tensor]) -> float:
        size = groups[g].size
        return (sensitivity.drop_at(g, 1 - len(keeps[g]) / size)
                - sensitivity.drop_at(g, 1 - len(candidate[g]) / size))

    keeps = list(keeps)
    full = {g for g, s in enumerate(scores) if s is None}
    current = value(keeps) if sensitivity is not None else 0
    while True:
        best = None
        for g, (group, s) in enumerate(zip(groups, scores, strict=True)):
            if g in full or len(keeps[g]) >= group.size:
                continue
            removed = _removed(keeps[g], group.size)
            priority = (float(s[removed].max()) / (float(s.mean()) + 1e-12),)
            candidate, measured = None, None
            if sensitivity is not None:
                candidate = grow(g)
                measured = value(candidate)
                if measured > goal:
                    full.add(g)
                    continue
                priority = (regained(g, candidate) / max(measured - current, 1), *priority)
            if best is None or priority > best[0]:
                best = (priority, g, candidate, measured)
        if best is None:
            return keeps
        _, g, candidate, measured = best
        if candidate is None:
            candidate = grow(g)
            measured = value(candidate)
        if measured <= goal:
            keeps, current = candidate, measured
        else:
            full.add(g)


def _removed(keep: torch.Tensor, size: int) -> torch.Tensor:
    gone = torch.ones(size, dtype=torch.bool)
    gone[keep] = False
    return gone.nonzero().flatten()


# ----------------------------------------------------------------------------- the library call


def prune_channels_(model: nn.Module, config: ChannelPruneConfig, example_input: torch.Tensor,
                    *, scope: Scope = "channels",
                    batches: Batches | None = None, eval_batches: Batches | None = None,
                    finetune: Finetuner | None = None, seed: int = 0,
                    progress: bool = False, target: Target | None = None,
                    loss: Callable | None = None) -> PruneReport:
    """Prune ``model`` in place; ``batches()`` yields labelled batches (needed by taylor, scored
    with ``loss(outputs, targets)`` summed over the batch; default cross-entropy),
    ``eval_batches()`` those ``ratios: auto`` measures sensitivity on, and
    ``finetune(model, share)`` trains for that share of the budget after each iterative step;
    ``target`` (default: this machine) decides ``round_to: auto``."""
    input_shape = example_input  # count_macs runs the example itself (token ids stay int64)
    unfused_notes: list[str] = []
    unfused = _unfuse_stock_layers(model, config.ignore, unfused_notes)
    out_shape = _output_shape(model, example_input)
    importance = make_importance(config.importance, seed=seed)
    what = "macs" if config.target_macs else "params"
    start = {"macs": _measure(model, "macs", input_shape),
             "params": _measure(model, "params", input_shape)}
    groups = prunable_groups(model, example_input, scope=scope, ignore=config.ignore)
    if not groups:
        raise UnsupportedError(f"no prunable {scope} found (all groups are pinned by the model "
                               "input/output, ignore:, or grouped convs)")
    report = PruneReport(start["macs"], 0, start["params"], 0,
                         sum(g.size for g in groups), 0, scope=scope)
    report.notes += unfused_notes
    if unfused:
        report.notes.append(f"{', '.join(unfused)}: PyTorch transformer blocks unfused into "
                            "plain modules so their widths can be followed")
    k = config.iterative_steps
    deploy_target = target or Target.this_machine()  # `target` below is the MACs/params goal
    round_to = config.channel_multiple(deploy_target)
    if config.round_to == "auto":
        report.notes.append(f"round_to auto: multiples of {round_to} channels "
                            f"(target cpu {deploy_target.cpu})")
    target = config.target_macs or config.target_params  # None: ratios are fixed
    for i in range(1, k + 1):
        if i > 1:
            groups = prunable_groups(model, example_input, scope=scope, ignore=config.ignore)
        scores = _scores(model, groups, importance, config.importance, batches, report, loss)
        goal = None if target is None else start[what] * (1 - (1 - target) * i / k)
        keeps = _plan_step(model, groups, scores, config, step=(i, k), goal=goal, what=what,
                           input_shape=input_shape, round_to=round_to, report=report,
                           eval_batches=eval_batches, progress=progress)
        removed = any(len(keep) < g.size for keep, g in zip(keeps, groups, strict=True))
        apply_keep_(model, groups, keeps)
        model.zero_grad(set_to_none=True)
        if finetune is not None and removed:  # nothing removed: nothing to recover from
            finetune(model, 1 / k)
    if _output_shape(model, example_input) != out_shape:
        raise ModelError(f"pruning changed the output shape from {out_shape}; this is a lighten "
                         "bug, please report it with the model")
    report.macs_after = _measure(model, "macs", input_shape)
    report.params_after = _measure(model, "params", input_shape)
    report.channels_after = sum(g.size for g in prunable_groups(
        model, example_input, scope=scope, ignore=config.ignore))
    if report.channels_after == report.channels_before:
        why = (f"rounded to multiples of {round_to} channels, the ratio leaves every group "
               "whole; lower round_to (round_to: 1 keeps exact counts) or raise the ratio"
               if round_to and round_to > 1 else "the ratio leaves every group whole; raise it")
        report.notes.append(f"nothing was removed: {why}; no fine-tuning was run")
    if target is not None:
        reached = report.macs_after if what == "macs" else report.params_after
        report.notes.append(f"{what} target {target:.0%}: reached "
                            f"{reached / start[what]:.1%} of the step's input model")
    return report


def _scores(model, groups, importance, name, batches, report,
            loss=None) -> list[torch.Tensor | None]:
    if name in NEEDS_GRADIENTS:
        if batches is None:
            raise UnsupportedError(f"importance {name!r} needs labelled data; pass batches= "
                                   "(the recipe step takes them from the training set)")
        accumulate_gradients(model, batches(), loss=loss)
    scores = [importance(model, g) for g in groups]
    skipped = sum(s is None for s in scores)
    if skipped:
        report.notes.append(f"importance {name!r}: {skipped} group(s) without BatchNorm kept whole")
    return scores


def _output_shape(model: nn.Module, x: torch.Tensor) -> tuple[int, ...]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return tuple(model(x).shape)
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------- recipe steps


def _run_step(name: str, scope: Scope, model, config, ctx: StepContext) -> nn.Module:
    from lighten.verb import layer_widths, record_widths

    widths = layer_widths(model)

    def finetune(m: nn.Module, share: float) -> None:
        epochs = config.finetune.epochs * share
        ctx.finetune(m, config.finetune.model_copy(update={"epochs": epochs}))

    report = prune_channels_(
        model, config, ctx.example_input(), scope=scope, seed=ctx.seed,
        batches=lambda: ctx.labelled_batches(config.calibration_samples),
        eval_batches=lambda: ctx.labelled_batches(config.auto_samples), progress=ctx.progress,
        finetune=finetune if config.finetune is not None else None, target=ctx.target,
        loss=task_summed_loss(ctx.task))
    ctx.note(report.summary(name))
    for line in report.notes:
        ctx.note(f"{name}: {line}")
    record_widths(ctx, widths, model)
    ctx.summary.update(macs_before=report.macs_before, macs_after=report.macs_after,
                       channels_before=report.channels_before,
                       channels_after=report.channels_after)
    return model


def _structured_data(config: ChannelPruneConfig) -> str:
    """What prune.channels / prune.neurons read: example inputs to trace, labelled samples for
    gradient importance and ``ratios: auto``."""
    need = "example inputs to trace the model"
    if config.importance in NEEDS_GRADIENTS or config.ratios == "auto":
        need += " and labelled training samples"
    return need


@register_step("prune.channels", ChannelPruneConfig, needs_data=_structured_data)
def prune_channels(model: nn.Module, config: ChannelPruneConfig, ctx: StepContext) -> nn.Module:
    """Remove whole conv channels (filters) and every tensor coupled to them."""
    return _run_step("prune.channels", "channels", model, config, ctx)


@register_step("prune.neurons", NeuronPruneConfig, needs_data=_structured_data)
def prune_neurons(model: nn.Module, config: NeuronPruneConfig, ctx: StepContext) -> nn.Module:
    """Remove hidden neurons of Linear layers (rows and the matching input columns)."""
    return _run_step("prune.neurons", "neurons", model, config, ctx)
