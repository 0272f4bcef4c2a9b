"""Timing shared by the benchmarks (each a script: `python benchmarks/<name>.py`)."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_of(function: Callable[[], object], repeats: int = 3) -> float:
    """Fewest seconds of `repeats` calls: on a shared machine others' load only ever adds
    time, so the best is the least disturbed."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best
