"""Importance criteria: plain callables ``(model, group) -> scores`` (one score per channel).

A low score means "remove first". Magnitude criteria look at the weights that *create* the
channels (filters of convs, rows of Linear layers, depthwise kernels; each along the axis
:attr:`~lighten.graph.Member.axis` names, axis 1 for a transposed conv), ``group_l2`` at every
weight of the group (consumers and norms too); ``bn_scale`` at the
BatchNorm gamma (network slimming); ``taylor`` at weight x gradient over the whole group, so its
gradients must be accumulated first (:func:`accumulate_gradients`: statistics, then apply).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lighten.errors import LightenError, UnsupportedError
from lighten.graph import Group, Member

Importance = Callable[[nn.Module, Group], torch.Tensor | None]

__all__ = ["IMPORTANCE", "Importance", "accumulate_gradients", "channel_rows", "make_importance"]


def channel_rows(t: torch.Tensor, member: Member, size: int) -> torch.Tensor:
    """The part of ``t`` (a member's weight or its gradient) that belongs to each channel.

    Returns (size, k): row c holds every element removed together with channel c (``block``
    rows or columns per channel, e.g. a depthwise conv after a channel shuffle).
    """
    return member.rows(t, size)


def _producer_rows(model: nn.Module, group: Group) -> torch.Tensor:
    rows = [channel_rows(model.get_submodule(m.module).weight.detach(), m, group.size)
            for m in group.producers()]
    if not rows:
        raise UnsupportedError(f"group {group} has no layer that creates its channels")
    return torch.cat(rows, dim=1)  # (size, k)


def l1(model: nn.Module, group: Group) -> torch.Tensor:
    return _producer_rows(model, group).abs().sum(1)


def l2(model: nn.Module, group: Group) -> torch.Tensor:
    return _producer_rows(model, group).norm(dim=1)


def group_l2(model: nn.Module, group: Group) -> torch.Tensor:
    """Fang et al. 2023 (DepGraph): every weight removed with a channel votes -- the filters that
    make it, the input columns of the layers that read it, its norm scales -- each member's
    squared L2 per channel divided by its mean, then averaged: a channel with weak filters that
    the next layer reads strongly is kept."""
    votes = []
    for m in group.members:
        if m.kind.startswith("param:"):
            continue  # a layer scale / embedding: scored by the layers around it
        weight = getattr(model.get_submodule(m.module), "weight", None)
        if weight is None:
            continue
        energy = channel_rows(weight.detach().float(), m, group.size).pow(2).sum(1)
        votes.append(energy / (energy.mean() + 1e-12))
    if not votes:
        raise UnsupportedError(f"group {group} has no weights to score")
    return torch.stack(votes).mean(0)


def fpgm(model: nn.Module, group: Group) -> torch.Tensor:
    """He et al. 2019: filters near the geometric median are replaceable by the others."""
    rows = _producer_rows(model, group)
    return torch.cdist(rows[None], rows[None])[0].sum(1)


def bn_scale(model: nn.Module, group: Group) -> torch.Tensor | None:
    """Liu et al. 2017 (network slimming): |gamma| of the BatchNorms; None if there are none."""
    scores = None
    for m in group.members:
        bn = model.get_submodule(m.module)
        if m.kind != "norm" or not isinstance(bn, _BatchNorm) or bn.weight is None:
            continue
        gamma = m.rows(bn.weight.detach().abs(), group.size).sum(1)
        scores = gamma if scores is None else scores + gamma
    return scores


def taylor(model: nn.Module, group: Group) -> torch.Tensor:
    """Molchanov et al. 2019: (sum over the group's weights of w * dL/dw)^2 per channel."""
    total = torch.zeros(group.size)
    for m in group.members:
        if m.kind.startswith("param:"):
            continue  # a layer scale / embedding: the layers that make the channel score it
        module = model.get_submodule(m.module)
        for name in ("weight",) if m.kind == "in" else ("weight", "bias"):
            p = getattr(module, name, None)
            if p is None:
                continue
            if p.grad is None:
                raise LightenError("importance 'taylor' needs gradients; call "
                                   "accumulate_gradients(model, batches) first")
            t, along = (p.detach() * p.grad).float(), m
            if name == "bias" and m.transposed:  # 1-D: each group's copy of the axis-1 outputs
                t, along = t.reshape(module.groups, -1).sum(0), dataclasses.replace(
                    m, transposed=False)
            total += channel_rows(t, along, group.size).sum(1)
    return total.pow(2)


def make_random(seed: int = 0) -> Importance:
    """A control: random scores (reproducible for a given seed)."""
    g = torch.Generator().manual_seed(seed)
    return lambda model, group: torch.rand(group.size, generator=g)


IMPORTANCE: dict[str, Importance] = {"l1": l1, "l2": l2, "group_l2": group_l2, "fpgm": fpgm,
                                     "bn_scale": bn_scale, "taylor": taylor}
NEEDS_GRADIENTS = frozenset({"taylor"})


def make_importance(name: str, *, seed: int = 0) -> Importance:
    if name == "random":
        return make_random(seed)
    if name not in IMPORTANCE:
        raise UnsupportedError(f"unknown importance {name!r}; choose one of "
                               f"{', '.join([*IMPORTANCE, 'random'])}")
    return IMPORTANCE[name]


def summed_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over samples, as ``F.cross_entropy`` reads it (classes on axis 1:
    ``(N, C)`` logits, ``(N, C, H, W)`` segmentation), or, when the targets match every axis but
    the last, a language model's ``(N, T, V)`` next-token logits (each sample's tokens averaged)."""
    standard = (outputs.shape[0], *outputs.shape[2:])  # what F.cross_entropy expects
    if outputs.ndim <= 2 or tuple(targets.shape) == standard \
            or tuple(targets.shape) != tuple(outputs.shape[:-1]):
        return F.cross_entropy(outputs, targets, reduction="sum")
    per_token = F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1),
                                reduction="none")
    return per_token.reshape(len(outputs), -1).mean(1).sum()


def task_summed_loss(task) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``task.loss`` (a batch mean) as a sum over the batch, for gradient-based importance."""
    if task is None:
        return summed_loss
    return lambda outputs, targets: task.loss(outputs, targets) * len(outputs)


def run_model(model: nn.Module, x) -> torch.Tensor:
    """``model(x)``, or ``model(*x)`` when a multi-input batch is a tuple/list of tensors."""
    return model(*x) if isinstance(x, (tuple, list)) else model(x)


def batch_size(x) -> int:
    return len(x[0]) if isinstance(x, (tuple, list)) else len(x)


def accumulate_gradients(model: nn.Module,
                         batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
                         loss: Callable | None = None) -> int:
    """Sum loss gradients over labelled batches into ``.grad``; returns samples seen.

    ``loss(outputs, targets)`` sums over the batch; default: :func:`summed_loss` (cross-entropy
    over the last axis; ``task_summed_loss(ctx.task)`` gives the task's own)."""
    loss = loss or summed_loss
    was_training = model.training
    model.eval()  # BN statistics must not move while we only measure
    model.zero_grad(set_to_none=True)
    seen = 0
    try:
        for x, y in batches:
            loss(run_model(model, x), y).backward()
            seen += batch_size(x)
    finally:
        model.train(was_training)
    if seen == 0:
        raise LightenError("importance 'taylor' got no calibration batches; give it data")
    return seen
