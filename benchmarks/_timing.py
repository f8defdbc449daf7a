"""Timing helper shared by the side-by-side comparison scripts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def interleaved_medians(
    fns: dict[str, Callable[[], Any]], repeats: int, *, warmup: bool = True
) -> dict[str, float]:
    """Median seconds of each candidate, run in turn within every repeat.

    Interleaving exposes every candidate to the same machine noise, so their ratios hold up on a shared
    machine better than their absolute times. ``warmup`` runs each once first (JIT compilation, lazy
    optimizer state, allocator and BLAS buffers, page faults).
    """
    if warmup:
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}
