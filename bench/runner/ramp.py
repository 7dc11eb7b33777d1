"""Timing, peak-memory and size-ramp helpers of the benchmark runner, shared with its subprocess workers.

Pure Python (no torch, no numpy): the workers import it as a top-level module from this folder, in
environments that have neither ntk_fast nor torch (neural-tangents' venv).
"""
from __future__ import annotations

import ctypes
import gc
import time
from typing import Callable, List, Optional, Sequence, Tuple


def fix_malloc() -> None:
    """Make glibc return large freed blocks to the OS (fixed 1 MiB mmap threshold).

    glibc raises its mmap threshold after large frees, after which freed tensors stay in the heap and the
    RSS before a call already holds the warm-up's memory: peak-minus-base would then undercount.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)     # M_MMAP_THRESHOLD (a fixed value also disables the dynamic adjustment)
        libc.mallopt(-1, 1 << 20)     # M_TRIM_THRESHOLD
    except Exception:
        pass


def rss_bytes(key: str = "VmRSS:") -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return -1


def reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux); False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def timed_with_peak(fn: Callable[[], object], warmup: int, repeats: int):
    """(times, peak_extra_bytes, last result): wall times of ``repeats`` calls after ``warmup`` calls, and the
    peak RSS during the first timed call above the RSS before it (-1 when unknown)."""
    res = None
    for _ in range(warmup):
        res = fn()
        res = None
    gc.collect()
    base = rss_bytes()
    ok = reset_peak()
    times: List[float] = []
    peak = -1
    for i in range(max(1, repeats)):
        res = None
        t0 = time.perf_counter()
        res = fn()
        times.append(time.perf_counter() - t0)
        if i == 0:
            peak = rss_bytes("VmHWM:") - base if ok and base >= 0 else -1
    return times, peak, res


def ramp_sizes(n: int, start: int, cap: Optional[int] = None) -> List[int]:
    """n / 2^k for k = K .. 0 (ascending), the smallest >= start (or n itself when n < start); sizes above
    ``cap`` are dropped."""
    sizes, m = [], n
    while m >= start:
        sizes.insert(0, m)
        m //= 2
    if not sizes:
        sizes = [n]
    if cap is not None:
        sizes = [m for m in sizes if m <= cap] or [sizes[0]]
    return sizes


def ramp_measure(make: Callable[[int], Callable[[], object]], sizes: Sequence[int], flops: Sequence[float],
                 fits: Sequence[bool], budget: float, warmup: int, repeats: int, log=None):
    """Measure at the largest size of ``sizes`` whose time per call stays within ``budget`` seconds.

    Starting at sizes[0], one call per size (two when cheap, keeping the faster: the first call at a shape
    may include compilation or allocation), moving to the next size while the prediction
    t(next) = t(cur) * flops(next) / flops(cur) fits the budget and ``fits[next]`` (memory) holds.
    Then ``warmup`` + ``repeats`` calls at the chosen size.
    Returns (m, times, peak_bytes, result, reason, trace) with reason "" when m == sizes[-1].
    """
    trace: List[Tuple[int, float]] = []

    def once(m):
        fn = make(m)
        t0 = time.perf_counter()
        fn()
        t = time.perf_counter() - t0
        if t < max(0.5, budget / 20):
            t0 = time.perf_counter()
            fn()
            t = min(t, time.perf_counter() - t0)
        return t

    i = 0
    reason = ""
    if len(sizes) > 1:
        t = once(sizes[0])
        trace.append((sizes[0], t))
        while i + 1 < len(sizes):
            pred = t * flops[i + 1] / flops[i]
            if not fits[i + 1]:
                reason = f"memory model over the limit at n={sizes[i + 1]}"
                break
            if pred > budget:
                reason = f"predicted {pred:.0f} s/call at n={sizes[i + 1]} > {budget:.0f} s"
                break
            i += 1
            if i == len(sizes) - 1:
                break
            t = once(sizes[i])
            trace.append((sizes[i], t))
            if log:
                log(f"    ramp n={sizes[i]}: {t:.3g} s")
    m = sizes[i]
    fn = make(m)
    gc.collect()
    times, peak, res = timed_with_peak(fn, warmup, repeats)
    return m, times, peak, res, reason, trace
