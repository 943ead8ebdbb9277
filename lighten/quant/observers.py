"""Activation-range calibration: feed batches with ``observe(x)``, then read ``range()``.

All observers track per-tensor ranges (activations are quantized per tensor). Percentile and MSE
keep a bounded random sample of values, so memory stays flat however many batches are seen;
entropy keeps a fixed 2048-bin histogram.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from lighten.errors import UnsupportedError
from lighten.quant.quantizer import QuantSpec, compute_qparams, fake_quantize

_SAMPLE_CAP = 1 << 18  # values kept per observer for percentile / MSE
_SEARCH_CAP = 1 << 14  # values the MSE search evaluates per candidate range


class Observer(Protocol):
    def observe(self, x: torch.Tensor) -> None: ...
    def range(self) -> tuple[float, float]: ...


class _Base:
    def __init__(self) -> None:
        self.count = 0

    def range(self) -> tuple[float, float]:
        if self.count == 0:
            raise UnsupportedError(
                f"{type(self).__name__} saw no data; run calibration batches through the model"
            )
        return self._range()

    def _range(self) -> tuple[float, float]:
        raise NotImplementedError


class MinMaxObserver(_Base):
    """Smallest and largest value ever seen: never clips, sensitive to outliers."""

    def __init__(self) -> None:
        super().__init__()
        self.lo, self.hi = float("inf"), float("-inf")

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach()
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))
        self.count += 1

    def _range(self) -> tuple[float, float]:
        return self.lo, self.hi


class MovingAverageMinMaxObserver(_Base):
    """Exponential moving average of per-batch min/max: damps single-batch outliers."""

    def __init__(self, momentum: float = 0.1) -> None:
        super().__init__()
        self.momentum = momentum
        self.lo = self.hi = 0.0

    def observe(self, x: torch.Tensor) -> None:
        lo, hi = float(x.detach().min()), float(x.detach().max())
        if self.count == 0:
            self.lo, self.hi = lo, hi
        else:
            m = self.momentum
            self.lo, self.hi = self.lo + m * (lo - self.lo), self.hi + m * (hi - self.hi)
        self.count += 1

    def _range(self) -> tuple[float, float]:
        return self.lo, self.hi


class _Sampling(_Base):
    """Keeps up to ``_SAMPLE_CAP`` values, subsampled uniformly at random (seeded)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self._chunks: list[torch.Tensor] = []
        self._kept = 0
        self._gen = torch.Generator().manual_seed(seed)

    def observe(self, x: torch.Tensor) -> None:
        flat = x.detach().float().reshape(-1)
        per_batch = _SAMPLE_CAP // 8
        if flat.numel() > per_batch:
            idx = torch.randint(flat.numel(), (per_batch,), generator=self._gen)
            flat = torch.cat([flat[idx], flat.min().reshape(1), flat.max().reshape(1)])
        self._chunks.append(flat.clone())
        self._kept += flat.numel()
        if self._kept > _SAMPLE_CAP:  # thin out everything kept so far by half
            all_ = torch.cat(self._chunks)
            idx = torch.randperm(all_.numel(), generator=self._gen)[: _SAMPLE_CAP // 2]
            self._chunks, self._kept = [all_[idx]], _SAMPLE_CAP // 2
        self.count += 1

    def values(self) -> torch.Tensor:
        return torch.cat(self._chunks)


class PercentileObserver(_Sampling):
    """Clips the ``100 - p`` percent tails: e.g. p=99.99 ignores the rarest outliers."""

    def __init__(self, percentile: float = 99.99, seed: int = 0) -> None:
        if not 50.0 < percentile <= 100.0:
            raise UnsupportedError(
                f"percentile={percentile} is out of range; use a value in (50, 100], e.g. 99.99"
            )
        super().__init__(seed)
        self.percentile = percentile

    def _range(self) -> tuple[float, float]:
        v = self.values().double()
        q = self.percentile / 100.0
        return float(torch.quantile(v, 1.0 - q)), float(torch.quantile(v, q))


class MSEObserver(_Sampling):
    """Searches the clipping ratio of the min/max range that minimizes quantization MSE."""

    def __init__(self, spec: QuantSpec | None = None, steps: int = 64, seed: int = 0) -> None:
        super().__init__(seed)
        self.spec = spec or QuantSpec(bits=8, symmetric=False, signed=False)
        self.steps = steps

    def _range(self) -> tuple[float, float]:
        v = self.values()
        lo, hi = float(v.min()), float(v.max())
        if v.numel() > _SEARCH_CAP:  # the error curve is smooth: a subsample finds its minimum
            v = v[torch.randperm(v.numel(), generator=self._gen)[:_SEARCH_CAP]]
        best, best_err = (lo, hi), float("inf")
        for i in range(self.steps):
            ratio = 1.0 - i / (self.steps + 1)
            cand = (lo * ratio, hi * ratio)
            err = quantization_mse(v, cand, self.spec)
            if err < best_err:
                best, best_err = cand, err
        return best


class EntropyObserver(_Base):
    """TensorRT-style KL calibration (Migacz, GTC 2017): the range whose quantized histogram
    loses the least information, ``argmin KL(P || Q)``, so rare outliers get clipped.

    The histogram (2048 bins) is anchored at 0: over ``[0, R]`` while every value seen is
    non-negative (post-ReLU: all bins serve the uint8 range that starts at 0), over ``[-R, R]``
    once a negative value appears (signed data: the asymmetric uint8 range may clip each side
    differently). ``R`` only ever grows by powers of two, so earlier batches re-bin exactly
    (2^k old bins become one new bin) instead of being interpolated.

    Exact zeros (half of a ReLU's outputs) are left out of the histogram: every candidate range
    represents 0 exactly, so they cannot inform the choice, while as a spike in the first bin
    they would bias KL towards ranges so narrow that the spike's bin stays unmerged.
    """

    def __init__(self, spec: QuantSpec | None = None, bins: int = 2048) -> None:
        super().__init__()
        spec = spec or QuantSpec(bits=8, symmetric=False, signed=False)
        self.levels = spec.qmax - spec.qmin  # quantization bins a range is merged into
        if bins % 2 or bins < 2 * self.levels:
            raise UnsupportedError(f"entropy calibration needs an even bin count >= "
                                   f"{2 * self.levels}, got {bins}")
        self.bins = bins
        self.hist = torch.zeros(bins, dtype=torch.float64)
        self.radius = 0.0  # R: the histogram covers [0, R] or [-R, R]
        self.signed = False

    @property
    def zero_bin(self) -> int:
        """Index of the bin whose left edge is 0."""
        return self.bins // 2 if self.signed else 0

    @property
    def bin_width(self) -> float:
        return (2 if self.signed else 1) * self.radius / self.bins

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1)
        self.count += 1
        if x.numel() == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        if lo < 0 and not self.signed:
            self._make_signed()
        self._grow(max(hi, -lo))
        if self.radius == 0.0:  # every value so far is exactly 0
            return
        edge = -self.radius if self.signed else 0.0
        self.hist += torch.histc(x[x != 0], self.bins, edge, self.radius).double()

    def _make_signed(self) -> None:
        """[0, R] -> [-R, R]: pairs of old bins become one bin of the positive half."""
        half = self.bins // 2
        merged = self.hist.reshape(half, 2).sum(dim=1)
        self.hist = torch.cat([torch.zeros(half, dtype=torch.float64), merged])
        self.signed = True

    def _grow(self, amax: float) -> None:
        if amax <= self.radius:
            return
        if self.radius == 0.0:
            self.radius = amax
            return
        k = max(1, int(np.ceil(np.log2(amax / self.radius))))
        while self.radius * 2.0**k < amax:  # guard against log2 rounding down
            k += 1
        c = self.zero_bin
        offset = torch.arange(self.bins) - c  # bin index relative to 0
        target = c + torch.div(offset, 2**k, rounding_mode="floor")  # floor keeps 0 an edge
        self.hist = torch.zeros_like(self.hist).index_add_(0, target, self.hist)
        self.radius *= 2.0**k

    def _range(self) -> tuple[float, float]:
        if self.radius == 0.0 or not self.hist.any():
            return 0.0, 0.0
        hist = self.hist.numpy()
        start, stop = _best_window(hist, self.zero_bin, self.levels)
        w = self.bin_width
        return (start - self.zero_bin) * w, (stop - self.zero_bin) * w


def _best_window(hist: np.ndarray, zero: int, levels: int) -> tuple[int, int]:
    """Bins ``[start, stop)`` (containing the zero edge) with the smallest KL divergence.

    Candidates shrink from the occupied range one bin at a time, from the side whose clipped
    tail would then hold fewer values (on a tie, the side reaching farther from 0), down to
    ``levels`` bins; on one-sided data only the top moves. KL is evaluated on every ``stride``-th
    candidate (~128 of ~2000: dozens of observers per model must stay fast).
    """
    nonzero = np.flatnonzero(hist)
    start, stop = min(int(nonzero[0]), zero), max(int(nonzero[-1]) + 1, zero)
    cumsum = np.concatenate([[0.0], np.cumsum(hist)])
    path = [(start, stop)]
    while stop - start > levels:
        left, right = cumsum[start + 1], cumsum[-1] - cumsum[stop - 1]
        lighter_left = left < right or (left == right and zero - start >= stop - zero)
        if start < zero and (stop == zero or lighter_left):
            start += 1
        else:
            stop -= 1
        path.append((start, stop))
    if len(path) == 1:
        return path[0]

    stride = max(1, len(path) // 128)
    picks = list(range(0, len(path), stride))
    kl = np.array([_kl_of_window(hist, cumsum, *path[i], levels) for i in picks])
    # Spikes in the histogram (a constant background pixel gives one value per channel) make
    # KL jump with how group edges happen to fall around them; a running mean over +-2
    # candidates follows the trend instead of the luckiest alignment.
    padded = np.concatenate([np.full(2, kl[0]), kl, np.full(2, kl[-1])])
    smooth = np.convolve(padded, np.ones(5) / 5, mode="valid")
    return path[picks[int(np.argmin(smooth))]]


def _kl_of_window(hist, cumsum, start: int, stop: int, levels: int) -> float:
    """KL(P || Q): P is the window with the clipped tails piled onto its edge bins, Q the
    window alone merged into ``levels`` bins and spread back evenly over P's non-empty bins."""
    p = hist[start:stop].copy()
    p[0] += cumsum[start]
    p[-1] += cumsum[-1] - cumsum[stop]
    n = stop - start
    edges = (np.arange(levels) * n) // levels  # first bin of each merged group
    merged = np.add.reduceat(hist[start:stop], edges)
    occupied = p > 0
    per_group = np.add.reduceat(occupied.astype(np.float64), edges)
    group = np.repeat(np.arange(levels), np.diff(np.append(edges, n)))
    q = np.where(occupied, merged[group] / np.maximum(per_group[group], 1.0), 0.0)
    p, q = _smooth(p), _smooth(q)
    if p is None or q is None:
        return float("inf")
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum(p * np.log(p / q)))


def _smooth(d: np.ndarray, eps: float = 1e-4) -> np.ndarray | None:
    """Give empty bins ``eps`` counts taken from the others, so ``log(p / q)`` stays finite."""
    empty = d == 0
    n_empty, n_full = int(empty.sum()), int((~empty).sum())
    if n_full == 0:
        return None
    out = d + eps * empty - (eps * n_empty / n_full) * ~empty
    return out if (out > 0).all() else None


def quantization_mse(values: torch.Tensor, rng: tuple[float, float], spec: QuantSpec) -> float:
    """Mean squared error of fake-quantizing ``values`` with the parameters of ``rng``."""
    scale, zp = compute_qparams(torch.tensor(rng[0]), torch.tensor(rng[1]), spec)
    return float((fake_quantize(values, scale, zp, spec) - values).pow(2).mean())


def make_observer(kind: str, *, percentile: float = 99.99, spec: QuantSpec | None = None):
    """Observer by calibration name (the ``calibration`` field of PTQConfig)."""
    if kind == "minmax":
        return MinMaxObserver()
    if kind == "moving_average":
        return MovingAverageMinMaxObserver()
    if kind == "percentile":
        return PercentileObserver(percentile)
    if kind == "mse":
        return MSEObserver(spec)
    if kind == "entropy":
        return EntropyObserver(spec)
    raise UnsupportedError(
        f"unknown calibration {kind!r}; use minmax, moving_average, percentile, mse or entropy"
    )
