"""Timing and machine facts for the benchmarks: median latency per query, recall, bandwidth, CPU.

Timing rule (every benchmark): a few warm-up calls, then the median over distinct query
batches of ``perf_counter`` wall time; ms per query = per-call time / batch size.
"""

from __future__ import annotations

import platform
import resource
import time
from typing import Callable

import numpy as np

__all__ = ["time_search", "recall_at", "peak_rss_bytes", "current_rss_bytes", "cpu_model", "measure_bandwidth"]


def time_search(fn: Callable[[np.ndarray], object], xq: np.ndarray, batch: int, *, budget_s: float = 2.0,
                max_calls: int = 300, warmup: int = 3) -> float:
    """Median ms per query of ``fn(xq[i:i+batch])`` over distinct query batches.

    Args:
        fn: one search call on a ``[batch, D]`` block of queries.
        xq: ``[Q, D]`` float32 queries, ``Q >= batch``.
        budget_s: rough wall-time budget; the number of calls is estimated from one call.
    """
    if not 1 <= batch <= len(xq):
        raise ValueError(f"batch {batch} needs at least that many queries; got {len(xq)} (raise --queries)")
    nb = len(xq) // batch
    for i in range(warmup):
        j = i % nb
        fn(xq[j * batch:(j + 1) * batch])
    t = time.perf_counter()
    fn(xq[:batch])
    est = max(time.perf_counter() - t, 1e-6)
    calls = int(min(max_calls, nb, max(3, budget_s / est)))
    times = []
    for i in range(calls):
        x = xq[i * batch:(i + 1) * batch]
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3 / batch


def recall_at(ids: np.ndarray, gt1: np.ndarray) -> float:
    """Share of rows whose exact top-1 ``gt1`` ``[Q]`` is in ``ids`` ``[Q, K]``."""
    return float((ids == gt1[:, None]).any(axis=1).mean())


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux ru_maxrss is KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def current_rss_bytes() -> int:
    """Resident set size of this process now (``/proc/self/statm``; 0 where it does not exist)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_bandwidth(gib: float = 1.0, repeats: int = 3) -> dict[str, float]:
    """Streaming read bandwidth in bytes/s: best of numpy sum (1 thread) and BLAS sgemv (all threads)
    over a ``gib`` GiB float32 array."""
    n = int(gib * 2**30 / 4)
    a = np.ones(n, dtype=np.float32)
    best_sum = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        a.sum()
        best_sum = max(best_sum, a.nbytes / (time.perf_counter() - t))
    m = a.reshape(-1, 1024)
    v = np.ones(1024, dtype=np.float32)
    best_gemv = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        m @ v
        best_gemv = max(best_gemv, a.nbytes / (time.perf_counter() - t))
    del a, m
    return {"numpy_sum_Bps": best_sum, "sgemv_Bps": best_gemv, "best_Bps": max(best_sum, best_gemv)}
