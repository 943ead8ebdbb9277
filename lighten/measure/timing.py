"""Latency of several deployed models timed together, in interleaved rounds.

Timing stages minutes apart, once each, compares the load of one minute with the load of
another: on a shared machine the same baseline measured 72, 107 and 25 ms at batch 64 in three
runs, so a "4.4x faster" could be pure noise. Here every model is timed in every round:

    round r: a few runs of model p_r(0), then of p_r(1), ...   (p_r: a seeded shuffle)

so a slow minute hits all models alike, and no model always runs first or right after the same
neighbour (cache and frequency effects). Each round gives one number per model and batch size:
the median of its runs in that round.

**Reported** per model and batch: the median of those per-round numbers, and as the spread the
interquartile range across rounds ``[25th, 75th percentile]``. Why the IQR of rounds and not a
bootstrap CI of the median: with the 3 to 10 rounds a run can afford, a bootstrap of the median
only resamples a handful of order statistics (its interval jumps between them and is close to
the IQR anyway), while the IQR is distribution-free, one busy round cannot widen it, and it
reads plainly: half of the rounds fell inside it. Two models are "about the same speed" (``≈``
in the stage table, :func:`lighten.report.same_speed`) when their IQRs overlap: the difference
of their medians is within the spreads.

``latency_runs`` (``deploy.latency_runs``) stays the number of timed runs per model and batch
size *in total*; :func:`split_runs` spreads them over rounds (50 -> 10 rounds of 5 runs).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lighten.errors import BackendError

BATCHES = (1, 64)  # the metrics.jsonl columns latency_ms_b1 / latency_ms_b64
MAX_ROUNDS = 10
MIN_ROUNDS = 3
RUNS_PER_ROUND = 5  # aimed for: enough for a per-round median, small enough for many rounds
WARMUP = 5  # untimed calls per model and batch before the first round
ROUND_WARMUP = 1  # untimed calls per model and batch at the start of its turn in each round


def split_runs(total: int) -> tuple[int, int]:
    """``(rounds, runs per round)`` for ``total`` timed runs per model and batch size: as many
    rounds of :data:`RUNS_PER_ROUND` runs as fit, 3 to 10 rounds; rounds x runs <= total
    (3 rounds of 1 run for 3; fewer than 3 runs give that many rounds and no real spread)."""
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise BackendError(f"latency needs at least 1 timed run, got {total!r}; raise "
                           "deploy.latency_runs")
    rounds = min(total, max(MIN_ROUNDS, min(MAX_ROUNDS, total // RUNS_PER_ROUND)))
    return rounds, total // rounds


def interleave_orders(count: int, rounds: int, *, seed: int = 0) -> list[list[int]]:
    """The order models are timed in, per round: a shuffle of ``range(count)`` drawn from a
    generator seeded with ``seed`` (the same orders for the same arguments, on any machine)."""
    rng = random.Random(seed)
    orders = []
    for _ in range(rounds):
        order = list(range(count))
        rng.shuffle(order)
        orders.append(order)
    return orders


@dataclass(frozen=True)
class LatencyStats:
    """One model at one batch size: the median of the per-round medians and their IQR."""

    median: float
    low: float  # 25th percentile of the rounds
    high: float  # 75th percentile of the rounds
    rounds: tuple[float, ...]  # per-round medians, in round order

    @classmethod
    def of(cls, per_round: Sequence[float]) -> LatencyStats:
        values = np.asarray(per_round, dtype=float)
        low, median, high = np.percentile(values, [25, 50, 75])
        return cls(float(median), float(low), float(high), tuple(float(v) for v in values))

    @property
    def spread(self) -> list[float]:
        return [self.low, self.high]


@dataclass
class Timing:
    """What :func:`time_interleaved` measured: ``stats[batch][i]`` for model ``i``."""

    stats: dict[int, list[LatencyStats]]
    orders: list[list[int]]
    rounds: int
    runs_per_round: int
    timed_at: float = field(default_factory=time.time)  # seconds since the epoch, at the end

    def row_fields(self, index: int, *, reference: int | None = 0) -> dict[str, Any]:
        """The metrics.jsonl keys of model ``index``: ``latency_ms_b<B>`` (median) and
        ``latency_ms_b<B>_spread`` ([25th, 75th percentile] of the rounds) per batch, and, for
        a model other than ``reference`` (the baseline), ``latency_ms_b<B>_ratio`` and
        ``latency_ms_b<B>_ratio_spread``: the median and IQR of its time divided by the
        reference's *in the same round*. The paired ratio is what "faster" rests on: a busy
        round slows both models of that round, so drift and load cancel in the ratio where
        they widen each model's own spread."""
        out: dict[str, Any] = {}
        for batch, per_model in self.stats.items():
            out[f"latency_ms_b{batch}"] = per_model[index].median
            out[f"latency_ms_b{batch}_spread"] = per_model[index].spread
            if reference is not None and index != reference:
                ratio = paired_ratio(per_model[index], per_model[reference])
                if ratio is not None:
                    out[f"latency_ms_b{batch}_ratio"] = ratio.median
                    out[f"latency_ms_b{batch}_ratio_spread"] = ratio.spread
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], names: Sequence[str]) -> Timing:
        """The :class:`Timing` that :meth:`to_dict` wrote for models ``names`` (each model's
        per-round medians; orders back as indices)."""
        index = {name: i for i, name in enumerate(names)}
        stats = {int(b): [LatencyStats.of(data["stages"][name][f"b{b}"]["rounds"])
                          for name in names] for b in data["batches"]}
        orders = [[index[name] for name in order] for order in data["orders"]]
        return cls(stats, orders, data["rounds"], data["runs_per_round"], data["timed_at"])

    def to_dict(self, names: Sequence[str]) -> dict[str, Any]:
        """JSON record of the whole timing (the runner writes it to ``latency.json``)."""
        return {
            "timed_at": self.timed_at, "rounds": self.rounds,
            "runs_per_round": self.runs_per_round, "batches": list(self.stats),
            "statistic": "median of per-round medians; spread: IQR across rounds",
            "orders": [[names[i] for i in order] for order in self.orders],
            "stages": {name: {f"b{batch}": {"median": per_model[i].median,
                                            "spread": per_model[i].spread,
                                            "rounds": list(per_model[i].rounds)}
                              for batch, per_model in self.stats.items()}
                       for i, name in enumerate(names)},
        }


def paired_ratio(model: LatencyStats, reference: LatencyStats) -> LatencyStats | None:
    """Per-round ``model / reference`` times (both timed in every round), as statistics."""
    if len(model.rounds) != len(reference.rounds) or not model.rounds:
        return None
    return LatencyStats.of([m / r for m, r in zip(model.rounds, reference.rounds, strict=True)
                            if r > 0])


def time_interleaved(compiled: Sequence, *, runs: int = 50, batches: Sequence[int] = BATCHES,
                     seed: int = 0, progress: bool = False) -> Timing:
    """Time every model of ``compiled`` (objects with ``latency_ms(batch, *, warmup, runs)``,
    the backends' Compiled) together: ``runs`` timed runs per model and batch in total, spread
    over interleaved rounds (:func:`split_runs`, :func:`interleave_orders`)."""
    if not compiled:
        return Timing({b: [] for b in batches}, [], 0, 0)
    rounds, per_round = split_runs(runs)
    orders = interleave_orders(len(compiled), rounds, seed=seed)
    for model in compiled:  # first calls allocate buffers and pick kernels: never timed
        for batch in batches:
            model.latency_ms(batch, warmup=WARMUP - 1, runs=1)
    times: dict[int, list[list[float]]] = {b: [[] for _ in compiled] for b in batches}
    from lighten.progress import bar, line

    line(f"latency: {len(compiled)} model(s), {rounds} interleaved rounds of {per_round} run(s)",
         enabled=progress)
    for order in bar(orders, desc=f"latency ({len(compiled)} stages)", unit="round",
                     enabled=progress):
        for i in order:
            for batch in batches:
                times[batch][i].append(compiled[i].latency_ms(batch, warmup=ROUND_WARMUP,
                                                              runs=per_round))
    stats = {b: [LatencyStats.of(per) for per in times[b]] for b in batches}
    return Timing(stats, orders, rounds, per_round)


__all__ = ["BATCHES", "LatencyStats", "Timing", "interleave_orders", "paired_ratio",
           "split_runs", "time_interleaved"]
