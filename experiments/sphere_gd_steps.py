"""Why the sphere study's nets miss the stated training loss on rough targets in d = 2: heavy-ball step counts.

    python experiments/sphere_gd_steps.py      # d = 2, nu_t = 0.5, 1, 1.5; draws 0, 1; n = 32, 128; h = 512

The lazy net (alpha sqrt(h) = 1000) is, to O(1/alpha), the linear model F = J (w - w0), on which fit_net's
heavy ball acts in function space with the kernel K = J J^T (the eNTK at initialisation) and the step
lr / n = eta / lambda_max (eta = 1).  In the eigenbasis K = sum_k lambda_k v_k v_k^T each residual component
r_k = v_k . (F - y) follows the scalar heavy-ball recursion with h_k = lambda_k / lambda_max:

    r_k(t + 1) = (1 + mu - h_k) r_k(t) - mu r_k(t - 1),    r_k(0) = -v_k . y,  r_k(1) = (1 - h_k) r_k(0)

with roots z^2 - (1 + mu - h) z + mu = 0.  For h < (1 - sqrt(mu))^2 both are real and the slow one is
z ~ 1 - h / (1 - mu): the mode needs ~ (1 - mu) / h ln(1 / eps) steps.  Train mse at step t:
(1/n) sum_k r_k(t)^2.  The script finds the first t with mse <= 1e-4 C(1) (doubling t, then bisecting, on
the decreasing envelope |c1| |z1|^t + |c2| |z2|^t, which bounds |r_k|) for mu = 0.9 (the study's), 0.99 and
the mu tuned to the spectrum, ((sqrt(kappa) - 1) / (sqrt(kappa) + 1))^2, kappa = lambda_max / lambda_min.
Then fit_net itself (the study's settings but --net-wall seconds per run, 10 s by default against the study's
20 s; 1 thread): the lazy net's train mse against the linear model's after as many steps, how far it left the
linear regime (activation flips at the training points, |w - w0| / |w0|), and the same lazy run at
alpha sqrt(h) = 1e4 (ten times smaller weight changes); the feature net's train mse, its step in units of
n / lambda_max(K_end) (the trace rescaling's aim, 1) and the share of its final residual on the eigenvalues of
K_end below 1e-6 lambda_max (modes that need > 1e5 steps per e-fold).
Output: <out>/sphere_gd_steps.json and .md.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))      # _common, also when loaded by path
from _common import save_table, study_draw  # noqa: E402
from ntk_fast.ntk.empirical import empirical_ntk  # noqa: E402
from ntk_fast.sphere.predictors import alpha_for_xi, fit_net, make_net, to_net_inputs  # noqa: E402

TARGET = 1e-4


def mode_coeffs(h: np.ndarray, mu: float):
    """Roots z1, z2 (|z1| >= |z2|) and weights c1, c2 of r(t) = c1 z1^t + c2 z2^t, r(0) = 1, r(1) = 1 - h."""
    b = 1 + mu - h
    disc = np.sqrt((b * b - 4 * mu).astype(complex))
    z1, z2 = (b + disc) / 2, (b - disc) / 2
    swap = np.abs(z2) > np.abs(z1)
    z1, z2 = np.where(swap, z2, z1), np.where(swap, z1, z2)
    same = np.abs(z1 - z2) < 1e-12
    c1 = np.where(same, 0.5, (1 - h - z2) / np.where(same, 1, z1 - z2))
    return z1, z2, c1, 1 - c1


def mse_bound(t: float, p: np.ndarray, z1, z2, c1, c2) -> float:
    """Upper bound on the train mse / C(1) at step t: sum_k p_k (|c1| |z1|^t + |c2| |z2|^t)^2."""
    env = np.abs(c1) * np.abs(z1) ** t + np.abs(c2) * np.abs(z2) ** t
    return float((p * env ** 2).sum())


def steps_needed(p: np.ndarray, h: np.ndarray, mu: float, target: float = TARGET) -> float:
    """First t (to 1 %) with the bound on the train mse at most target (inf beyond 1e12 steps)."""
    co = mode_coeffs(h, mu)
    lo, hi = 0.0, 1.0
    while mse_bound(hi, p, *co) > target:
        lo, hi = hi, hi * 2
        if hi > 1e12:
            return math.inf
    while hi - lo > max(1.0, 0.01 * hi):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if mse_bound(mid, p, *co) <= target else (mid, hi)
    return hi


def exact_mse(t: int, p: np.ndarray, h: np.ndarray, mu: float) -> float:
    """The linear model's train mse / C(1) at integer step t (closed form, real part)."""
    z1, z2, c1, c2 = mode_coeffs(h, mu)
    return float((p * np.real(c1 * z1 ** t + c2 * z2 ** t) ** 2).sum())


def lazy_run(d, h, draw, u, y, var, K, p, hk, wall) -> dict:
    """fit_net's lazy net (alpha sqrt(h) = 1000, mu = 0.9): reached train mse and steps, the linear model's mse
    after as many steps, and how far it left the linear regime: activation flips (unit, point) at the training
    points and |w - w0| / |w0|; then the same run ten times deeper in the lazy regime (alpha sqrt(h) = 1e4:
    the weights move ten times less)."""
    net, net0 = make_net(d, h, draw), make_net(d, h, draw)
    o = fit_net(net, u, y, u, 1000 / math.sqrt(h), K0=K, momentum=0.9, target_mse=TARGET * var,
                max_steps=50000, max_wall=wall)
    a0 = to_net_inputs(u) / math.sqrt(d)
    pre = lambda m: a0 @ m.weights[0].detach().T + m.bias_scale * m.biases[0].detach()  # noqa: E731
    dw = sum(float((q - q0).detach().pow(2).sum()) for q, q0 in zip(net.parameters(), net0.parameters()))
    w0 = sum(float(q0.detach().pow(2).sum()) for q0 in net0.parameters())
    o4 = fit_net(make_net(d, h, draw), u, y, u, 1e4 / math.sqrt(h), K0=K, momentum=0.9, target_mse=TARGET * var,
                 max_steps=50000, max_wall=wall)
    return {"steps": o["steps"], "train_mse": o["train_mse"] / var, "status": o["status"], "wall": round(o["wall"], 1),
            "linear_mse_at_its_steps": exact_mse(o["steps"], p, hk, 0.9),
            "activation_flips": int(((pre(net) > 0) != (pre(net0) > 0)).sum()), "dw_rel": math.sqrt(dw / w0),
            "alpha_sqrt_h_1e4": {"steps": o4["steps"], "train_mse": o4["train_mse"] / var, "status": o4["status"]}}


def feature_run(d, h, draw, u, y, var, K, wall) -> dict:
    """fit_net's feature net (alpha = 1/sqrt(2h), mu = 0.9): reached train mse, steps, the step in units of
    n / lambda_max of the kernel it ends with (the trace rescaling's aim: 1), lambda_min / lambda_max of that
    kernel and the share of the final train mse on its eigenvalues below 1e-6 lambda_max."""
    n, alpha = len(y), alpha_for_xi(0, h)
    net, x = make_net(d, h, draw), to_net_inputs(u)
    o = fit_net(net, u, y, u, alpha, K0=K, momentum=0.9, target_mse=TARGET * var, max_steps=50000, max_wall=wall)
    r = o["pred"] - y
    lam, V = torch.linalg.eigh(empirical_ntk(net, x))
    pr = (V.T @ r) ** 2
    return {"steps": o["steps"], "train_mse": o["train_mse"] / var, "status": o["status"], "wall": round(o["wall"], 1),
            "eta_end": o["lr_last"] * float(lam[-1]) / n, "lambda_min_over_max_end": float(lam[0] / lam[-1]),
            "mse_share_below_1e-6_max_end": float(pr[lam < 1e-6 * lam[-1]].sum() / pr.sum())}


def one(d: int, nu: float, draw: int, n: int, h: int, m: int, n_max: int, run_net: bool, wall: float) -> dict:
    u, fs = study_draw(d, nu, draw, n_max + m)                        # the study's draw (seed 0)
    y, var = fs.values[0][:n], fs.variance
    net = make_net(d, h, draw)
    K = empirical_ntk(net, to_net_inputs(u[:n]))
    lam, V = torch.linalg.eigh(K)
    lam, proj = lam.numpy(), (V.T @ y).numpy()
    p = proj ** 2 / n / var                                           # mse / C(1) carried by each mode at t = 0
    hk = np.clip(lam / lam[-1], 0, None)
    kappa = lam[-1] / lam[0]
    mu_opt = ((math.sqrt(kappa) - 1) / (math.sqrt(kappa) + 1)) ** 2
    slow = np.argsort(-(p * np.log(np.maximum(p, 1e-300) / TARGET).clip(0) / np.maximum(hk, 1e-300)))[:3]
    rec = {"d": d, "nu_t": nu, "draw": draw, "n": n, "lambda_max": float(lam[-1]),
           "lambda_min_over_max": float(lam[0] / lam[-1]),
           "lambda_over_max_lowest5": (lam[:5] / lam[-1]).tolist(),
           "mse0_share_lowest5": p[:5].tolist(), "mse0": float(p.sum()),
           "mse_share_below_1e-4_max": float(p[hk < 1e-4].sum()),
           "slow_modes": [{"lambda_over_max": float(hk[k]), "mse0_share": float(p[k])} for k in slow],
           "mu_opt": mu_opt, "steps": {}}
    for mu in (0.9, 0.99, mu_opt):
        rec["steps"][f"{mu:.6g}"] = steps_needed(p, hk, mu)
    rec["linear_mse_at_50000_mu0.9"] = exact_mse(50000, p, hk, 0.9)
    if run_net:
        rec["fit_net"] = lazy_run(d, h, draw, u[:n], y, var, K, p, hk, wall)
        rec["feature"] = feature_run(d, h, draw, u[:n], y, var, K, wall)
    return rec


def table(rows) -> str:
    lines = ["| nu_t | draw | n | lambda_min / max | mse share on lambda < 1e-4 max | steps mu = 0.9 | "
             "mu = 0.99 | tuned mu (steps) | lazy fit_net: steps, train mse (linear model), stop | "
             "activation flips, abs(w - w0) / abs(w0) | alpha sqrt(h) = 1e4: steps, train mse, stop | feature fit_net: steps, train mse, stop | "
             "feature end: step x lambda_max / n, lambda_min / max, mse share below 1e-6 max |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["steps"]
        mo = f"{r['mu_opt']:.6g}"
        fn = r.get("fit_net")
        fe = r.get("feature")
        a4 = fn["alpha_sqrt_h_1e4"] if fn else None
        fs = (f"{fn['steps']}, {fn['train_mse']:.2g} ({fn['linear_mse_at_its_steps']:.2g}), {fn['status']} | "
              f"{fn['activation_flips']}, {fn['dw_rel']:.1e} | {a4['steps']}, {a4['train_mse']:.2g}, {a4['status']} | "
              f"{fe['steps']}, {fe['train_mse']:.2g}, {fe['status']} | "
              f"{fe['eta_end']:.2f}, {fe['lambda_min_over_max_end']:.1e}, {fe['mse_share_below_1e-6_max_end']:.2g}"
              if fn else "- | - | - | - | -")
        lines.append(f"| {r['nu_t']:g} | {r['draw']} | {r['n']} | {r['lambda_min_over_max']:.2g} | "
                     f"{r['mse_share_below_1e-4_max']:.2g} | {s['0.9']:.3g} | {s['0.99']:.3g} | "
                     f"{r['mu_opt']:.5f} ({s[mo]:.3g}) | {fs} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d", type=int, default=2)
    p.add_argument("--nus", type=float, nargs="+", default=[0.5, 1.0, 1.5])
    p.add_argument("--draws", type=int, nargs="+", default=[0, 1])
    p.add_argument("--ns", type=int, nargs="+", default=[32, 128])
    p.add_argument("--h", type=int, default=512)
    p.add_argument("--net-wall", type=float, default=10.0, help="seconds per fit_net run (0: no runs)")
    p.add_argument("--out", default=os.path.join(ROOT, "experiments", "results"))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    t0, load0 = time.perf_counter(), os.getloadavg()
    rows = []
    for nu in a.nus:
        for draw in a.draws:
            for n in a.ns:
                rows.append(one(a.d, nu, draw, n, a.h, 512, 1024, a.net_wall > 0, a.net_wall))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    out = {"machine": "2-core AMD EPYC VM, no GPU (shared), 1 thread", "load": [load0, os.getloadavg()], "h": a.h,
           "target_mse": TARGET, "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    save_table(a.out, "sphere_gd_steps", out, table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
