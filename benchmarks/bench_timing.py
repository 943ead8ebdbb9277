"""Latency for the benchmark tables, through the library's own timing.

Every benchmark that reports latency times its deployed models together with
:func:`lighten.measure.timing.time_interleaved` (interleaved rounds in a seeded order; per model
the median of the per-round medians and the interquartile range across rounds as the spread),
stores ``latency_ms_b1`` / ``latency_ms_b64`` and their ``*_spread`` ``[25th, 75th percentile]``
in each row, as ``metrics.jsonl`` does, and writes its cells with the helpers below:
``20.12 ±3%`` (± half the IQR in percent of the median, :func:`lighten.report.latency_text`'s
wording) and, in ratio columns, the *paired* ratio: each round's time of one row divided by the
other's in the same round (load and drift hit both), its median, and ``≈`` where the IQR of those
per-round ratios holds 1: the difference is inside the noise. Rows keep their per-round medians
(``latency_ms_b<B>_rounds``) for that.

The timing runs in a fresh process that opens only the deployed files
(:func:`lighten.measure.timing_worker.time_files_in_fresh_process`), as the runner's stage
timing does: the benchmark's own process has trained and compiled everything, and that history
skews latency (a dense pruned LeNet-5 timed 1.5-1.9x faster than its identical baseline there).
Where a row has no file to open (eager PyTorch), all rows are timed in-process and the returned
``how`` says so.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lighten.measure.timing import LatencyStats, paired_ratio, time_interleaved
from lighten.measure.timing_worker import time_files_in_fresh_process
from lighten.report import same_speed

B1_FACTOR = 4  # batch 1 is cheap: four times the runs of batch 64


def time_rows(rows: Sequence[dict], compiled: Sequence, *, runs: int, seed: int = 0,
              b1_factor: int = B1_FACTOR, progress: bool = False) -> dict[str, Any]:
    """Time ``compiled[i]`` (objects with ``latency_ms(batch, *, warmup, runs)``) for
    ``rows[i]``, all together in interleaved rounds: ``b1_factor * runs`` runs per model at
    batch 1, ``runs`` at batch 64. Sets each row's ``latency_ms_b<B>`` (median) and
    ``latency_ms_b<B>_spread``; returns how it was timed (for the JSON and the footnote)."""
    if len(rows) != len(compiled):
        raise ValueError(f"{len(rows)} rows but {len(compiled)} compiled models")
    how: dict[str, Any] = {"statistic": "median of per-round medians; spread: IQR across "
                           "interleaved rounds (lighten.measure.timing)"}
    for batch, total in ((1, b1_factor * runs), (64, runs)):
        timing = time_files_in_fresh_process(list(compiled), runs=total, seed=seed,
                                             batches=(batch,))
        how["process"] = "fresh process (deployed files only)"
        if timing is None:
            how["process"] = "benchmark process (a row has no deployed file to reopen)"
            timing = time_interleaved(list(compiled), runs=total, batches=(batch,), seed=seed,
                                      progress=progress)
        for i, row in enumerate(rows):
            row.update(timing.row_fields(i, reference=None))
            row[f"latency_ms_b{batch}_rounds"] = list(timing.stats[batch][i].rounds)
        how[f"b{batch}"] = {"runs": total, "rounds": timing.rounds,
                            "runs_per_round": timing.runs_per_round}
    return how


def ms_cell(row: dict, key: str, digits: int = 2) -> str:
    """``row[key]`` in ms with its spread: ``20.12 ±3%`` (no ± where the row has none)."""
    value, spread = row.get(key), row.get(f"{key}_spread")
    if value is None:
        return "-"
    if not (isinstance(spread, list | tuple) and len(spread) == 2) or not value:
        return f"{value:.{digits}f}"
    half = 100 * (spread[1] - spread[0]) / 2 / value
    return f"{value:.{digits}f} ±{half:.1f}%" if half < 9.95 else f"{value:.{digits}f} ±{half:.0f}%"


def overlap(a: dict, b: dict, key: str) -> bool:
    """Whether rows ``a`` and ``b`` have overlapping spreads of ``key`` (False where either
    has none)."""
    return bool(same_speed(a.get(f"{key}_spread"), b.get(f"{key}_spread")))


def ratio_cell(num: dict, den: dict, key: str = "latency_ms_b64", digits: int = 2,
               scale: float = 1.0, fmt: str = "{:.{d}f}x") -> str:
    """``scale * num[key] / den[key]`` (``1.65x``) as the median of the same-round ratios where
    both rows were timed in the same rounds, ``≈`` where the IQR of those ratios holds 1 (the
    ratio is within the noise); rows without rounds fall back to whether their spreads
    overlap; ``1.00x`` for a row against itself."""
    if num.get(key) is None or den.get(key) is None:
        return "-"
    if num is den:
        return fmt.format(scale, d=digits)
    rounds_num, rounds_den = num.get(f"{key}_rounds"), den.get(f"{key}_rounds")
    if rounds_num and rounds_den and len(rounds_num) == len(rounds_den):
        ratio = paired_ratio(LatencyStats.of(rounds_num), LatencyStats.of(rounds_den))
        if ratio is not None:
            if ratio.low <= 1.0 <= ratio.high:
                return "≈"
            return fmt.format(scale * ratio.median, d=digits)
    if overlap(num, den, key):
        return "≈"
    return fmt.format(scale * num[key] / den[key], d=digits)


def spread_note(how: dict[str, Any]) -> str:
    """One sentence for a table's footnote: how latency was timed and what ± and ≈ mean."""
    parts = [f"{how[b]['rounds']} rounds x {how[b]['runs_per_round']} runs at {b}"
             for b in ("b1", "b64") if b in how]
    where = f" in a {how['process']}" if "process" in how else ""
    return ("Latency: all rows timed together" + where + " in interleaved rounds ("
            + ", ".join(parts)
            + "); median of the per-round medians, ± half the interquartile range across "
            "rounds in % of the median; a ratio column gives the median of the same-round "
            "ratios, ≈ where their interquartile range holds 1 (within the noise).")


def bench_parser(description: str, *, epochs: float, parts: list[str], out: Path
                 ) -> argparse.ArgumentParser:
    """The options a training benchmark shares (``--quick``, ``--epochs``, ``--train`` and
    ``--test`` sample counts, ``--runs`` of timing, ``--threads``, ``--parts``, ``--out``), so
    each script adds only its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--epochs", type=float, default=epochs)
    parser.add_argument("--train", type=int, default=60000)
    parser.add_argument("--test", type=int, default=10000)
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--parts", nargs="+", default=parts)
    parser.add_argument("--out", type=Path, default=out)
    return parser


def parse_bench_args(parser: argparse.ArgumentParser, argv=None, **quick) -> argparse.Namespace:
    """``parser``'s arguments with ``argv`` kept (the results state the command) and, under
    ``--quick``, the ``quick`` values in place of the defaults. ``--threads`` also caps
    PyTorch's own threads (training, calibration), not only the timed backends': two threads
    on two shared cores wait on each other (a training step measured 8x slower under load)."""
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    if args.quick:
        vars(args).update(quick)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return args


def machine_line(threads: int | None) -> str:
    """The CPU and its class, and the thread count, for a results table's header."""
    from lighten.provenance import machine

    m = machine()
    return f"{m.get('cpu', '')} ({m.get('cpu_class', '')}), threads {threads or 'all'}"


__all__ = ["B1_FACTOR", "bench_parser", "machine_line", "ms_cell", "overlap", "parse_bench_args",
           "ratio_cell", "spread_note", "time_rows"]
