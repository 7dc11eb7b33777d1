"""The machine a benchmark ran on: its CPU model, load and a short name for result files."""
from __future__ import annotations

import os
import platform
import re

from ntk_fast.diagnostics.machine import machine_info


def cpu_model() -> str:
    """The 'model name' line of /proc/cpuinfo ('' when unreadable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def machine_slug() -> str:
    """A file-name prefix such as 'amd-epyc-2c' from the CPU model and core count."""
    name = cpu_model() or platform.processor() or platform.machine()
    name = re.sub(r"\((r|tm)\)|cpu|processor|\d+-core", "", name.lower())
    slug = re.sub(r"[^a-z0-9]+", "-", name).strip("-")[:32].strip("-")
    return f"{slug}-{os.cpu_count()}c" if slug else f"cpu-{os.cpu_count()}c"


def machine_dict() -> dict:
    """ntk_fast's machine_info plus the CPU model and the load average at the start."""
    info = machine_info()
    if cpu_model():
        info["cpu_model"] = cpu_model()
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    return info


def busy_warning(mach: dict) -> str:
    """A warning when the machine was busy at the start (load average over half the cores)."""
    la, cpus = mach.get("load_average"), mach.get("cpus") or 1
    if not la or la[0] <= 0.5 * cpus:
        return ""
    return (f"**Warning: the machine was busy (load average {la[0]:.1f} on {cpus} cores): these timings are not "
            "reliable.** With the cores oversubscribed, torch's OpenMP threads slow small and medium calls down "
            "by 10-60x here (2 threads vs 1), while JAX's thread pool suffers much less. Re-run on a quiet machine.")
