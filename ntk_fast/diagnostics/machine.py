"""The machine: a description for result files, and the torch.mm rate that speed figures are compared with.

Used by ``python -m ntk_fast gram`` (its summary reports the fraction of torch.mm's rate reached) and by the
benchmarks under bench/.  ``matmul_rate(n=2048, repeats=5)`` costs seven n x n products (14 n^3 flops).
"""
from __future__ import annotations

import os
import platform
import time
from typing import Callable, List

import torch


def machine_info() -> dict:
    """Platform, processor, CPU count, torch version and threads, and the first CUDA device's name (or None)."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def sync(device: torch.device | str | None = None) -> None:
    """Wait for the CUDA device (all of them when device is None) when CUDA is present; no-op otherwise."""
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], repeats: int = 3, warmup: int = 1, device=None) -> List[float]:
    """Wall times (s) of ``repeats`` calls of fn after ``warmup`` calls (device synchronised)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def matmul_rate(dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 5, device="cpu") -> float:
    """Measured torch.mm rate in flop/s on square n x n matrices (median of repeats, after a warm-up)."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    ts = sorted(time_call(lambda: a @ b, repeats=repeats, warmup=2, device=device))
    return 2.0 * n ** 3 / ts[len(ts) // 2]
