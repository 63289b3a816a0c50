"""Wall times of repeated calls, after one untimed warm-up call (what every bench measurement starts from)."""

from __future__ import annotations

import statistics
import time


def timed_runs(fn, repeats: int) -> list[float]:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median_seconds(fn, repeats: int) -> float:
    """The median of `timed_runs` (the figure the per-layer tables report)."""
    return statistics.median(timed_runs(fn, repeats))
