"""Why the empirical-NTK regression of the sphere study is unstable in d = 2 with a rough target (docs/sphere.md).

    python experiments/sphere_entk_circle.py          # d = 2, nu_t = 0.5, the study's 4 draws, n = 64, 128, 256

The study's net f(u) = W_1 sigma(W_0 u + B_0) / sqrt(h) + B_1 starts with B_0 = 0, so unit j is active on the
half circle W_0j . u > 0.  Between two neighbouring kink angles (an activation cell: the points with the same
pattern of active units) every gradient feature is c_A + a_A cos theta + b_A sin theta: the eNTK restricted to
one cell has rank 3.  A cell holding 3 training points gives a nearly singular 3 x 3 block (points ~1e-3 apart:
eigenvalue ~ spacing^4 relative), a cell holding 4 or more an exactly singular one.  The minimum-norm
interpolant then needs huge weights to bend a + b cos + c sin through the rough target's values inside the
cell, and those weights act at test points in the other cells.

Per draw and n: the number of cells and the largest cell, the eNTK eigenvalues below 1e-10 lambda_max and the
share of |y|^2 on them, and the test error / C(1) of the eNTK regression at ridge 1e-10 (the study's) .. 1e-4
(relative to mean diag K) with its training residual; Theta_inf's test error beside it; d = 5 for comparison.
Output: <out>/sphere_entk_circle.json and .md.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Dict

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))      # _common, also when loaded by path
from _common import save_table, study_draw  # noqa: E402
from ntk_fast.ntk.empirical import empirical_ntk  # noqa: E402
from ntk_fast.sphere.predictors import entk_regression, make_net, ntk_inf_regression, to_net_inputs  # noqa: E402

RIDGES = (1e-10, 1e-8, 1e-6, 1e-4)


def cells(net, u: torch.Tensor) -> Dict[str, int]:
    """Activation cells of the hidden layer at the points u: their number and the largest one's size."""
    z = to_net_inputs(u) / math.sqrt(u.shape[1]) @ net.weights[0].detach().T + net.bias_scale * net.biases[0].detach()
    count: Dict[bytes, int] = {}
    for row in (z > 0).numpy():
        count[row.tobytes()] = count.get(row.tobytes(), 0) + 1
    return {"cells": len(count), "largest": max(count.values())}


def one(d: int, nu: float, draw: int, n: int, h: int, m: int, n_max: int) -> dict:
    u, fs = study_draw(d, nu, draw, n_max + m)                        # the study's draw (seed 0)
    y, var = fs.values[0], fs.variance
    ut, yt = u[n_max:], y[n_max:]
    net = make_net(d, h, draw)
    K = empirical_ntk(net, to_net_inputs(u[:n]))
    e, V = torch.linalg.eigh(K)
    small = e < 1e-10 * e[-1]
    yn = y[:n]
    rec = {"d": d, "nu_t": nu, "draw": draw, "n": n, **cells(net, u[:n]),
           "eig_min_over_max": float(e[0] / e[-1]), "n_eig_below_1e-10": int(small.sum()),
           "y_share_below_1e-10": float(((V[:, small].T @ yn) ** 2).sum() / (yn @ yn)),
           "ntk_inf_test": float(((ntk_inf_regression(u[:n], yn, ut) - yt) ** 2).mean()) / var, "entk": {}}
    for r in RIDGES:
        o = entk_regression(net, u[:n], yn, ut, ridge_rel=r)
        rec["entk"][f"{r:g}"] = {"test": float(((o["pred"] - yt) ** 2).mean()) / var, "residual": o["residual"]}
    return rec


def table(rows) -> str:
    head = ("| d | draw | n | cells | largest cell | eig < 1e-10 max | share of y^2 there | Theta_inf test | "
            + " | ".join(f"eNTK test (residual), ridge {r:g}" for r in RIDGES) + " |")
    lines = [head, "|" + "---|" * (8 + len(RIDGES))]
    for r in rows:
        ent = " | ".join(f"{r['entk'][f'{x:g}']['test']:.3g} ({r['entk'][f'{x:g}']['residual']:.1e})" for x in RIDGES)
        lines.append(f"| {r['d']} | {r['draw']} | {r['n']} | {r['cells']} | {r['largest']} | {r['n_eig_below_1e-10']} | "
                     f"{r['y_share_below_1e-10']:.2g} | {r['ntk_inf_test']:.3g} | {ent} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--draws", type=int, default=4)
    p.add_argument("--ns", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--h", type=int, default=512)
    p.add_argument("--out", default=os.path.join(ROOT, "experiments", "results"))
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    rows = [one(d, nu, draw, n, a.h, 512, 1024) for d, nu in ((2, 0.5), (5, 1.0))
            for draw in range(a.draws) for n in a.ns]
    out = {"machine": "2-core AMD EPYC VM, no GPU (shared)", "load": os.getloadavg(), "h": a.h,
           "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    save_table(a.out, "sphere_entk_circle", out, table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
