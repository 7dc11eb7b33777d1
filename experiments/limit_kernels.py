"""Finite width against the h -> infinity limit at initialisation, for the paper's net on Fashion-MNIST.

    python experiments/limit_kernels.py                      # n = 200 + 100 test, h = 64 .. 2048, 4 seeds (~minutes)
    python experiments/limit_kernels.py --paper              # n = 1000 + 1000, h up to 8192, 8 seeds

For each width h and seed: the empirical NTK Theta_h of FCNet(d=784, h, L=3, softplus beta=5) at initialisation
(ntk_fast.empirical_ntk) and the limit Theta_inf (ntk_fast.limit_kernels, tabulated: inputs on the sphere):
  * |Theta_h - Theta_inf|_F / |Theta_inf|_F over train + test points;
  * the test outputs of kernel regression (ridgeless, on the parity labels) with Theta_h against those with
    Theta_inf: |f_h - f_inf| / |f_inf|  (the predictor a lazy-regime net trained to zero loss follows,
    up to the net's output at initialisation).
Both should fall like h^{-1/2}; the fitted slopes are printed.  Plot: docs/limit_convergence.png; numbers:
experiments/results/limit_convergence.json.

Lazy-regime nets against the limit (--net-widths; skipped with --no-nets): each net is trained by
ntk_fast.train (the paper's adaptive gradient flow on the soft hinge loss, stopped when every training margin
is met) at alpha sqrt(h) = --alpha-sqrt-h (default 1e4: lazy), and its test outputs F_net = alpha (f - f0) are
compared with ntk_fast.kernel_flow on the same loss and stopping rule with
  * Theta_inf:  |F_net - F_inf| / |F_inf|  (should fall like h^{-1/2}: the finite-width kernel's fluctuations),
                and the fraction of test points whose sign differs;
  * Theta_h at the net's initialisation: |F_net - F_h0| / |F_h0|  (the lazy linearisation, O(1 / (alpha sqrt h))).
Plot: docs/lazy_vs_limit.png; numbers: experiments/results/lazy_vs_limit.json.
Data: Fashion-MNIST through ntk_fast.data.load_dataset (--dataset digits for a quick run); when it cannot be
found, the bundled "digits" (d = 64), and failing that Gaussian points on the sphere.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import ntk_fast  # noqa: E402
from ntk_fast import data as ntk_data  # noqa: E402


def load(n, n_test, first="fashion"):
    for name in dict.fromkeys((first, "fashion", "digits")):
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


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="fashion", help="fashion (default) or digits (quick)")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--widths", default="64,128,256,512,1024,2048")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--L", type=int, default=3)
    ap.add_argument("--paper", action="store_true", help="n = 1000 + 1000, widths to 8192, 8 seeds")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "limit_convergence.png"), help="the figure")
    ap.add_argument("--results", default=os.path.join(ROOT, "experiments", "results", "limit_convergence.json"),
                    help="the numbers (JSON)")
    ap.add_argument("--no-kernels", action="store_true", help="skip the kernel comparison (first part)")
    ap.add_argument("--no-nets", action="store_true", help="skip the trained lazy nets (second part)")
    ap.add_argument("--net-widths", default="64,128,256,512,1024", help="widths of the trained nets")
    ap.add_argument("--net-seeds", type=int, default=2, help="trained nets per width")
    ap.add_argument("--alpha-sqrt-h", type=float, default=1e4, help="alpha sqrt(h) of the trained nets (lazy)")
    ap.add_argument("--net-out", default=os.path.join(ROOT, "docs", "lazy_vs_limit.png"), help="its figure")
    ap.add_argument("--net-results", default=os.path.join(ROOT, "experiments", "results", "lazy_vs_limit.json"),
                    help="its numbers (JSON)")
    a = ap.parse_args(argv)
    if a.paper:
        a.n, a.n_test, a.widths, a.seeds = 1000, 1000, "128,256,512,1024,2048,4096,8192", 8
        a.net_widths, a.net_seeds = "128,256,512,1024,2048,4096", 4
    return a


def slope(hs, v) -> float:
    return float(np.polyfit(np.log(np.asarray(hs, dtype=float)), np.log(v), 1)[0])


def save(info, path) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(info, f, indent=1)


def kernels_part(a, name, x, y, xt, T_inf) -> None:
    """|Theta_h - Theta_inf| and ridgeless kernel regression with Theta_h against Theta_inf (first part)."""
    widths = [int(w) for w in a.widths.split(",")]
    n, d = x.shape
    X = torch.cat([x, xt])
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
    slope_k = slope(hs, [r["kernel_rel"] for r in rows])
    slope_f = slope(hs, [r["output_rel"] for r in rows])
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
    save(info, a.results)
    print("wrote", a.out)


def rel(u: torch.Tensor, v: torch.Tensor) -> float:
    return float((u - v).norm() / v.norm())


def one_net(a, h, seed, x, y, xt, yt, F_inf) -> dict:
    """Train one lazy net; its test outputs against the kernel flows with Theta_inf and with its Theta_h(0)."""
    n, d = x.shape
    net = ntk_fast.FCNet(d, h, a.L, dtype=torch.float64, generator=torch.Generator().manual_seed(2000 + seed))
    T0 = ntk_fast.empirical_ntk(net, torch.cat([x, xt]))
    F_h0 = ntk_fast.kernel_flow(T0[:n, :n], y, K_test_train=T0[n:, :n], y_test=yt, progress=False).F_test
    t0 = time.perf_counter()
    r = ntk_fast.train(net, x, y, a.alpha_sqrt_h / math.sqrt(h), x_test=xt, y_test=yt, progress=False)
    F_net = r.F_test[0]
    fin = r.final[0]
    return {"h": h, "seed": seed, "status": fin["status"], "t": float(fin["t"]), "steps": int(fin["step"]),
            "wall": round(time.perf_counter() - t0, 2), "kernel_change": float(fin.get("kernel_change", float("nan"))),
            "gap_inf": rel(F_net, F_inf), "gap_h0": rel(F_net, F_h0), "gap_h0_inf": rel(F_h0, F_inf),
            "sign_disagree_inf": float((F_net.sign() != F_inf.sign()).double().mean()),
            "test_err_net": float((F_net * yt <= 0).double().mean())}


def nets_part(a, name, x, y, xt, yt, T_inf) -> None:
    """Lazy-regime nets trained on the paper's loss against kernel flow with Theta_inf (second part)."""
    n, d = x.shape
    kf = ntk_fast.kernel_flow(T_inf[:n, :n], y, K_test_train=T_inf[n:, :n], y_test=yt, progress=False)
    F_inf = kf.F_test
    err_inf = float((F_inf * yt <= 0).double().mean())
    widths = [int(w) for w in a.net_widths.split(",")]
    runs, rows = [], []
    for h in widths:
        per = [one_net(a, h, s, x, y, xt, yt, F_inf) for s in range(a.net_seeds)]
        runs += per
        row = {"h": h}
        for k in ("gap_inf", "gap_h0", "gap_h0_inf", "sign_disagree_inf", "test_err_net", "wall"):
            v = [p[k] for p in per]
            row[k], row[k + "_std"] = float(np.mean(v)), float(np.std(v))
        rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    hs = [r["h"] for r in rows]
    info = {"data": name, "n": n, "n_test": xt.shape[0], "d": d, "L": a.L, "activation": "softplus beta=5",
            "alpha_sqrt_h": a.alpha_sqrt_h, "loss": "softhinge (the trainer's default), stop when all margins met",
            "seeds": a.net_seeds, "kernel_flow_inf": {"status": str(kf.status), "test_err": err_inf},
            "rows": rows, "runs": runs, "slope_gap_inf": slope(hs, [r["gap_inf"] for r in rows]),
            "slope_gap_h0_inf": slope(hs, [r["gap_h0_inf"] for r in rows]),
            "machine": "2-core AMD EPYC VM, no GPU (shared)"}
    print(f"fitted slopes: |F_net - F_inf| {info['slope_gap_inf']:.3f}, |F_h0 - F_inf| "
          f"{info['slope_gap_h0_inf']:.3f} (theory -0.5)")
    plot_nets(info, a.net_out)
    save(info, a.net_results)
    print("wrote", a.net_out)


def plot_nets(info, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = info["rows"]
    hs = np.array([r["h"] for r in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for key, lab in (("gap_inf", r"net vs kernel flow with $\Theta_\infty$"),
                     ("gap_h0_inf", r"flow with $\Theta_h(0)$ vs flow with $\Theta_\infty$"),
                     ("gap_h0", r"net vs kernel flow with its $\Theta_h(0)$"),
                     ("sign_disagree_inf", r"sign disagreement, net vs $\Theta_\infty$ flow")):
        ax.errorbar(hs, [r[key] for r in rows], yerr=[r[key + "_std"] for r in rows], marker="o", capsize=3,
                    label=lab)
    ax.plot(hs, rows[0]["gap_inf"] * np.sqrt(hs[0] / hs), "k--", lw=1, label=r"$\propto h^{-1/2}$")
    ax.set(xscale="log", yscale="log", xlabel="width h", ylabel="relative difference of test outputs")
    ax.set_title(f"lazy FCNet L={info['L']} (alpha sqrt(h) = {info['alpha_sqrt_h']:g}), {info['data']} "
                 f"n={info['n']}+{info['n_test']}, {info['seeds']} seeds", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    a = parse(argv)
    name, x, y, xt, yt = load(a.n, a.n_test, a.dataset)
    _, T_inf = ntk_fast.limit_kernels(torch.cat([x, xt]), L=a.L, activation="softplus")
    if not a.no_kernels:
        kernels_part(a, name, x, y, xt, T_inf)
    if not a.no_nets:
        nets_part(a, name, x, y, xt, yt, T_inf)
    return 0


if __name__ == "__main__":
    sys.exit(main())
