"""Log-log plots of a benchmark result: time vs n (one panel per h) and time vs h (one panel per n).

Imports only the standard library and matplotlib, so that another Python (the peers venv) can draw the plot
when this one has no matplotlib:  ``PYTHON plot.py RESULT.json OUT.png``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Optional


def plot_results(result: dict, path: str) -> Optional[str]:
    """Write the plot to ``path`` (hollow markers: extrapolated); another Python draws it when matplotlib is
    missing here; returns the path, or None when no plot could be drawn."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return _plot_elsewhere(result, path)
    cases = result["cases"]
    hs = sorted({c["h"] for c in cases})
    ns = sorted({c["n"] for c in cases})
    panels = ([("n", h) for h in hs] if len(ns) > 1 else []) + ([("h", n) for n in ns] if len(hs) > 1 else [])
    if not panels:
        panels = [("n", hs[0])]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    order = [m.strip() for m in str(result["config"].get("methods", "")).split(",") if m.strip()]
    seen = [r["method"] for c in cases for r in c["rows"]]
    methods = [m for m in order if m in seen] + [m for m in dict.fromkeys(seen) if m not in order]
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    for ax, (axis, fixed) in zip(axes[0], panels):
        sel = sorted((c for c in cases if (c["h"] == fixed if axis == "n" else c["n"] == fixed)),
                     key=lambda c: c[axis])
        for m in methods:
            pts = [(c[axis], r["seconds"], r["status"]) for c in sel for r in c["rows"]
                   if r["method"] == m and r["seconds"] is not None]
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color=colors[m], label=m, lw=1.2)
            for xv, yv, st in pts:
                ax.plot([xv], [yv], "o", color=colors[m], mfc="none" if st == "extrapolated" else colors[m])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(axis)
        ax.set_ylabel("seconds")
        ax.set_title(f"time vs {axis} ({'h' if axis == 'n' else 'n'}={fixed}, {result['config']['dtype']})")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"empirical NTK Gram, d={result['config']['d']}, L={result['config']['L']}; "
                 f"hollow = extrapolated; {result['machine'].get('cpu_model', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_elsewhere(result: dict, path: str) -> Optional[str]:
    """No matplotlib here: run this file with the peers venv's Python if it has matplotlib."""
    py = result["config"].get("peers_python")
    if not py or not os.path.exists(py) or os.environ.get("NTK_FAST_PLOT_CHILD"):
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(result, f, default=str)
        jpath = f.name
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env["NTK_FAST_PLOT_CHILD"] = "1"          # the child must not look for yet another Python
    r = subprocess.run([py, os.path.abspath(__file__), jpath, path], capture_output=True, text=True, env=env)
    os.remove(jpath)
    return path if r.returncode == 0 and os.path.exists(path) else None


if __name__ == "__main__":
    with open(sys.argv[1]) as fh:
        sys.exit(0 if plot_results(json.load(fh), sys.argv[2]) else 1)
