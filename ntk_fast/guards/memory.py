"""Memory guard: estimate what a call will allocate and refuse early, with the number and the way out.

    available (host) = min(MemAvailable of /proc/meminfo, cgroup limit - cgroup usage)
                       (cgroup v2 memory.max / memory.current, or v1 memory.limit_in_bytes / usage_in_bytes;
                       without /proc/meminfo: os.sysconf available pages x page size)
    available (CUDA) = free device memory (torch.cuda.mem_get_info) + memory cached by torch's allocator
                       but not in use (memory_reserved - memory_allocated)

The environment variable ``NTK_FAST_MEMORY_LIMIT`` ("3G", "512M", "1.5T", a plain number of bytes, or "off")
replaces the detected value on every device: tests use it to simulate a small machine, users to keep a
margin for other processes ("off" disables the guard).
"""
from __future__ import annotations

import math
import os
from typing import Optional, Union

import torch

__all__ = ["MemoryBudgetError", "available_bytes", "require_memory", "fmt_bytes", "parse_bytes", "ENV"]

ENV = "NTK_FAST_MEMORY_LIMIT"
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class MemoryBudgetError(MemoryError):
    """A call would need more memory than is available; the message gives both numbers and the way out."""


def parse_bytes(text: str) -> float:
    """"3G" -> 3 * 2^30, "512M", "1.5T", "123" (bytes), "off"/"inf" -> inf.  ValueError otherwise."""
    s = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    if s in ("OFF", "INF", "NONE"):
        return math.inf
    unit = s[-1:] if s[-1:] in _UNITS else ""
    try:
        value = float(s[:len(s) - len(unit)])
    except ValueError:
        raise ValueError(f"{ENV}: cannot read {text!r} as a size (examples: 3G, 512M, 1.5T, off)") from None
    if not value >= 0:
        raise ValueError(f"{ENV}: a size must be >= 0, got {text!r}")
    return value * _UNITS[unit]


def fmt_bytes(n: float) -> str:
    """Bytes in binary units with three significant digits: 1.5 GiB, 14.6 TiB."""
    if not math.isfinite(n):
        return "unlimited"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024.0
    return f"{n:.3g} PiB"  # pragma: no cover


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path) as fh:
            text = fh.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None      # "max" (no limit) -> None


def _cgroup_free() -> Optional[int]:
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        lim = _read_int(limit)
        if lim is not None and lim < (1 << 60):       # v1 writes a huge number for "no limit"
            return max(0, lim - (_read_int(usage) or 0))
    return None


def _host_available() -> float:
    avail = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return math.inf                            # cannot tell: do not block
    cg = _cgroup_free()
    return float(avail if cg is None else min(avail, cg))


def available_bytes(device: Union[str, torch.device, None] = None) -> float:
    """Bytes that can still be allocated on ``device`` (None / "cpu": host memory); inf when unknown."""
    override = os.environ.get(ENV)
    if override:
        return parse_bytes(override)
    dev = torch.device("cpu" if device is None else device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        cached = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
        return float(free + max(0, cached))
    if dev.type == "meta":
        return math.inf
    return _host_available()


def require_memory(need_bytes: float, what: str, device: Union[str, torch.device, None] = None,
                   way_out: str = "") -> None:
    """Raise MemoryBudgetError when ``need_bytes`` exceed :func:`available_bytes` of ``device``.

    ``what`` says what the bytes are for ("empirical_ntk: the (n, n) result ..."), ``way_out`` what to do
    instead; both go into the message with the two numbers.
    """
    avail = available_bytes(device)
    if need_bytes <= avail:
        return
    dev = "host" if device is None or torch.device(device).type == "cpu" else str(device)
    msg = (f"{what} needs about {fmt_bytes(need_bytes)} but only {fmt_bytes(avail)} is available on {dev}"
           f"{' (' + ENV + ')' if os.environ.get(ENV) else ''}.")
    if way_out:
        msg += f" {way_out}"
    raise MemoryBudgetError(msg)
