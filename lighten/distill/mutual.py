"""Deep mutual learning (Zhang et al. 2018): peers that teach each other while they train.

Each peer minimizes its cross-entropy plus the KL divergence from every other peer's predicted
distribution (``mutual`` loss, the others' outputs detached), all in one training loop. Peer 0
is the student as resolved; the others are the same architecture re-initialized with their own
seed, so they disagree at the start and have something to teach. When peer 0 arrives trained
(:func:`gate_peers`), a fresh peer would drag it toward its mistakes; the peers then teach with
the gated loss (``mutual_gated``: a sample only where the teacher knows its label better).
Every peer is measured on the
test split (one row each); the most accurate on the selection split (validation, else training
images: :func:`~lighten.distill.selection.selection_split`, never the test split) is the stage's
output.
"""

from __future__ import annotations

import copy

from torch import nn

from lighten.distill.models import _reinit


def make_peers(student: nn.Module, count: int, *, seed: int) -> list[nn.Module]:
    """``student`` and ``count - 1`` re-initialized copies of it (seeds ``seed + k``)."""
    return [student] + [_reinit(copy.deepcopy(student), seed + 1000 * k).train()
                        for k in range(1, count)]


def gate_peers(peers: list[nn.Module], gate, ctx) -> bool:
    """Whether the peers train with the gated loss (``mutual_gated``): ``gate`` itself when it
    is a bool; ``auto``: when peer 0 (the student as it arrived) beats every fresh peer on the
    selection split by more than a quarter of their score, i.e. it was trained already. A
    fresh peer would then pull it toward its mistakes through the paper's loss; from scratch
    the paper's loss pays more (benchmarks/results/distill_mutual_gated/)."""
    if gate != "auto":
        return bool(gate)
    from lighten.distill.selection import selection_split

    on, where = selection_split(ctx, limit=2000)
    primary = ctx.task.primary
    sign = 1 if ctx.task.higher_is_better else -1
    scores = [_metrics(peer, on, ctx)[primary] for peer in peers]
    fresh = max(scores[1:], key=lambda v: sign * v)
    trained = sign * (scores[0] - fresh) > 0.25 * abs(fresh)
    if trained:
        ctx.note(f"mutual: the student arrives trained ({primary} {scores[0]:.4f} on {where} "
                 f"against the fresh peers' {fresh:.4f}): peers teach with the gated loss, "
                 "each sample only where the teaching peer gives its label more probability "
                 "(gate: false for the paper's loss)")
    return trained


def choose_peer(peers: list[nn.Module], ctx) -> nn.Module:
    """Measure every peer on the test split (reported); return the most accurate on the
    selection split (first on a tie): choosing on the test split would flatter the stage."""
    from lighten.distill.selection import selection_split

    on, where = selection_split(ctx)
    tests = [_metrics(peer, ctx.data.test, ctx) for peer in peers]
    chosen = [_metrics(peer, on, ctx) for peer in peers]
    primary = ctx.task.primary
    sign = 1 if ctx.task.higher_is_better else -1
    best = max(range(len(peers)), key=lambda k: sign * chosen[k][primary])
    for k, (m, c) in enumerate(zip(tests, chosen, strict=True)):
        ctx.layer(f"peer{k}", "train", after="chosen" if k == best else "dropped",
                  reason=f"{where}: {primary} {c[primary]:.4f}; test {m[primary]:.4f}",
                  **{primary: m[primary], "accuracy": m["accuracy"]})
    ctx.summary["peers"] = [{primary: m[primary], "accuracy": m["accuracy"],
                             "selection": c[primary]} for m, c in zip(tests, chosen, strict=True)]
    ctx.note(f"mutual: {len(peers)} peers, test {primary} "
             + ", ".join(f"{m[primary]:.4f}" for m in tests) + f"; peer{best} is the stage "
             f"output (chosen on {where}: " + ", ".join(f"{c[primary]:.4f}" for c in chosen)
             + ")")
    return peers[best]


def _metrics(model: nn.Module, dataset, ctx) -> dict:
    from lighten.training import predict

    return ctx.task.metrics(predict(model, dataset, task=ctx.task), _targets(dataset))


def _targets(dataset):
    import torch
    from torch.utils.data import default_collate

    from lighten.data import make_loader

    return torch.cat([torch.as_tensor(default_collate(list(y)) if isinstance(y, list) else y)
                      for _, y in make_loader(dataset, 1024, shuffle=False)])
