"""Shared helpers of the experiment scripts: options, a sweep over (h, alpha*sqrt(h)), result tables, plotting.

Every script runs its grid with ntk_fast.runs.sweep (run folders under --out/runs: finished runs are skipped
when a script is run again, interrupted ones resume), then writes <name>.json with the numbers (into
--results-dir, default --out) and <name>.png with the plot (into --figures-dir, default --out).  The published
numbers live in experiments/results/ and the figures in docs/:
``--results-dir experiments/results --figures-dir docs`` (p = 1000: experiments/results/p1000, docs/p1000).  --paper switches to the paper's scale (Fashion-MNIST, p = 10000, h up to 1000,
10 seeds: GPU hours); the default is a reduced scale that runs on a CPU in minutes.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import numpy as np  # noqa: E402

from ntk_fast.data import DTYPES  # noqa: E402
from ntk_fast.runs.experiment import RunConfig, write_json  # noqa: E402
from ntk_fast.runs.sweep import grid_configs, run_sweep  # noqa: E402


def base_parser(description: str, out: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--paper", action="store_true", help="the paper's scale (Fashion-MNIST p=10000; GPU hours)")
    p.add_argument("--dataset", default="fashion", help="dataset (default fashion; digits for a smoke test)")
    p.add_argument("--data", default=None, help="dataset folder (see ntk_fast.data)")
    p.add_argument("--p", type=int, default=None, help="training points")
    p.add_argument("--p-test", type=int, default=None, help="test points")
    p.add_argument("--L", type=int, default=3, help="hidden layers (default 3)")
    p.add_argument("--hs", type=int, nargs="+", default=None, help="widths")
    p.add_argument("--alphas-sqrt-h", type=float, nargs="+", default=None, help="alpha*sqrt(h) values")
    p.add_argument("--ensemble", type=int, default=None, help="nets per grid point (seeds 0..K-1)")
    p.add_argument("--dtype", default="float64", choices=sorted(DTYPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-wall", type=float, default=None, help="seconds per run")
    p.add_argument("--jobs", type=int, default=2, help="runs at once, one torch thread each when jobs = cpus (default 2)")
    p.add_argument("--out", default=out, help=f"output folder: run folders, and results unless told (default {out})")
    p.add_argument("--results-dir", default=None, help="folder of <name>.json (default --out)")
    p.add_argument("--figures-dir", default=None, help="folder of <name>.png (default --out)")
    p.add_argument("--no-progress", action="store_true")
    return p


def alpha_grid(args) -> Tuple[List[int], List[float]]:
    """Fill the scale defaults of the alpha*sqrt(h) scans (reduced CPU scale, or the paper's with --paper) and
    return (hs, alphas_sqrt_h).  Shared by phase_diagram.py and kernel_change.py, which reuse each other's runs."""
    paper = args.paper
    args.p = args.p or (10000 if paper else 500)
    args.p_test = args.p_test or (50000 if paper else 2000)
    args.ensemble = args.ensemble or (10 if paper else 3)
    hs = args.hs or ([100, 300, 1000] if paper else [32, 128])
    a_list = args.alphas_sqrt_h or ([10.0 ** k for k in range(-4, 8)] if paper else [0.1, 1.0, 10.0, 100.0, 1e3, 1e4])
    return hs, a_list


def configs(args, hs: Sequence[int], alphas_sqrt_h: Sequence[float], **flags) -> List:
    """(name, RunConfig) over h x alpha*sqrt(h), one ensemble of args.ensemble nets per point (seed 0)."""
    def make(h, alpha, seed, **kw):
        return RunConfig(dataset=args.dataset, data_root=args.data, p=args.p, p_test=args.p_test, h=h, L=args.L,
                         alpha=alpha, seed=seed, ensemble=args.ensemble, dtype=args.dtype, device=args.device,
                         max_wall=args.max_wall if args.max_wall else math.inf, **kw)
    return grid_configs(make, hs=hs, seeds=[0], alphas_sqrt_h=alphas_sqrt_h, **flags)


def run_grid(args, cfgs, sub: str = "runs") -> List[Dict]:
    folder = os.path.join(args.out, sub)
    run_sweep(cfgs, folder, jobs=args.jobs, progress=not args.no_progress)
    from ntk_fast.runs.sweep import collect_results
    return collect_results(cfgs, folder)


def fit_loglog(x: Sequence[float], y: Sequence[float]) -> Optional[Dict[str, float]]:
    """Least-squares line log10 y = slope log10 x + intercept over the finite positive pairs."""
    pts = [(a, b) for a, b in zip(x, y) if a and b and a > 0 and b > 0 and math.isfinite(a) and math.isfinite(b)]
    if len(pts) < 2:
        return None
    lx, ly = np.log10([a for a, _ in pts]), np.log10([b for _, b in pts])
    slope, intercept = np.polyfit(lx, ly, 1)
    return {"slope": float(slope), "intercept": float(intercept), "points": len(pts)}


def save(args, name: str, payload: Dict, fig) -> None:
    """<results-dir>/<name>.json (the numbers) and <figures-dir>/<name>.png (the plot); both default to --out."""
    jdir, fdir = args.results_dir or args.out, args.figures_dir or args.out
    for folder in (jdir, fdir):
        os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(jdir, name + ".json"), payload)
    fig.tight_layout()
    fig.savefig(os.path.join(fdir, name + ".png"), dpi=110)
    print(f"wrote {os.path.join(jdir, name + '.json')} and {os.path.join(fdir, name + '.png')}")


def save_table(folder: str, name: str, payload: Dict, table: str) -> None:
    """<folder>/<name>.json (the numbers) and <folder>/<name>.md (their table), for scripts without a plot."""
    os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(folder, name + ".json"), payload)
    with open(os.path.join(folder, name + ".md"), "w") as fh:
        fh.write(table)


def study_draw(d: int, nu_t: float, draw: int, points: int, seed: int = 0, k_cap: int = 2048):
    """The sphere study's draw (experiments/sphere_learning_curves.py): ``points`` uniform points on S^{d-1} and
    one exact field draw of smoothness nu_t on them, from the generator seeded seed + 1000 d + draw.
    Returns (u (points, d), ntk_fast.sphere.FieldSample)."""
    import torch
    from ntk_fast.sphere import sample_field, sample_sphere
    g = torch.Generator().manual_seed(seed + 1000 * d + draw)
    u = sample_sphere(points, d, g)
    return u, sample_field(u, nu_t, 1, g, k_cap=k_cap)


def scale_label(args) -> str:
    return (f"{args.dataset}, p={args.p}, L={args.L}, softplus beta=5, soft hinge, "
            f"{args.ensemble} seed{'s' if args.ensemble > 1 else ''}")
