"""Wall-clock latency: median of timed runs after warm-up.

The median, not the mean: a shared machine has outliers (another process, a page fault) that
say nothing about the model.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from lighten.errors import BackendError


def median_latency_ms(fn: Callable[[], object], *, warmup: int = 10, runs: int = 50) -> float:
    """Call ``fn`` ``warmup`` times untimed, then ``runs`` times; median milliseconds per call."""
    if runs < 1 or warmup < 0:
        raise BackendError(f"latency needs runs >= 1 and warmup >= 0, got runs={runs}, "
                           f"warmup={warmup}; raise deploy.latency_runs")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3
