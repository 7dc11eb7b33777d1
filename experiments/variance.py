"""Variance of the trained outputs across initialisations against the width h (paper Fig. 4a-b).

For each h and alpha*sqrt(h), K nets (seeds 0..K-1) are trained; Var = mean over test points of the unbiased
across-seed variance of F_r(x) (article units, F = alpha (f - f0)).  At fixed alpha*sqrt(h) the fluctuations
of the predictor fall with h, which is why ensemble averaging and width help in the lazy regime.  The log-log
slope of Var against h is fitted for each alpha*sqrt(h).  Writes <out>/variance.json and .png.
"""
import _common as C

import matplotlib.pyplot as plt
import numpy as np


def main(argv=None):
    p = C.base_parser(__doc__.splitlines()[0], "runs/experiments")
    args = p.parse_args(argv)
    paper = args.paper
    args.p = args.p or (10000 if paper else 500)
    args.p_test = args.p_test or (50000 if paper else 2000)
    args.ensemble = args.ensemble or (10 if paper else 4)
    hs = args.hs or ([10, 19, 37, 72, 139, 268, 518, 1000] if paper else [16, 32, 64, 128])
    a_list = args.alphas_sqrt_h or ([1e-2, 1.0, 1e2, 1e4] if paper else [1.0, 1000.0])
    rows = C.run_grid(args, C.configs(args, hs, a_list), sub="runs_variance")
    table, fits = [], {}
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, a in enumerate(a_list):
        pts = sorted((r["h"], (r.get("ensemble") or {}).get("var"), (r.get("ensemble") or {}).get("ens_err"),
                      r.get("status")) for r in rows if abs(r["alpha_sqrt_h"] - a) <= 1e-9 * a)
        for h, v, e, st in pts:
            table.append({"alpha_sqrt_h": a, "h": h, "var": v, "ensemble_err": e, "status": st})
        ax.plot([h for h, *_ in pts], [v for _, v, *_ in pts], "o-", color=f"C{i}", label=rf"$\alpha\sqrt{{h}}$={a:g}")
        fit = C.fit_loglog([h for h, *_ in pts], [v for _, v, *_ in pts])
        if fit:
            fits[f"{a:g}"] = fit
            xs = np.array([pts[0][0], pts[-1][0]], dtype=float)
            ax.plot(xs, 10 ** fit["intercept"] * xs ** fit["slope"], ":", color=f"C{i}",
                    label=f"slope {fit['slope']:.2f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("width h")
    ax.set_ylabel("Var of test outputs across seeds")
    ax.set_title(f"Output fluctuations vs width\n{C.scale_label(args)}", fontsize=9)
    ax.legend(fontsize=8)
    C.save(args, "variance", {"setup": vars(args), "rows": table, "fit_vs_h": fits}, fig)
    for t in table:
        print(f"alpha*sqrt(h)={t['alpha_sqrt_h']:9.3g} h={t['h']:5d} var={t['var']} ens_err={t['ensemble_err']}")
    for a, f in fits.items():
        print(f"alpha*sqrt(h)={a}: Var ~ h^{f['slope']:.2f}")


if __name__ == "__main__":
    main()
