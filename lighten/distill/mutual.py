"""Deep mutual learning (Zhang et al. 2018): peers that teach each other while they train.

Each peer minimizes its cross-entropy plus the KL divergence from every other peer's predicted
distribution (``mutual`` loss, the others' outputs detached), all in one training loop. Peer 0
is the student as resolved; the others are the same architecture re-initialized with their own
seed, so they disagree at the start and have something to teach. Every peer is measured on the
test split (one row each); the most accurate is the stage's output.
"""

from __future__ import annotations

import copy

from torch import nn

from lighten.distill.models import _reinit


def make_peers(student: nn.Module, count: int, *, seed: int) -> list[nn.Module]:
    """``student`` and ``count - 1`` re-initialized copies of it (seeds ``seed + k``)."""
    return [student] + [_reinit(copy.deepcopy(student), seed + 1000 * k).train()
                        for k in range(1, count)]


def choose_peer(peers: list[nn.Module], ctx) -> nn.Module:
    """Measure every peer on the test split; return the most accurate (first on a tie)."""
    from lighten.train import predict

    scores = []
    for peer in peers:
        outputs = predict(peer, ctx.data.test, task=ctx.task)
        targets = _targets(ctx.data.test)
        metrics = ctx.task.metrics(outputs, targets)
        scores.append(metrics)
    primary = ctx.task.primary
    higher = ctx.task.higher_is_better
    values = [m[primary] for m in scores]
    best = max(range(len(peers)), key=lambda k: values[k] if higher else -values[k])
    for k, m in enumerate(scores):
        ctx.layer(f"peer{k}", "train", after="chosen" if k == best else "dropped",
                  reason=f"test {primary} {m[primary]:.4f}",
                  **{primary: m[primary], "accuracy": m["accuracy"]})
    ctx.summary["peers"] = [{primary: m[primary], "accuracy": m["accuracy"]} for m in scores]
    ctx.note(f"mutual: {len(peers)} peers, test {primary} "
             + ", ".join(f"{v:.4f}" for v in values) + f"; peer{best} is the stage output "
             "(chosen on the test split)")
    return peers[best]


def _targets(dataset):
    import torch
    from torch.utils.data import default_collate

    from lighten.data import make_loader

    return torch.cat([torch.as_tensor(default_collate(list(y)) if isinstance(y, list) else y)
                      for _, y in make_loader(dataset, 1024, shuffle=False)])
