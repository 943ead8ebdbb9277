"""Channel sensitivity: how much accuracy each channel group loses when pruned alone, and the
non-uniform per-group ratios (``prune.channels`` with ``ratios: auto``) that meet a MAC or
parameter budget while losing the least.

A uniform ratio spends the budget equally on every group, yet groups differ wildly: ResNet-20's
first stage collapses at half its channels while a late block's inner conv keeps its accuracy
at 70% removed. Each group is pruned by itself at a sweep of ratios -- physically, on a copy, so
BatchNorm shifts and every coupled tensor are part of what is measured -- and the copy evaluated.
:func:`derive_group_ratios` then cuts every group's drop curve at one common threshold and
bisects that threshold until the pruned model meets the budget (the channel-level analogue of
:func:`lighten.prune.sensitivity.derive_ratios`).
"""

from __future__ import annotations

import copy
import csv
import io
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from lighten.errors import UnsupportedError
from lighten.graph import Group
from lighten.prune.sensitivity import plot_curves, ratio_at_drop

__all__ = ["ChannelSensitivity", "analyze_channels", "derive_group_ratios", "group_label",
           "measure_channel_sensitivity"]

SWEEP = (0.3, 0.5, 0.7, 0.9)


def group_label(group: Group) -> str:
    """A readable name for a group: its first producer, plus how many more share it."""
    producers = sorted({m.module for m in group.producers()})
    if not producers:
        return f"group of {group.size}"
    more = f" (+{len(producers) - 1})" if len(producers) > 1 else ""
    return producers[0] + more


@dataclass
class ChannelSensitivity:
    """Accuracy with one group pruned at one ratio; ``accuracy[g][i]`` is at ``ratios[i]``."""

    baseline: float
    labels: list[str]
    sizes: list[int]
    ratios: tuple[float, ...]
    accuracy: list[list[float]]
    samples: int
    seconds: float

    def drop_curve(self, g: int) -> list[tuple[float, float]]:
        """(ratio, drop) from (0, 0), the drop made non-decreasing (noise never rewards more
        pruning)."""
        points, worst = [(0.0, 0.0)], 0.0
        for ratio, acc in zip(self.ratios, self.accuracy[g], strict=True):
            worst = max(worst, self.baseline - acc)
            points.append((ratio, worst))
        return points

    def drop_at(self, g: int, ratio: float) -> float:
        """Group ``g``'s drop at ``ratio``, linear between measured ratios (flat past the last)."""
        curve = self.drop_curve(g)
        for (r0, d0), (r1, d1) in zip(curve, curve[1:], strict=False):
            if ratio <= r1:
                return d0 + (d1 - d0) * max(0.0, ratio - r0) / (r1 - r0)
        return curve[-1][1]

    def ratios_at(self, tau: float) -> list[float]:
        """Per group, the largest ratio whose (interpolated) drop stays <= ``tau``."""
        return [ratio_at_drop(self.drop_curve(g), tau) for g in range(len(self.labels))]

    def to_markdown(self) -> str:
        head = ["group", "channels", *(f"{r:g}" for r in self.ratios)]
        lines = [f"Channel sensitivity (each group pruned alone; baseline accuracy "
                 f"{self.baseline:.2%} on {self.samples} samples, {self.seconds:.1f} s)", "",
                 "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for label, size, accs in zip(self.labels, self.sizes, self.accuracy, strict=True):
            lines.append("| " + " | ".join([label, str(size), *(f"{a:.2%}" for a in accs)])
                         + " |")
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["group", "channels", "ratio", "accuracy", "drop"])
        for label, size, accs in zip(self.labels, self.sizes, self.accuracy, strict=True):
            for ratio, acc in zip(self.ratios, accs, strict=True):
                writer.writerow([label, size, f"{ratio:g}", f"{acc:.4f}",
                                 f"{self.baseline - acc:.4f}"])
        return out.getvalue()

    def plot(self, path: str | Path) -> Path:
        """Accuracy vs ratio, one line per group."""
        curves = {label: [(0.0, self.baseline), *zip(self.ratios, accs, strict=True)]
                  for label, accs in zip(self.labels, self.accuracy, strict=True)}
        return plot_curves(path, curves, self.baseline,
                           xlabel="fraction of the group's channels removed",
                           title="Per-group channel sensitivity")

    def write(self, directory: str | Path) -> dict[str, Path]:
        """channel_sensitivity.{csv,md,png} in ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = {"csv": directory / "channel_sensitivity.csv",
                 "md": directory / "channel_sensitivity.md"}
        paths["csv"].write_text(self.to_csv())
        paths["md"].write_text(self.to_markdown())
        paths["png"] = self.plot(directory / "channel_sensitivity.png")
        return paths


def analyze_channels(model: nn.Module, data, *, ratios: Sequence[float] = SWEEP,
                     eval_limit: int | None = 1000, importance: str = "l2",
                     ignore: Sequence[str] = (), progress: bool = False) -> ChannelSensitivity:
    """The table ``prune.channels`` with ``ratios: auto`` measures, for ``lighten analyze
    --structured``: every prunable channel group of ``model`` (unchanged) pruned alone.

    ``data`` is a DataBundle (its test split is used) or a map-style dataset of (x, y) pairs.
    """
    from lighten.prune import structured
    from lighten.prune.importance import NEEDS_GRADIENTS, make_importance

    if importance in NEEDS_GRADIENTS:
        raise UnsupportedError(f"importance {importance!r} needs gradients; analyze with a "
                               "magnitude criterion (l1, l2, fpgm, bn_scale)")
    bad = [r for r in ratios if not 0 < r < 1]
    if bad or not ratios:
        raise UnsupportedError(f"sensitivity ratios must be fractions in (0, 1), got "
                               f"{list(ratios)}; e.g. 0.3,0.5,0.7,0.9")
    dataset = getattr(data, "test", data)
    n = len(dataset) if eval_limit is None else min(eval_limit, len(dataset))
    pairs = [dataset[i] for i in range(n)]
    inputs = torch.stack([x for x, _ in pairs]) if pairs else torch.empty(0)
    labels = torch.stack([torch.as_tensor(y) for _, y in pairs]) if pairs else torch.empty(0)
    model = copy.deepcopy(model).eval()
    groups = structured.prunable_groups(model, inputs[:1], ignore=ignore)
    if not groups:
        raise UnsupportedError("no prunable conv channel groups (a model of Linear layers "
                               "only has neurons: prune.neurons), or all are pinned by the model "
                               "input/output or ignore:")
    score = make_importance(importance)
    scores = [score(model, g) for g in groups]
    return measure_channel_sensitivity(
        model, groups, lambda g, r: structured.keep_lowest_removed(groups[g], scores[g], r),
        structured.apply_keep_, inputs, labels, ratios=ratios, progress=progress,
        task=getattr(data, "task", None))


def measure_channel_sensitivity(
    model: nn.Module,
    groups: list[Group],
    plan: Callable[[int, float], torch.Tensor],
    apply: Callable[[nn.Module, list[Group], list[torch.Tensor]], None],
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    ratios: Sequence[float] = SWEEP,
    progress: bool = False,
    task=None,
) -> ChannelSensitivity:
    """Prune each group alone (on a copy) at each ratio and evaluate on ``inputs``/``labels``.

    ``plan(g, ratio)`` gives the channels group ``g`` keeps; ``apply`` slices a model -- the
    structured step passes its own, so what is measured is exactly what it would prune.
    ``task`` (a DataBundle's) scores the outputs (``task.score``); default top-1 on the last axis.
    """
    from tqdm.auto import tqdm

    from lighten.progress import on_terminal
    from lighten.training import evaluate

    if len(inputs) == 0:
        raise UnsupportedError("channel sensitivity needs labelled samples; the data given "
                               "is empty")
    ratios = sorted({float(r) for r in ratios})
    dataset = TensorDataset(inputs, labels)
    start = time.perf_counter()
    baseline = evaluate(model, dataset, task=task)
    accuracy = []
    bar = tqdm(total=len(groups) * len(ratios), desc="channel sensitivity", leave=False,
               disable=not (progress and on_terminal()))  # no redraws in a log
    for g in range(len(groups)):
        row = []
        for ratio in ratios:
            keeps = [torch.arange(other.size) for other in groups]
            keeps[g] = plan(g, ratio)
            bar.update(1)
            if len(keeps[g]) == groups[g].size:  # nothing removed (no scores): nothing to run
                row.append(baseline)
                continue
            trial = copy.deepcopy(model)
            apply(trial, groups, keeps)
            row.append(evaluate(trial, dataset, task=task))
        accuracy.append(row)
    bar.close()
    return ChannelSensitivity(baseline, [group_label(g) for g in groups],
                              [g.size for g in groups], tuple(float(r) for r in ratios),
                              accuracy, len(inputs), time.perf_counter() - start)


def derive_group_ratios(table: ChannelSensitivity,
                        fits: Callable[[list[float]], bool]) -> list[float]:
    """Per-group ratios at the smallest common drop threshold whose pruned model ``fits`` the
    budget (``fits`` measures it: MACs and parameters are not linear in the ratios).

    Drops come in steps of one sample, so curves are flat in places and a tiny change of the
    threshold can move several groups to the end of a plateau at once; the two solutions that
    bracket the threshold are then blended, again by bisection on ``fits``, so the budget is
    met without pruning past it.
    """
    top = max((d for g in range(len(table.labels)) for _, d in table.drop_curve(g)),
              default=0.0)
    if not fits(table.ratios_at(top)):
        raise UnsupportedError(
            f"the budget is out of reach even with every group pruned at the largest measured "
            f"ratio ({max(table.ratios):g}); raise target_macs / target_params, or spread it "
            "over more iterative_steps")
    lo, hi = -1.0, top  # a threshold below 0 prunes nothing
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if fits(table.ratios_at(mid)) else (mid, hi)
    below, above = table.ratios_at(lo), table.ratios_at(hi)

    def blend(alpha: float) -> list[float]:
        return [a + alpha * (b - a) for a, b in zip(below, above, strict=True)]

    lo, hi = 0.0, 1.0  # fits(blend(1)) holds
    for _ in range(20):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if fits(blend(mid)) else (mid, hi)
    return blend(hi)
