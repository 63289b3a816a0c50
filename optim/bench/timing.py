"""Wall times of repeated calls, after one untimed warm-up call (what every bench measurement starts from)."""

from __future__ import annotations

import time


def timed_runs(fn, repeats: int) -> list[float]:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times
