"""Rank selection for the low-rank steps: an energy threshold, the analytic EVBMF estimate, and
one global threshold found by bisection so the whole model meets a MAC target.

EVBMF (empirical variational Bayesian matrix factorization) picks the rank of a noisy matrix
without a tuning knob: Nakajima, Sugiyama, Babacan and Tomioka, "Global analytic solution of
fully-observed variational Bayesian matrix factorization", JMLR 14 (2013), give the VB solution
in closed form as a shrinkage of the singular values with a threshold; Nakajima, Tomioka,
Sugiyama and Babacan, "Condition for perfect dimensionality recovery by variational Bayesian
PCA", JMLR 16 (2015), give the noise variance as the minimizer of a one-dimensional objective
between known bounds. Kim et al. (ICLR 2016) use it on the mode unfoldings of conv kernels to pick
Tucker-2 ranks, which is what ``lowrank.tucker {ranks: vbmf}`` does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

__all__ = ["energy_rank", "evbmf_rank", "singular_values", "threshold_for_target", "unfold"]


def singular_values(matrix: torch.Tensor) -> np.ndarray:
    """Singular values of a 2-D tensor, descending, in float64 (from the eigenvalues of the
    smaller Gram matrix: the unfoldings are wide, and this is what energy thresholds read)."""
    m = matrix.detach().double()
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    return torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().flip(0).numpy()


def unfold(weight: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-``mode`` unfolding of a tensor: that axis first, the rest flattened."""
    return weight.detach().movedim(mode, 0).reshape(weight.shape[mode], -1)


def energy_rank(s: Sequence[float] | np.ndarray, energy: float) -> int:
    """Smallest r whose first r singular values hold ``energy`` of the sum of their squares."""
    sq = np.asarray(s, dtype=np.float64) ** 2
    total = sq.sum()
    if total <= 0:
        return 1
    kept = np.cumsum(sq) / total
    return int(min(len(sq), np.searchsorted(kept, energy - 1e-12) + 1))


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    """VB-shrunk squared singular value (the positive root of the EVB stationary condition)."""
    b = x - (1 + alpha)
    return 0.5 * (b + np.sqrt(np.maximum(b * b - 4 * alpha, 0.0)))


def _evb_objective(sigma2: float, L: int, M: int, s: np.ndarray, residual: float,
                   xubar: float) -> float:
    """The EVB free energy as a function of the noise variance (JMLR 16, 2015, Theorem 5):
    components above the threshold add psi0 + psi1, the others psi0, the discarded tail
    (``residual``) its share of psi0."""
    H, alpha = len(s), L / M
    x = s ** 2 / (M * sigma2)
    big, small = x[x > xubar], x[x <= xubar]
    tau = _tau(big, alpha)
    return float(np.sum(small - np.log(small)) + np.sum(big - tau)
                 + np.sum(np.log((tau + 1) / big)) + alpha * np.sum(np.log(tau / alpha + 1))
                 + residual / (M * sigma2) + (L - H) * np.log(sigma2))


def evbmf_rank(matrix: torch.Tensor | np.ndarray) -> int:
    """Rank of ``matrix`` by analytic empirical VBMF with the noise variance estimated.

    The VB solution keeps singular value ``gamma_h`` iff ``gamma_h > sigma * sqrt(M * (1 +
    tau_bar) * (1 + alpha / tau_bar))`` with ``alpha = L / M`` (L <= M) and ``tau_bar ~
    2.5129 sqrt(alpha)``; ``sigma^2`` minimizes the free energy between the bounds of JMLR 16
    (2015), Theorem 6. Returns at least 1."""
    from scipy.optimize import minimize_scalar  # scipy comes with scikit-learn

    y = torch.as_tensor(matrix).detach().double()
    if y.shape[0] > y.shape[1]:
        y = y.T
    L, M = y.shape
    s = torch.linalg.svdvals(y).numpy()
    if L < 2 or not np.isfinite(s).all() or s[0] <= 0:
        return 1
    alpha = L / M
    tau_bar = 2.5129 * math.sqrt(alpha)
    xubar = (1 + tau_bar) * (1 + alpha / tau_bar)
    xi = min(math.ceil(L / (1 + alpha)) - 1, L - 1)  # 0-based index of gamma_{xi_bar + 1}
    upper = float(np.sum(s ** 2)) / (L * M)
    lower = max(float(s[xi] ** 2) / (M * xubar), float(np.mean(s[xi:] ** 2)) / M)
    lower = min(max(lower, upper * 1e-12), upper)
    if lower >= upper:
        sigma2 = upper
    else:
        sigma2 = float(minimize_scalar(_evb_objective, args=(L, M, s, 0.0, xubar),
                                       bounds=(lower, upper), method="bounded").x)
    threshold = math.sqrt(M * sigma2 * xubar)
    return max(1, int(np.sum(s > threshold)))


def threshold_for_target(total_at: Callable[[float], float], budget: float, *,
                         iterations: int = 40) -> tuple[float, bool]:
    """The largest energy threshold ``t`` in (0, 1] with ``total_at(t) <= budget``, for a
    ``total_at`` (MACs of the model when every layer keeps ``t`` of its energy) that does not
    grow as ``t`` falls. Returns ``(t, met)``; ``met`` False: even the smallest ranks miss it."""
    if total_at(1.0) <= budget:
        return 1.0, True
    low, high = 0.0, 1.0  # total_at(high) > budget throughout
    if total_at(1e-9) > budget:
        return 1e-9, False
    low = 1e-9
    for _ in range(iterations):
        mid = (low + high) / 2
        if total_at(mid) <= budget:
            low = mid
        else:
            high = mid
    return low, True
