"""Learning curves of regression on the sphere, lazy against feature (Petrini et al., NeurIPS 2022).

    python experiments/sphere_learning_curves.py            # d in {2, 5}, two nu_t each, 4 draws, n = 2^5..2^10
                                                            # (nets n <= 2^8); 2.5 min on 1 core
    python experiments/sphere_learning_curves.py --paper    # d in {2, 3, 5}, 8 draws, n up to 2^11, wider nets

Per dimension d, smoothness nu_t and draw: n_max + m points uniform on S^{d-1}, one exact draw of the Gaussian
field with power c_k = k^-(2 nu_t + d - 1) on all of them (ntk_fast.sphere.sample_field), then for each
training size n (the first n points) four predictors of the m test values (ntk_fast.sphere.predictors):
kernel regression with Theta_inf and with the empirical NTK at initialisation, the net trained in the lazy
regime (alpha sqrt(h) = --lazy-alpha-sqrt-h) and in the feature regime (alpha = 1/sqrt(2h): the slides' xi = 0),
each by full-batch heavy-ball gradient descent on the square loss (momentum --momentum, fit_net) until the
training mse is at most --target-mse C(1) (default 1e-4), or at most --steps steps and --max-wall seconds, for
n <= 2^--net-log2-max (default 2^8: the nets are the expensive part on 2 CPU cores; the reached training error,
steps and stop reason are recorded per run, and the table lists the runs that did not reach the target).
Test error: mean over test points of (f^n - f*)^2 / C(1).  Fitted exponents (slope of log mean error against
log n; error bar: standard error of the per-draw slopes) beside the predictions of ntk_fast.sphere.exponents.
Spectral-bias check (smallest and largest n, kernel predictors): the test error's power in each harmonic degree
against the target's (ntk_fast.spectrum.degree_power, unbiased U-statistic over the test points) beside
k_c(n) (the degree where the harmonics first number n), and the kernel-target alignment of both kernels.
Outputs: <results-dir>/sphere_learning_curves.json and .md (table), <figures-dir>/sphere_learning_curves.png.

Default nu_t per d (DEFAULT_NUS; --nus overrides): a target-limited (rough, 2 nu_t < 2a) and a kernel-limited
(smooth, 2 nu_t > 2a) one, a = d for the lazy and (d + 2) / 2 for the feature regime: d = 2: 1.5, 2.5; d = 3:
1.5, 3; d = 5: 1, 4.  On the circle and on S^2 nu_t = 1.5 is the roughest target whose nets all reach the
stated loss within the caps: below it the feature nets end on a singular kernel and the lazy nets on the
circle leave the linear regime or face a singular eNTK (docs/sphere.md, experiments/sphere_gd_steps.py);
nu_t = 0.5 still runs with --nus 0.5, with its capped runs listed as not reached.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from _common import study_draw  # noqa: E402
from ntk_fast.limits import limit_kernels  # noqa: E402
from ntk_fast.sphere import fit_exponent, harmonic_dim, harmonic_dims, predicted_exponents, target_power  # noqa: E402
from ntk_fast.sphere.predictors import (alpha_for_xi, entk_regression, fit_net, make_net,  # noqa: E402
                                        ntk_inf_regression, to_net_inputs)
from ntk_fast.spectrum import degree_power, kernel_target_alignment  # noqa: E402

NAME = "sphere_learning_curves"
PREDICTORS = ("ntk_inf", "entk", "lazy_net", "feature_net")
DEFAULT_NUS = {2: [1.5, 2.5], 3: [1.5, 3.0], 5: [1.0, 4.0]}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--paper", action="store_true", help="larger scale (d in {2,3,5}, n up to 2^11, 8 draws, h=1024)")
    p.add_argument("--ds", type=int, nargs="+", default=None, help="dimensions (default 2 5)")
    p.add_argument("--nus", type=float, nargs="+", default=None,
                   help="nu_t values for every d (default per d: d=2: 1.5 2.5, d=3: 1.5 3, d=5: 1 4)")
    p.add_argument("--log2-ns", type=int, nargs=2, default=None, metavar=("LO", "HI"), help="n = 2^LO .. 2^HI")
    p.add_argument("--draws", type=int, default=None, help="target draws (default 4)")
    p.add_argument("--m-test", type=int, default=512, help="test points")
    p.add_argument("--h", type=int, default=None, help="hidden width (default 512)")
    p.add_argument("--steps", type=int, default=None, help="gradient steps per net at most (default 50000)")
    p.add_argument("--max-wall", type=float, default=None, help="seconds per net run at most (default 20)")
    p.add_argument("--target-mse", type=float, default=1e-4,
                   help="stop a net at training mse <= this times C(1), the target variance (default 1e-4)")
    p.add_argument("--momentum", type=float, default=0.9, help="heavy-ball momentum of the nets' GD (0: plain GD)")
    p.add_argument("--eta", type=float, default=1.0, help="step size in units of n / lambda_max(Theta_0)")
    p.add_argument("--lazy-alpha-sqrt-h", type=float, default=1000.0, help="alpha sqrt(h) of the lazy net")
    p.add_argument("--no-nets", action="store_true", help="kernel predictors only")
    p.add_argument("--net-log2-max", type=int, default=None, help="train nets only for n <= 2^this (default 8)")
    p.add_argument("--k-cap", type=int, default=2048, help="largest degree of the sampled field (tail reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spectral-only", action="store_true",
                   help="redo only the spectral check of the recorded <results-dir>/" + NAME + ".json (same options)")
    p.add_argument("--out", default=os.path.join(ROOT, "experiments", "results"))
    p.add_argument("--results-dir", default=None)
    p.add_argument("--figures-dir", default=None)
    a = p.parse_args(argv)
    a.ds = a.ds or ([2, 3, 5] if a.paper else [2, 5])
    a.log2_ns = a.log2_ns or ([5, 11] if a.paper else [5, 10])
    a.draws = a.draws or (8 if a.paper else 4)
    a.h = a.h or (1024 if a.paper else 512)
    a.steps = a.steps or (200000 if a.paper else 50000)
    a.max_wall = a.max_wall or (120.0 if a.paper else 20.0)
    a.net_log2_max = a.net_log2_max or (a.log2_ns[1] if a.paper else 8)
    a.results_dir = a.results_dir or a.out
    a.figures_dir = a.figures_dir or a.out
    return a


def rel_err(pred, y, var):
    return float(((pred - y) ** 2).mean()) / var


def k_crit(n: int, d: int) -> int:
    """The degree k_c where the harmonics of degree <= k_c first number n or more (sum_{k <= k_c} N(k, d) >= n)."""
    k, total = 0, 1
    while total < n:
        k += 1
        total += harmonic_dim(k, d)
    return k


def spectral(d, n, ut, yt, un, yn, preds, K_entk) -> dict:
    """Spectral-bias check at training size n: the power of the target and of each predictor's test error in
    each harmonic degree (unbiased U-statistic over the m test points), against k_c(n); kernel-target alignment."""
    kmax = 32 if d == 2 else 12
    _, Kinf = limit_kernels(to_net_inputs(un), L=1, activation="relu", bias=1.0)
    return {"n": n, "k_c": k_crit(n, d), "k_max": kmax,
            "degree_power_target": degree_power(ut, yt, kmax, unbiased=True).tolist(),
            "degree_power_error": {k: degree_power(ut, v - yt, kmax, unbiased=True).tolist() for k, v in preds.items()},
            "alignment": {"ntk_inf": kernel_target_alignment(Kinf, yn), "entk": kernel_target_alignment(K_entk, yn)}}


def respectral(a, out) -> None:
    """--spectral-only: redo the spectral check of every draw of a recorded run (kernel predictors only: the
    same seeds give the same points, field and nets), checked against the recorded Theta_inf errors."""
    ns = out["ns"]
    for c in out["curves"]:
        d, nu = c["d"], c["nu_t"]
        for draw, info in enumerate(c["draws"]):
            u, fs = study_draw(d, nu, draw, ns[-1] + a.m_test, a.seed, a.k_cap)
            y, ut, yt = fs.values[0], u[ns[-1]:], fs.values[0][ns[-1]:]
            info["spectral"] = []
            for n in (ns[0], ns[-1]):
                preds = {"ntk_inf": ntk_inf_regression(u[:n], y[:n], ut)}
                r = entk_regression(make_net(d, a.h, a.seed + draw), u[:n], y[:n], ut)
                preds["entk"] = r["pred"]
                e = rel_err(preds["ntk_inf"], yt, fs.variance)
                rec = c["errors"]["ntk_inf"][draw][ns.index(n)]
                if abs(e - rec) > 1e-3 * rec:           # rounding differs with the thread count
                    raise RuntimeError(f"--spectral-only: d={d} nu_t={nu} draw {draw} n={n} does not reproduce the "
                                       f"recorded run ({e} != {rec}): use the run's options")
                info["spectral"].append(spectral(d, n, ut, yt, u[:n], y[:n], preds, r["K"]))
            info.pop("degree_power_target", None), info.pop("degree_power_error", None), info.pop("alignment", None)
        print(f"d={d} nu_t={nu}: spectral check redone", flush=True)


def one_draw(a, d, nu, draw, ns):
    """Errors of every predictor at every n for one draw; the spectral check at the smallest and largest n."""
    u, fs = study_draw(d, nu, draw, ns[-1] + a.m_test, a.seed, a.k_cap)
    y, var = fs.values[0], fs.variance
    ut, yt = u[ns[-1]:], y[ns[-1]:]
    errs = {k: [] for k in PREDICTORS}
    info = {"k_max": fs.k_max, "tail": fs.tail, "jitter": fs.jitter, "nets": []}
    for n in ns:
        un, yn = u[:n], y[:n]
        preds = {"ntk_inf": ntk_inf_regression(un, yn, ut)}
        net = make_net(d, a.h, a.seed + draw)
        r = entk_regression(net, un, yn, ut)
        preds["entk"] = r["pred"]
        info.setdefault("entk_residual", []).append(r["residual"])
        if not a.no_nets and n <= 2 ** a.net_log2_max:
            regimes = (("lazy_net", a.lazy_alpha_sqrt_h / math.sqrt(a.h)), ("feature_net", alpha_for_xi(0, a.h)))
            for key, alpha in regimes:
                o = fit_net(make_net(d, a.h, a.seed + draw), un, yn, ut, alpha, K0=r["K"], eta=a.eta,
                            momentum=a.momentum, target_mse=a.target_mse * var, max_steps=a.steps,
                            max_wall=a.max_wall)
                preds[key] = o["pred"]
                info["nets"].append({"n": n, "regime": key, "train_mse": o["train_mse"] / var, "steps": o["steps"],
                                     "wall": round(o["wall"], 2), "status": o["status"],
                                     "lr_drop": o["lr_last"] / o["lr"]})
        for k, v in preds.items():
            errs[k].append(rel_err(v, yt, var))
        if n in (ns[0], ns[-1]):
            info.setdefault("spectral", []).append(spectral(d, n, ut, yt, un, yn, preds, r["K"]))
    return errs, info


def run(a):
    ns = [2 ** k for k in range(a.log2_ns[0], a.log2_ns[1] + 1)]
    out = {"config": {k: v for k, v in vars(a).items() if k not in ("out", "results_dir", "figures_dir")},
           "ns": ns, "machine": "2-core EPYC VM, no GPU (shared)", "curves": []}
    t_all = time.perf_counter()
    for d in a.ds:
        for nu in (a.nus or DEFAULT_NUS.get(d, [1.0, 4.0])):
            t0 = time.perf_counter()
            per = {k: [] for k in PREDICTORS}
            infos = []
            for draw in range(a.draws):
                errs, info = one_draw(a, d, nu, draw, ns)
                for k, v in errs.items():
                    if v:
                        per[k].append(v)
                infos.append(info)
            pred = predicted_exponents(d, nu)
            fits = {k: fit_exponent(ns[:len(v[0])], np.array(v)) for k, v in per.items() if v and len(v[0]) > 1}
            out["curves"].append({"d": d, "nu_t": nu, "errors": per, "fits": fits, "predicted": pred,
                                  "draws": infos, "seconds": round(time.perf_counter() - t0, 1)})
            print(f"d={d} nu_t={nu}: " + ", ".join(f"{k} beta={f['beta']:.2f}+-{f['beta_err']:.2f}"
                                                   for k, f in fits.items())
                  + f" | predicted lazy {pred['lazy']:.2f}, feature {pred['feature']:.2f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    out["seconds"] = round(time.perf_counter() - t_all, 1)
    return out


def table(out) -> str:
    lines = ["| d | nu_t | beta pred. lazy | beta pred. feature | Theta_inf KRR | eNTK KRR | lazy net | feature net |",
             "|---|---|---|---|---|---|---|---|"]
    for c in out["curves"]:
        f = lambda k: (f"{c['fits'][k]['beta']:.2f} +- {c['fits'][k]['beta_err']:.2f}"  # noqa: E731
                       if k in c["fits"] else "-")
        lines.append(f"| {c['d']} | {c['nu_t']:g} | {c['predicted']['lazy']:.2f} | {c['predicted']['feature']:.2f} | "
                     f"{f('ntk_inf')} | {f('entk')} | {f('lazy_net')} | {f('feature_net')} |")
    return "\n".join(lines) + "\n"


def spectral_table(out) -> str:
    """Spectral-bias check: test-error power (unbiased estimate) over the target's expected power c_k N(k, d),
    summed over degrees 1 <= k < k_c and k_c <= k <= k_max (mean over draws), and the kernel-target alignments."""
    lines = ["| d | nu_t | n | k_c | predictor | error/target, k < k_c | error/target, k_c..k_max | alignment |",
             "|---|---|---|---|---|---|---|---|"]
    for c in out["curves"]:
        draws = [i["spectral"] for i in c["draws"] if "spectral" in i]
        for j in range(len(draws[0]) if draws else 0):
            first = draws[0][j]
            kc, km = first["k_c"], first["k_max"]
            for key in first["degree_power_error"]:
                lo, hi = [], []
                # reference: the target's expected power c_k N(k, d); the measured one (recorded too) is
                # dominated by the U-statistic's noise ~ sqrt(N_k) / m C(1) where c_k N_k is small
                t = (target_power(c["d"], c["nu_t"], km) * harmonic_dims(km, c["d"])).numpy()
                for sp in (dr[j] for dr in draws):
                    e = np.array(sp["degree_power_error"][key])
                    lo.append(e[1:kc].sum() / t[1:kc].sum() if kc > 1 else float("nan"))
                    hi.append(e[kc:km + 1].sum() / t[kc:km + 1].sum() if kc <= km else float("nan"))
                al = np.mean([dr[j]["alignment"][key] for dr in draws]) if key in first["alignment"] else None
                lines.append(f"| {c['d']} | {c['nu_t']:g} | {first['n']} | {kc} | {key} | {np.mean(lo):.3g} | "
                             f"{np.mean(hi):.3g} | {'-' if al is None else format(al, '.3f')} |")
    return "\n".join(lines) + "\n"


def nets_table(out) -> str:
    """Training of the nets: how many runs reached the stated training mse, the reached training error (relative
    to C(1)), steps and wall time, and the runs that did not reach it (n, draw, train mse, why they stopped)."""
    tgt = out["config"].get("target_mse")
    lines = [f"Target: train mse <= {tgt:g} C(1)." if tgt is not None else "",
             "| d | nu_t | net | runs | reached | median train mse / C(1) | max | median steps | max wall (s) | "
             "not reached: n (draw) train mse, stop |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in out["curves"]:
        runs = [dict(r, draw=i) for i, info in enumerate(c["draws"]) for r in info["nets"]]
        for key in ("lazy_net", "feature_net"):
            rr = [r for r in runs if r["regime"] == key]
            if not rr:
                continue
            mse = np.array([r["train_mse"] for r in rr])
            missed = [r for r in rr if r["status"] != "reached"]
            why = "; ".join(f"{r['n']} ({r['draw']}) {r['train_mse']:.2g}, {r['status']}" for r in missed) or "none"
            lines.append(f"| {c['d']} | {c['nu_t']:g} | {key} | {len(rr)} | {len(rr) - len(missed)} | "
                         f"{np.median(mse):.2g} | {mse.max():.2g} | {np.median([r['steps'] for r in rr]):.0f} | "
                         f"{max(r['wall'] for r in rr):.1f} | {why} |")
    return "\n".join(lines) + "\n"


def write_md(out, path) -> None:
    with open(path, "w") as fh:
        fh.write(table(out) + "\n" + nets_table(out) + "\n" + spectral_table(out))


def plot(out, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    curves = out["curves"]
    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.6), squeeze=False)
    ns = np.array(out["ns"], dtype=float)
    style = {"ntk_inf": "C0o-", "entk": "C1s-", "lazy_net": "C2^-", "feature_net": "C3v-"}
    for ax, c in zip(axes[0], curves):
        for k, v in c["errors"].items():
            if v:
                e = np.array(v)
                ax.errorbar(ns[:e.shape[1]], e.mean(0), yerr=e.std(0) / math.sqrt(len(e)), fmt=style[k], ms=4, label=k)
        base = np.array(c["errors"]["ntk_inf"]).mean(0)[0]
        for k, ls in (("lazy", "k--"), ("feature", "k:")):
            ax.plot(ns, base * (ns / ns[0]) ** -c["predicted"][k], ls, lw=1,
                    label=f"pred. {k} {c['predicted'][k]:.2f}")
        ax.set(xscale="log", yscale="log", xlabel="n", title=f"d = {c['d']}, nu_t = {c['nu_t']:g}")
    axes[0][0].set_ylabel("test error / C(1)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    a = parse(argv)
    if a.spectral_only:
        path = os.path.join(a.results_dir, NAME + ".json")
        with open(path) as fh:
            out = json.load(fh)
        respectral(a, out)
        with open(path, "w") as fh:
            json.dump(out, fh, indent=1)
        write_md(out, os.path.join(a.results_dir, NAME + ".md"))
        print(spectral_table(out))
        return
    os.makedirs(a.results_dir, exist_ok=True)
    os.makedirs(a.figures_dir, exist_ok=True)
    out = run(a)
    with open(os.path.join(a.results_dir, NAME + ".json"), "w") as fh:
        json.dump(out, fh, indent=1)
    write_md(out, os.path.join(a.results_dir, NAME + ".md"))
    plot(out, os.path.join(a.figures_dir, NAME + ".png"))
    print(table(out))


if __name__ == "__main__":
    main()
