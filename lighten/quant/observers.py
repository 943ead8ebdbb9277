"""Activation-range calibration: feed batches with ``observe(x)``, then read ``range()``.

All observers track per-tensor ranges (activations are quantized per tensor). Percentile and MSE
keep a bounded random sample of values, so memory stays flat however many batches are seen.
"""

from __future__ import annotations

from typing import Protocol

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
    raise UnsupportedError(
        f"unknown calibration {kind!r}; use minmax, moving_average, percentile or mse"
    )
