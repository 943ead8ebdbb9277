"""``dynamic.early_exit``: exit heads after chosen blocks; each sample stops at its first
confident exit (BranchyNet, Teerapittayanon et al. 2016; joint training with optional
self-distillation, Phuong & Lampert 2019).

Order of work: cut the backbone into a chain of modules (:func:`~lighten.dynamic.exits.
module_chain`), put a small head after each candidate position, train the heads with the
backbone frozen, keep the exits that pay off on held-out data (``exits: auto``), train backbone
and heads jointly (``finetune:``), then calibrate one confidence threshold per exit on the
held-out split of the *training* data (never the test set) to ``max_drop`` or ``target_macs``.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn
from torch.utils.data import DataLoader, Subset

from lighten.dynamic.calibrate import NEVER, Calibration, calibrate
from lighten.dynamic.exits import (
    MultiExitModel,
    build_head,
    confidence,
    exit_loss_term,
    module_chain,
)
from lighten.errors import UnsupportedError
from lighten.registry import register_step
from lighten.step import FinetuneConfig, StepConfig, StepContext

AUTO_FRACTIONS = (0.2, 0.35, 0.5, 0.65)  # candidate exits near these shares of the MACs
_ELEMENTWISE = (nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU,
                nn.Hardswish, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.Dropout, nn.Identity)


# Exits that save less than this share of the MACs are not kept: each exit adds a head and a
# check to the deployed If-graph, whose per-node cost on a CPU runtime a small MAC saving does
# not repay. A judgement, not a measured break-even (min_saving: 0 keeps any exit).
MIN_SAVING = 0.10


class EarlyExitConfig(StepConfig):
    """``dynamic.early_exit``: one of ``max_drop`` (default 0.5) or ``target_macs``."""

    max_drop: float | None = Field(None, ge=0, description="accuracy points the exits may lose "
                                   "on held-out data against running every sample to the end")
    target_macs: float | None = Field(None, gt=0, le=1, description="mean executed MACs per "
                                      "sample as a fraction of the model's; most accurate within")
    exits: Literal["auto"] | list[str] = Field("auto", description="module names to put exits "
                                               "after, or auto (chosen by held-out cost/accuracy)")
    margin: float = Field(1.5, ge=0, description="max_drop must hold for the held-out drop plus "
                          "this many standard errors of it (what the test set then loses "
                          "stays within max_drop more often)")
    criterion: Literal["max_softmax", "entropy"] = "max_softmax"
    head: Literal["auto", "conv2", "conv", "pool"] = Field(
        "auto", description="exit head: conv (conv3x3+BN+ReLU, global pool, linear), conv2 (a "
        "second, wider strided conv before the pool), pool (global pool + linear), auto (the "
        "first of conv2, conv, pool that costs <= 7% of the model's MACs)")
    head_epochs: float = Field(1.0, ge=0, description="heads-only epochs (backbone frozen) "
                               "before the joint finetune:")
    freeze_backbone: bool = Field(False, description="finetune: trains the heads only")
    exit_weight: float = Field(1.0, ge=0, description="weight of each exit's loss")
    exit_distill: float = Field(0.0, ge=0, description="weight of each exit's soft-target loss "
                                "against the final exit (self-distillation)")
    temperature: float = Field(3.0, gt=0)
    min_saving: float = Field(MIN_SAVING, ge=0, lt=1, description="with max_drop: exits that "
                              "save less than this share of the MACs on held-out data are not "
                              "kept (their checks cost more at run time); 0 keeps any")
    holdout: float = Field(0.1, gt=0, lt=0.5, description="share of the training data held out "
                           "to choose exits and calibrate thresholds")
    ignore: list[str] = Field(default_factory=list, description="modules no exit may follow "
                              "(exits: auto)")

    @model_validator(mode="before")
    @classmethod
    def _one_target(cls, data):
        if isinstance(data, dict):
            given = [k for k in ("max_drop", "target_macs") if data.get(k) is not None]
            if len(given) == 2:
                raise ValueError("give max_drop or target_macs, not both")
            if not given:
                data = {**data, "max_drop": 0.5}
        return data


@register_step("dynamic.early_exit", EarlyExitConfig,
               needs_data=lambda c: "labelled training data (exit heads, held-out thresholds)")
def early_exit(model: nn.Module, cfg: EarlyExitConfig, ctx: StepContext) -> nn.Module:
    """Exit heads after chosen blocks; each sample stops at its first confident exit."""
    if isinstance(model, MultiExitModel):
        raise UnsupportedError("dynamic.early_exit: the model has exits already; apply the "
                               "step once")
    task = ctx.task
    if task.kind != "classification":
        raise UnsupportedError(f"dynamic.early_exit needs a classification task, not "
                               f"{task.kind}")
    _drop_kept_heads(model, ctx)
    chain = module_chain(model)
    shapes, macs = chain_profile(model, chain, ctx.example_input(1))
    total = macs[-1]
    positions = _positions(model, chain, shapes, macs, cfg.exits, cfg.ignore)
    heads = [_head(shapes[i], task.num_classes, cfg.head, total) for i in positions]
    spec = getattr(ctx, "model_spec", None) or zoo_spec(model, ctx)
    multi = MultiExitModel(model, chain, positions, heads, criterion=cfg.criterion,
                           backbone_spec=spec, input_shape=list(ctx.input_shape),
                           num_classes=task.num_classes, task=task.describe())
    fit_ctx, held = _split(ctx, cfg.holdout)
    head_cost = head_macs(multi, ctx.example_input(1))

    multi.freeze_backbone(True)
    fit_ctx.finetune(multi, FinetuneConfig(epochs=cfg.head_epochs, lr_scale=1.0),
                     loss_terms=[exit_loss_term(cfg.exit_weight)])
    multi.freeze_backbone(False)
    stats = held_out_stats(multi, held)
    target = {"max_drop": cfg.max_drop, "target_macs": cfg.target_macs, "reference_cost": total,
              "margin": cfg.margin}
    if cfg.exits == "auto" and len(positions) > 1:
        keep = select_exits(stats, [macs[i] for i in positions], head_cost, total, target)
        dropped = [chain[positions[i]] for i in range(len(positions)) if i not in keep]
        if dropped:
            ctx.note(f"dynamic.early_exit: candidate exits after {', '.join(dropped)} dropped: "
                     "they did not lower the held-out cost")
        _keep_exits(multi, keep)
        positions, head_cost = [positions[i] for i in keep], [head_cost[i] for i in keep]
        stats = held_out_stats(multi, held)  # the kept exits' scores, for the calibration
    if cfg.finetune is not None and cfg.finetune.epochs:
        multi.freeze_backbone(cfg.freeze_backbone)
        fit_ctx.finetune(multi, cfg.finetune, loss_terms=[exit_loss_term(
            cfg.exit_weight, distill=cfg.exit_distill, temperature=cfg.temperature)])
        multi.freeze_backbone(False)
        stats = held_out_stats(multi, held)
    costs = exit_costs([macs[i] for i in positions], head_cost, total)
    cal = calibrate(*stats, costs, **target)
    while any(t >= NEVER for t in cal.thresholds):  # a head that never answers only costs
        keep = [i for i, t in enumerate(cal.thresholds) if t < NEVER]
        idle = [chain[positions[i]] for i in range(len(positions)) if i not in keep]
        if not keep:
            ctx.note(f"dynamic.early_exit: no exit answers any held-out sample at the "
                     f"calibrated thresholds (exits after {', '.join(idle)}): the model is "
                     "returned without exits (a head that never answers only adds work)")
            return multi.backbone.eval()
        ctx.note(f"dynamic.early_exit: exits after {', '.join(idle)} dropped: calibrated "
                 "never to fire")
        _keep_exits(multi, keep)
        positions, head_cost = [positions[i] for i in keep], [head_cost[i] for i in keep]
        stats = held_out_stats(multi, held)
        costs = exit_costs([macs[i] for i in positions], head_cost, total)
        cal = calibrate(*stats, costs, **target)
    if cfg.target_macs is None and cal.mean_cost > (1 - cfg.min_saving) * total:
        ctx.note(f"dynamic.early_exit: the calibrated exits would save only "
                 f"{1 - cal.mean_cost / total:.1%} of the MACs on the held-out split, less than "
                 f"min_saving {cfg.min_saving:.0%} (exit checks cost time at run time): the "
                 "model is returned without exits (a larger max_drop, target_macs, or "
                 "min_saving: 0 keeps them)")
        return multi.backbone.eval()
    multi.thresholds.copy_(torch.tensor(cal.thresholds, dtype=torch.float32))
    multi.exit_macs = [int(c) for c in costs]
    multi.eval()
    _record(ctx, multi, cal, costs, total, cfg, len(held))
    return multi


def _drop_kept_heads(model: nn.Module, ctx: StepContext) -> None:
    """Heads kept by ``distill {method: self, keep_heads: true}`` (``model.exit_heads``) are
    never called by the forward; this step trains and calibrates heads of its own, so the kept
    ones would only be stored (and left in float by quantization)."""
    from lighten.distill.heads import ExitHeads

    heads = getattr(model, "exit_heads", None)
    if isinstance(heads, ExitHeads):
        del model.exit_heads
        ctx.note(f"dynamic.early_exit: the exit heads kept by distill (after "
                 f"{', '.join(heads.layers)}) are dropped: this step trains its own")


# --------------------------------------------------------------------------- analysis


def chain_profile(model: nn.Module, chain: list[str], x: torch.Tensor
                  ) -> tuple[list[tuple[int, ...]], list[int]]:
    """Per chain position: the output shape (no batch) and the cumulative MACs. Checks that the
    chain computes what the model's forward does."""
    from lighten.measure.macs import count_macs

    shapes, macs, total = [], [], 0
    was = model.training
    model.eval()
    probe = torch.randn_like(x) if x.is_floating_point() else x
    h = probe
    with torch.no_grad():
        for path in chain:
            module = model.get_submodule(path)
            total += count_macs(module, h)
            h = module(h)
            shapes.append(tuple(h.shape[1:]))
            macs.append(total)
        same = torch.allclose(h, model(probe), atol=1e-5)
    model.train(was)
    if not same:
        raise UnsupportedError(f"dynamic.early_exit: calling {type(model).__name__}'s modules "
                               "one after the other does not reproduce its forward; exits need "
                               "a forward that is a chain of its modules")
    return shapes, macs


def _positions(model, chain, shapes, macs, exits, ignore=()) -> list[int]:
    """Chain positions of the exits: named ones, or for ``auto`` the ends of blocks nearest to
    :data:`AUTO_FRACTIONS` of the MACs (never after a module in ``ignore``)."""
    from lighten.modules import require_modules

    require_modules(model, ignore, key="dynamic.early_exit ignore")
    usable = [i for i in range(len(chain) - 1) if len(shapes[i]) in (1, 3)
              and not any(chain[i] == n or chain[i].startswith(n + ".") for n in ignore)]
    if exits != "auto":
        where = {chain[i]: i for i in usable}
        unknown = [name for name in exits if name not in where]
        if unknown:
            raise UnsupportedError(f"dynamic.early_exit exits: {unknown[0]!r} is not a module an "
                                   f"exit can follow; choose among {list(where)[:12]}")
        return sorted({where[name] for name in exits})
    ends = [i for i in usable
            if not isinstance(model.get_submodule(chain[i + 1]), _ELEMENTWISE)] or usable
    total = macs[-1]
    picked = {min(ends, key=lambda i: abs(macs[i] / total - f)) for f in AUTO_FRACTIONS}
    return sorted(i for i in picked if macs[i] < 0.9 * total)


def _head(shape, num_classes: int, kind: str, total: int) -> nn.Module:
    """``auto``: the most capable head that is cheap (<= 7% of the model's MACs)."""
    if kind != "auto":
        return build_head(shape, num_classes, kind)
    from lighten.measure.macs import count_macs

    for choice in ("conv2", "conv"):
        head = build_head(shape, num_classes, choice)
        if len(shape) != 3 or count_macs(head, torch.zeros(1, *shape)) <= 0.07 * total:
            return head
    return build_head(shape, num_classes, "pool")


def head_macs(multi: MultiExitModel, x: torch.Tensor) -> list[int]:
    """MACs of each exit head on the features it reads (batch 1)."""
    from lighten.measure.macs import count_macs

    was = multi.training
    multi.eval()
    out = []
    with torch.no_grad():
        for k, segment in enumerate(multi.segments()[:-1]):
            for module in segment:
                x = module(x)
            out.append(count_macs(multi.heads[k], x))
    multi.train(was)
    return out


def exit_costs(backbone_macs: list[int], head_macs: list[int], total: int) -> list[int]:
    """Cumulative MACs of a sample answered at exit k (its heads and those before), the final
    last (the whole backbone and every head)."""
    costs, heads = [], 0
    for b, h in zip(backbone_macs, head_macs, strict=True):
        heads += h
        costs.append(b + heads)
    return [*costs, total + heads]


def held_out_stats(multi: MultiExitModel, held) -> tuple[np.ndarray, np.ndarray]:
    """Confidence of every early exit (N, K) and correctness of every exit (N, K+1)."""
    scores, correct = [], []
    multi.eval()
    with torch.no_grad():
        for x, y in DataLoader(held, batch_size=256):
            outs = multi.all_exits(x)
            scores.append(torch.stack([confidence(o, multi.criterion) for o in outs[:-1]], 1)
                          if len(outs) > 1 else torch.zeros(len(y), 0))
            correct.append(torch.stack([o.argmax(-1) == y for o in outs], 1))
    return torch.cat(scores).numpy(), torch.cat(correct).numpy()


def select_exits(stats, backbone_macs, head_macs, total, target) -> list[int]:
    """Drop exits one at a time while that makes the calibrated result better (cheaper within
    ``max_drop``, or more accurate within ``target_macs``): an exit that answers few samples
    costs its head on every sample that passes it."""
    scores, correct = stats

    def key(keep):
        cols = list(keep)
        costs = exit_costs([backbone_macs[i] for i in cols], [head_macs[i] for i in cols], total)
        cal = calibrate(scores[:, cols], correct[:, [*cols, correct.shape[1] - 1]], costs,
                        **target)
        goal = -cal.accuracy if target.get("target_macs") is not None else cal.mean_cost
        return (not cal.met, goal)

    keep = list(range(len(backbone_macs)))
    best = key(keep)
    while len(keep) > 1:
        trials = [(key([j for j in keep if j != i]), i) for i in keep]
        trial, drop = min(trials)
        if trial > best:
            break
        best, keep = trial, [j for j in keep if j != drop]
    return keep


def _keep_exits(multi: MultiExitModel, keep: list[int]) -> None:
    multi.heads = nn.ModuleList([multi.heads[i] for i in keep])
    multi.exits = [multi.exits[i] for i in keep]
    multi.thresholds = multi.thresholds[keep].clone()


def _split(ctx: StepContext, share: float):
    """(context training on the rest, held-out Subset): a seeded split of the training data."""
    train = ctx.data.train
    fit, held = holdout_split(len(train), share, ctx.seed)
    data = copy.copy(ctx.data)
    data.train = Subset(train, fit)
    return dataclasses.replace(ctx, data=data), Subset(train, held)


def holdout_split(n: int, share: float, seed: int) -> tuple[list[int], list[int]]:
    """(training indices, held-out indices) of a seeded split of ``n`` training samples."""
    held_n = max(1, int(round(n * share)))
    if n - held_n < 1:
        raise UnsupportedError(f"dynamic.early_exit: {n} training samples are too few to hold "
                               f"out {share:.0%} for calibration")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    return order[held_n:], order[:held_n]


def zoo_spec(model: nn.Module, ctx: StepContext) -> dict | None:
    """``{"zoo": name}`` when ``model`` is that zoo model built with the data's shapes (what a
    load rebuilds the backbone from); None otherwise."""
    from lighten.models import ZOO

    keys = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name, factory in ZOO.items():
        try:
            with torch.random.fork_rng(devices=[]):
                fresh = factory(num_classes=ctx.task.num_classes, input_shape=ctx.input_shape)
        except Exception:  # a zoo model that does not fit these shapes
            continue
        if type(fresh) is type(model) and set(fresh.state_dict()) == set(keys):
            return {"zoo": name}
    return None


def _record(ctx, multi: MultiExitModel, cal: Calibration, costs, total, cfg, held_n) -> None:
    names = multi.exit_names
    for k, name in enumerate(names):
        facts = {"macs": int(costs[k]), "macs_ratio": costs[k] / total,
                 "share": cal.shares[k], "accuracy": cal.exit_accuracy[k]}
        if k < len(cal.thresholds):
            ctx.layer(f"heads.{k}", "add exit", before="-",
                      after=f"exit after {name}, threshold {cal.thresholds[k]:.3f}",
                      exit_after=name, threshold=cal.thresholds[k], **facts)
        else:
            ctx.layer(f"backbone.{multi.chain[-1]}", "keep", before="output",
                      after="final exit", **facts)
    ctx.summary.update(dynamic={
        "exits": names, "thresholds": cal.thresholds, "criterion": multi.criterion,
        "held_out_samples": held_n, "held_out_accuracy": cal.accuracy,
        "held_out_final_accuracy": cal.final_accuracy,
        "held_out_macs_ratio": cal.mean_cost / total, "held_out_shares": cal.shares,
        "target_met": cal.met})
    goal = (f"max_drop {cfg.max_drop} points" if cfg.target_macs is None
            else f"target_macs {cfg.target_macs}")
    ctx.note(f"dynamic.early_exit: exits after {', '.join(names[:-1]) or 'none'}; on "
             f"{held_n} held-out training samples: {cal.accuracy:.2%} accuracy (final exit "
             f"alone {cal.final_accuracy:.2%}) at {cal.mean_cost / total:.2f}x the MACs "
             f"({goal}{'' if cal.met else ': NOT met'})")
