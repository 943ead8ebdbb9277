"""Exit thresholds calibrated on held-out data to an accuracy-loss or a mean-cost target.

Everything is computed once on the held-out split: each exit's confidence and correctness per
sample (N x exits) and each exit's cumulative cost. A threshold vector then decides per sample
its first confident exit, so accuracy and mean cost of any thresholds are a few array ops, and
a coordinate search over per-exit grids (the quantiles of that exit's confidences) is cheap.

Targets: ``max_drop`` (accuracy points the exits may lose against running every sample to the
final exit; with ``margin`` > 0, the held-out estimate plus ``margin`` standard errors of it,
so that the drop also holds on new data with that confidence) -> the cheapest thresholds
within it; ``target_macs`` (mean cost as a fraction of ``reference_cost``, the model without
exits) -> the most accurate thresholds within it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NEVER = 2.0  # confidences are in [0, 1]: a threshold of 2 never exits
GRID = 64


@dataclass(frozen=True)
class Calibration:
    thresholds: list[float]
    accuracy: float  # held-out accuracy with these thresholds
    final_accuracy: float  # held-out accuracy of the final exit alone
    mean_cost: float  # mean cost per sample (same unit as costs)
    shares: list[float]  # share of samples answered by each exit, the final one last
    exit_accuracy: list[float | None]  # accuracy of each exit on the samples it answered
    met: bool  # the target holds on the held-out data

    def as_dict(self) -> dict:
        return {"thresholds": self.thresholds, "accuracy": self.accuracy,
                "final_accuracy": self.final_accuracy, "mean_cost": self.mean_cost,
                "shares": self.shares, "exit_accuracy": self.exit_accuracy, "met": self.met}


def exit_index(scores: np.ndarray, thresholds) -> np.ndarray:
    """Per sample, the first exit whose confidence reaches its threshold (K: the final)."""
    n, k = scores.shape
    chosen = np.full(n, k)
    for i in reversed(range(k)):
        chosen = np.where(scores[:, i] >= thresholds[i], i, chosen)
    return chosen


def evaluate(scores, correct, costs, thresholds) -> tuple[float, float, np.ndarray]:
    """(accuracy, mean cost, chosen exit per sample) of ``thresholds``."""
    chosen = exit_index(scores, thresholds)
    rows = np.arange(len(chosen))
    return float(correct[rows, chosen].mean()), float(np.asarray(costs)[chosen].mean()), chosen


def calibrate(scores: np.ndarray, correct: np.ndarray, costs, *, max_drop: float | None = None,
              target_macs: float | None = None, reference_cost: float | None = None,
              margin: float = 0.0) -> Calibration:
    """Thresholds for ``scores`` (N, K: confidence of exits 0..K-1), ``correct`` (N, K+1: exit
    k right on sample n, the final exit last) and ``costs`` (K+1 cumulative costs)."""
    scores = np.asarray(scores, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    costs = np.asarray(costs, dtype=np.float64)
    k = scores.shape[1]
    final_acc = float(correct[:, -1].mean())
    reference = float(reference_cost or costs[-1])

    rows = np.arange(len(correct))

    def key(t) -> tuple[float, float]:
        acc, cost, chosen = evaluate(scores, correct, costs, t)
        if target_macs is not None:
            return max(0.0, cost / reference - target_macs), -acc
        drop = final_acc - acc
        if margin:  # standard error of the paired per-sample difference
            diff = correct[:, -1].astype(np.float64) - correct[rows, chosen]
            drop += margin * diff.std() / np.sqrt(len(diff))
        return max(0.0, drop - max_drop / 100.0), cost

    grids = [np.unique(np.r_[np.quantile(scores[:, i], np.linspace(0, 1, GRID)), NEVER])
             for i in range(k)]
    # start from the best shared threshold, then improve one exit at a time
    shared = np.unique(np.concatenate(grids))
    best = min(([float(v)] * k for v in shared), key=key) if k else []
    best_key = key(best)
    for _ in range(6):
        changed = False
        for i in range(k):
            for v in grids[i]:
                trial = [*best[:i], float(v), *best[i + 1:]]
                trial_key = key(trial)
                if trial_key < best_key:
                    best, best_key, changed = trial, trial_key, True
        if not changed:
            break
    acc, cost, chosen = evaluate(scores, correct, costs, best)
    shares = [float((chosen == i).mean()) for i in range(k + 1)]
    exit_acc = [float(correct[rows[chosen == i], i].mean()) if (chosen == i).any() else None
                for i in range(k + 1)]
    return Calibration([float(t) for t in best], acc, final_acc, cost, shares, exit_acc,
                       met=best_key[0] == 0.0)
