"""Sensitivity analysis: how much accuracy each layer loses when pruned alone.

Every prunable layer is pruned by itself at a sweep of ratios, the model evaluated on a small
subset, and the layer restored. The resulting table tells which layers tolerate heavy pruning;
:func:`derive_ratios` turns it into non-uniform per-layer ratios that reach an overall sparsity
while every layer stays under a common accuracy-drop threshold (Han et al. 2015, §3.2 style).
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from lighten.errors import UnsupportedError
from lighten.prune.magnitude import _keep_largest, prunable_weights

__all__ = ["SensitivityTable", "analyze", "derive_ratios", "plot_curves", "ratio_at_drop"]


def _magnitude_mask(weight: torch.Tensor, ratio: float) -> torch.Tensor:
    return _keep_largest(weight.detach().abs().flatten(), ratio).view_as(weight)


# kind -> (weight, ratio) -> keep-mask. Other unstructured criteria plug in here.
KINDS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {"magnitude": _magnitude_mask}


@dataclass(frozen=True)
class SensitivityRow:
    layer: str
    ratio: float
    accuracy: float


@dataclass
class SensitivityTable:
    """Accuracy of the model with one layer pruned at one ratio; ``baseline`` is none pruned."""

    baseline: float
    rows: list[SensitivityRow]
    layer_sizes: dict[str, int]  # prunable weights per layer, in model order
    kind: str = "magnitude"
    eval_samples: int = 0
    seconds: float = 0.0
    ratios: tuple[float, ...] = field(default=())

    @property
    def layers(self) -> list[str]:
        return list(self.layer_sizes)

    def accuracy(self, layer: str, ratio: float) -> float:
        """Accuracy with ``layer`` pruned at ``ratio`` (0 gives the baseline)."""
        for row in self.rows:
            if row.layer == layer and abs(row.ratio - ratio) < 1e-9:
                return row.accuracy
        if ratio == 0:
            return self.baseline
        raise KeyError(f"no row for layer {layer!r} at ratio {ratio}")

    def curve(self, layer: str) -> list[tuple[float, float]]:
        """(ratio, accuracy) points for ``layer``, ratio 0 (the baseline) first."""
        points = {0.0: self.baseline}
        points.update({r.ratio: r.accuracy for r in self.rows if r.layer == layer})
        return sorted(points.items())

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["layer", "params", "ratio", "accuracy", "drop"])
        for r in self.rows:
            writer.writerow([r.layer, self.layer_sizes[r.layer], f"{r.ratio:g}",
                             f"{r.accuracy:.4f}", f"{self.baseline - r.accuracy:.4f}"])
        return out.getvalue()

    def to_markdown(self) -> str:
        """Layers as rows, ratios as columns, accuracy in percent; baseline in the header."""
        head = ["layer", "params"] + [f"{r:g}" for r in self.ratios]
        lines = [f"Sensitivity ({self.kind} pruning, one layer at a time; baseline accuracy "
                 f"{self.baseline:.2%} on {self.eval_samples} samples, {self.seconds:.1f} s)", "",
                 "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for layer, size in self.layer_sizes.items():
            cells = [f"{self.accuracy(layer, r):.2%}" for r in self.ratios]
            lines.append("| " + " | ".join([layer, str(size), *cells]) + " |")
        return "\n".join(lines) + "\n"

    def plot(self, path: str | Path) -> Path:
        """Accuracy vs ratio, one line per layer."""
        return plot_curves(path, {layer: self.curve(layer) for layer in self.layers},
                           self.baseline, xlabel="fraction of the layer's weights pruned",
                           title=f"Per-layer sensitivity ({self.kind})")

    def write(self, directory: str | Path) -> dict[str, Path]:
        """sensitivity.csv, sensitivity.md and sensitivity.png in ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = {"csv": directory / "sensitivity.csv", "md": directory / "sensitivity.md"}
        paths["csv"].write_text(self.to_csv())
        paths["md"].write_text(self.to_markdown())
        paths["png"] = self.plot(directory / "sensitivity.png")
        return paths


def plot_curves(path: str | Path, curves: dict[str, list[tuple[float, float]]],
                baseline: float, *, xlabel: str, title: str) -> Path:
    """Accuracy vs ratio, one line per curve, baseline dashed (matplotlib Agg, imported here)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, points in curves.items():
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, [100 * y for y in ys], marker="o", label=label)
    ax.axhline(100 * baseline, color="gray", linestyle="--", label="baseline")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.legend(fontsize="small", ncol=2 if len(curves) > 8 else 1)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def analyze(
    model: nn.Module,
    data,
    *,
    ratios: Sequence[float] = (0.3, 0.5, 0.7, 0.9),
    eval_limit: int | None = 1000,
    kind: str = "magnitude",
    ignore: Sequence[str] = (),
    progress: bool = False,
) -> SensitivityTable:
    """Prune each prunable layer alone at each ratio, evaluate, restore; ``model`` is unchanged.

    ``data`` is a DataBundle (its test split is used) or any dataset of (x, y) pairs.
    """
    from tqdm.auto import tqdm

    from lighten.progress import on_terminal
    from lighten.training import evaluate

    if kind not in KINDS:
        raise UnsupportedError(f"sensitivity kind {kind!r} is unknown; use one of {sorted(KINDS)}")
    bad = [r for r in ratios if not 0 <= r < 1]
    if bad or not ratios:
        raise UnsupportedError(f"sensitivity ratios must be fractions in [0, 1), got "
                               f"{list(ratios)}; e.g. 0.3,0.5,0.7,0.9")
    dataset = _eval_set(data, eval_limit)
    weights = prunable_weights(model, list(ignore))
    start = time.perf_counter()
    task = getattr(data, "task", None)  # a DataBundle's task: next-token accuracy for an LM
    baseline = evaluate(model, dataset, task=task)
    rows = []
    bar = tqdm(total=len(weights) * len(ratios), desc="sensitivity", leave=False,
               disable=not (progress and on_terminal()))  # no redraws in a log
    for name, weight in weights.items():
        original = weight.detach().clone()
        try:
            for ratio in ratios:
                with torch.no_grad():
                    weight.mul_(KINDS[kind](original, ratio))
                rows.append(SensitivityRow(name, float(ratio), evaluate(model, dataset,
                                                                          task=task)))
                with torch.no_grad():
                    weight.copy_(original)
                bar.update(1)
        finally:
            with torch.no_grad():
                weight.copy_(original)
    bar.close()
    return SensitivityTable(baseline, rows, {n: w.numel() for n, w in weights.items()}, kind,
                            len(dataset), time.perf_counter() - start,
                            tuple(sorted(float(r) for r in ratios)))


def _eval_set(data, eval_limit: int | None) -> Dataset:
    dataset = getattr(data, "test", data)
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise UnsupportedError(f"sensitivity data is a {type(data).__name__}; pass a DataBundle "
                               "or a map-style dataset of (x, y) pairs")
    if eval_limit is not None and eval_limit < len(dataset):
        dataset = Subset(dataset, range(eval_limit))
    return dataset


def derive_ratios(table: SensitivityTable, target_sparsity: float, *,
                  max_drop: float | None = None) -> dict[str, float]:
    """Per-layer ratios whose weighted mean is exactly ``target_sparsity``, least drop first.

    Each layer's drop-vs-ratio curve (monotone envelope, linear between measured ratios, never
    beyond the largest measured ratio) is cut at a common threshold tau, bisected until the
    overall sparsity is reached; the two bracketing solutions are then blended so the target is
    met exactly. ``max_drop`` (fraction, e.g. 0.01) caps each layer's ratio where its measured
    drop would exceed it (interpolated between measured ratios).
    """
    if not 0 < target_sparsity < 1:
        raise UnsupportedError(f"target sparsity {target_sparsity} must be a fraction in (0, 1)")
    curves = {layer: _drop_curve(table, layer, max_drop) for layer in table.layers}
    sizes = table.layer_sizes
    total = sum(sizes.values())

    def at(tau: float) -> dict[str, float]:
        return {layer: ratio_at_drop(curve, tau) for layer, curve in curves.items()}

    def sparsity(ratios: dict[str, float]) -> float:
        return sum(ratios[n] * sizes[n] for n in ratios) / total

    top = max((d for c in curves.values() for _, d in c), default=0.0)
    hi_ratios = at(top)
    if sparsity(hi_ratios) < target_sparsity - 1e-12:
        limit = "under max_drop" if max_drop is not None else "at the largest measured ratio"
        raise UnsupportedError(
            f"target sparsity {target_sparsity:.3f} is out of reach: every layer pruned {limit} "
            f"gives {sparsity(hi_ratios):.3f}; measure larger ratios or relax max_drop")
    lo, hi = -1.0, top  # tau < 0 prunes nothing
    for _ in range(60):
        mid = (lo + hi) / 2
        if sparsity(at(mid)) >= target_sparsity:
            hi = mid
        else:
            lo = mid
    lo_ratios, hi_ratios = at(lo), at(hi)
    s_lo, s_hi = sparsity(lo_ratios), sparsity(hi_ratios)
    alpha = 1.0 if s_hi - s_lo < 1e-12 else (target_sparsity - s_lo) / (s_hi - s_lo)
    return {n: lo_ratios[n] + alpha * (hi_ratios[n] - lo_ratios[n]) for n in curves}


def _drop_curve(table: SensitivityTable, layer: str,
                max_drop: float | None) -> list[tuple[float, float]]:
    """(ratio, drop) points, drop made non-decreasing; cut where drop first exceeds max_drop."""
    points, worst = [], 0.0
    for ratio, acc in table.curve(layer):
        worst = max(worst, table.baseline - acc)
        if max_drop is not None and worst > max_drop:  # stop where the line crosses max_drop
            r0, d0 = points[-1]
            points.append((r0 + (max_drop - d0) / (worst - d0) * (ratio - r0), max_drop))
            break
        points.append((ratio, worst))
    return points


def ratio_at_drop(curve: list[tuple[float, float]], tau: float) -> float:
    """Largest ratio whose (interpolated) drop is <= tau; 0 when tau < 0."""
    if tau < 0:
        return 0.0
    best = 0.0
    for (r0, d0), (r1, d1) in zip(curve, curve[1:], strict=False):
        if d1 <= tau:
            best = r1
        else:
            if d0 <= tau:
                best = r0 + (tau - d0) / (d1 - d0) * (r1 - r0)
            break
    return best
