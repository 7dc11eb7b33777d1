"""Finite width against the h -> infinity limit at initialisation, for the paper's net on Fashion-MNIST.

    python experiments/limit_kernels.py                      # n = 200 + 100 test, h = 64 .. 2048, 4 seeds (~minutes)
    python experiments/limit_kernels.py --paper              # n = 1000 + 1000, h up to 8192, 8 seeds

For each width h and seed: the empirical NTK Theta_h of FCNet(d=784, h, L=3, softplus beta=5) at initialisation
(ntk_fast.empirical_ntk) and the limit Theta_inf (ntk_fast.limit_kernels, tabulated: inputs on the sphere):
  * |Theta_h - Theta_inf|_F / |Theta_inf|_F over train + test points;
  * the test outputs of kernel regression (ridgeless, on the parity labels) with Theta_h against those with
    Theta_inf: |f_h - f_inf| / |f_inf|  (the predictor a lazy-regime net trained to zero loss follows,
    up to the net's output at initialisation).
Both should fall like h^{-1/2}; the fitted slopes are printed.  Plot: docs/limit_convergence.png; numbers: experiments/results/limit_convergence.json.
Data: Fashion-MNIST through ntk_fast.data.load_dataset; when it cannot be found, the bundled "digits"
(d = 64), and failing that Gaussian points on the sphere.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import ntk_fast  # noqa: E402
from ntk_fast import data as ntk_data  # noqa: E402


def load(n, n_test):
    for name in ("fashion", "digits"):
        try:
            x, y, xt, yt = ntk_data.load_dataset(name, p=n, p_test=n_test)
            return name, x, y, xt, yt
        except Exception as exc:  # noqa: BLE001 - any failure to find the data: try the next source
            print(f"{name}: not available ({exc})", file=sys.stderr)
    g = torch.Generator().manual_seed(0)
    d = 100
    x = torch.randn(n + n_test, d, dtype=torch.float64, generator=g)
    x = x / x.norm(dim=1, keepdim=True) * math.sqrt(d)
    y = torch.sign(x[:, 0] + 0.3 * x[:, 1] * x[:, 2])
    return "gaussian-sphere", x[:n], y[:n], x[n:], y[n:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--widths", default="64,128,256,512,1024,2048")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--L", type=int, default=3)
    ap.add_argument("--paper", action="store_true", help="n = 1000 + 1000, widths to 8192, 8 seeds")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "limit_convergence.png"), help="the figure")
    ap.add_argument("--results", default=os.path.join(ROOT, "experiments", "results", "limit_convergence.json"),
                    help="the numbers (JSON)")
    a = ap.parse_args()
    if a.paper:
        a.n, a.n_test, a.widths, a.seeds = 1000, 1000, "128,256,512,1024,2048,4096,8192", 8
    widths = [int(w) for w in a.widths.split(",")]
    name, x, y, xt, yt = load(a.n, a.n_test)
    X = torch.cat([x, xt])
    n, d = x.shape
    _, T_inf = ntk_fast.limit_kernels(X, L=a.L, activation="softplus")
    f_inf = ntk_fast.kernel_regression(T_inf[:n, :n], y, K_test=T_inf[n:, :n]).F_test
    rows = []
    for h in widths:
        ek, ef = [], []
        for s in range(a.seeds):
            net = ntk_fast.FCNet(d, h, a.L, dtype=torch.float64, generator=torch.Generator().manual_seed(1000 + s))
            T = ntk_fast.empirical_ntk(net, X)
            ek.append(float((T - T_inf).norm() / T_inf.norm()))
            f = ntk_fast.kernel_regression(T[:n, :n], y, K_test=T[n:, :n]).F_test
            ef.append(float((f - f_inf).norm() / f_inf.norm()))
        rows.append({"h": h, "kernel_rel": float(np.mean(ek)), "kernel_rel_std": float(np.std(ek)),
                     "output_rel": float(np.mean(ef)), "output_rel_std": float(np.std(ef))})
        print(rows[-1], flush=True)
    hs = np.array(widths, dtype=float)
    slope_k = float(np.polyfit(np.log(hs), np.log([r["kernel_rel"] for r in rows]), 1)[0])
    slope_f = float(np.polyfit(np.log(hs), np.log([r["output_rel"] for r in rows]), 1)[0])
    print(f"fitted slopes: kernel {slope_k:.3f}, kernel-regression outputs {slope_f:.3f} (theory -0.5)")
    info = {"data": name, "n": n, "n_test": xt.shape[0], "d": d, "L": a.L, "activation": "softplus beta=5",
            "seeds": a.seeds, "rows": rows, "slope_kernel": slope_k, "slope_outputs": slope_f}
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for key, lab in (("kernel_rel", r"$|\Theta_h-\Theta_\infty|_F/|\Theta_\infty|_F$"),
                     ("output_rel", r"kernel regression test outputs $|f_h-f_\infty|/|f_\infty|$")):
        ax.errorbar(hs, [r[key] for r in rows], yerr=[r[key + "_std"] for r in rows], marker="o", capsize=3,
                    label=lab)
    ref = rows[0]["kernel_rel"] * np.sqrt(hs[0] / hs)
    ax.plot(hs, ref, "k--", lw=1, label=r"$\propto h^{-1/2}$")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("width h")
    ax.set_title(f"FCNet L={a.L}, softplus, {name} n={n}+{xt.shape[0]}, {a.seeds} seeds", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    fig.savefig(a.out, dpi=120)
    os.makedirs(os.path.dirname(os.path.abspath(a.results)), exist_ok=True)
    with open(a.results, "w") as f:
        json.dump(info, f, indent=1)
    print("wrote", a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
