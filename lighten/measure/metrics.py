"""Classification metrics on logits: accuracy, agreement with a reference, recall, macro F1."""

from __future__ import annotations

import numpy as np
import torch

from lighten.errors import DataError


def _np(a) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def _predictions(logits) -> np.ndarray:
    logits = _np(logits)
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise DataError(f"logits must have shape (N, classes) with N > 0, got {logits.shape}; "
                        "pass the model outputs for a non-empty batch")
    return logits.argmax(1)


def _labels(labels, n: int) -> np.ndarray:
    labels = _np(labels).reshape(-1)
    if labels.shape[0] != n:
        raise DataError(f"{labels.shape[0]} labels for {n} predictions; pass one label per row")
    return labels


def accuracy(logits, labels) -> float:
    """Top-1 accuracy in [0, 1]."""
    pred = _predictions(logits)
    return float(np.mean(pred == _labels(labels, len(pred))))


def agreement(logits, reference_logits) -> float:
    """Fraction of rows whose top-1 class equals the reference model's top-1 class."""
    pred = _predictions(logits)
    ref = _predictions(reference_logits)
    if ref.shape != pred.shape:
        raise DataError(f"reference has {len(ref)} rows but logits have {len(pred)}; "
                        "compare predictions on the same samples")
    return float(np.mean(pred == ref))


def recall_per_class(logits, labels) -> dict[int, float]:
    """Class -> recall, for every class that occurs in ``labels``."""
    pred = _predictions(logits)
    labels = _labels(labels, len(pred))
    return {int(c): float(np.mean(pred[labels == c] == c)) for c in np.unique(labels)}


def macro_f1(logits, labels) -> float:
    """Unweighted mean F1 over classes present in labels or predictions (as scikit-learn)."""
    pred = _predictions(logits)
    labels = _labels(labels, len(pred))
    scores = []
    for c in np.union1d(labels, pred):
        tp = np.sum((pred == c) & (labels == c))
        fp = np.sum((pred == c) & (labels != c))
        fn = np.sum((pred != c) & (labels == c))
        denom = 2 * tp + fp + fn
        scores.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(scores))
