"""The benchmark's Markdown report: one table per case, the machine, the torch.mm rate and the legend."""
from __future__ import annotations

from typing import Dict, List

from .machine import busy_warning
from .methods import LABELS


def _fmt_s(row: dict) -> str:
    if row["seconds"] is None:
        return "—"
    s = row["seconds"]
    txt = f"{s:.3g}" if s < 1000 else f"{s:.0f}"
    return f"~{txt} (extrap.)" if row["status"] == "extrapolated" else txt


def _fmt_err(e) -> str:
    return "—" if e is None else f"{e:.1e}"


def _fmt_mem(b) -> str:
    if b is None or b < 0:
        return "—"
    return f"{b / 2**20:.0f} MiB"


def case_table(case: dict, rates: Dict[str, float]) -> List[str]:
    """Markdown lines of one case: a row per method, times relative to the fastest."""
    lines = [f"n={case['n']}, d={case['d']}, h={case['h']}, L={case['L']}, {case['dtype']}, x2 = x1 "
             f"(P = {case['P']:,} weights; torch.mm {rates[case['dtype']] / 1e9:.0f} GFLOP/s in this run)", "",
             "| method | time s | measured at n | counted GFLOP | GFLOP/s | % of torch.mm | peak extra memory "
             "| max rel err vs float64 | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    best = min((r["seconds"] for r in case["rows"] if r["seconds"] is not None), default=None)
    for r in case["rows"]:
        label = LABELS.get(r["method"], r["method"])
        if r["seconds"] is None:
            lines.append(f"| {label} | {r['status']} | | | | | | | {r['note']} |")
            continue
        rel = f" ({r['seconds'] / best:.1f}x)" if best and r["seconds"] > best * 1.0001 else ""
        lines.append(
            f"| {label} | {_fmt_s(r)}{rel} | {r['measured_n']} | {r['flops'] / 1e9:.4g} | {r['gflops']:.1f} | "
            f"{r['pct_matmul']:.0f}% | {_fmt_mem(r['peak_bytes'])} | "
            f"{_fmt_err(r['max_rel_err'])} | {r['note']} |")
    return lines


LEGEND = ("Time: median of the timed calls after warm-up; `~x (extrap.)`: measured at the smaller n shown and "
          "scaled by the method's flop model; `(k.kx)`: times the fastest. Counted GFLOP: the method's own "
          "flop model at n (docs/benchmarks.md); GFLOP/s and % of torch.mm are at the measured n. Peak extra "
          "memory: peak RSS above the RSS before the call (process-wide; the subprocess's own for peers). "
          "Max rel err: max|K - K64| / max|K64| against ntk_fast's float64 Gram of the same net and points "
          "(a kernel of another network or parameterisation would show an O(1) error).")


def markdown(result: dict) -> str:
    """The whole report of a run (the dict written as JSON)."""
    cfg, mach, rates = result["config"], result["machine"], result["matmul_gflops"]
    rates_flops = {k: v * 1e9 for k, v in rates.items()}
    warning = busy_warning(mach)
    lines = [f"# Empirical NTK Gram, side by side ({result['date']})", "",
             f"Machine: {mach.get('cpu_model', mach.get('processor'))}, {mach.get('cpus')} cores, "
             f"torch {mach.get('torch')}, {mach.get('threads')} threads"
             + (f", load average at start {mach['load_average'][0]:.2f}" if mach.get("load_average") else "")
             + f". Command: `{result['command']}`.", "",
             *([warning, ""] if warning else []),
             f"torch.mm rate measured in this run ({cfg['dtype']}, square {cfg['matmul_n']}): "
             + ", ".join(f"{v:.0f}" for v in result["matmul_gflops_samples"]) + " GFLOP/s (the largest is used).",
             ""]
    for case in result["cases"]:
        lines += case_table(case, rates_flops) + [""]
    vers = {}
    for case in result["cases"]:
        vers.update(case.get("versions", {}))
    lines += ["Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(vers.items())) + ".", "", LEGEND]
    return "\n".join(lines) + "\n"
