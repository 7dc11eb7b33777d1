"""Kernel change |Theta_T - Theta_0|_F / |Theta_0|_F against alpha*sqrt(h), with the slope in the lazy regime (Fig. 5a).

Theta_T: the empirical NTK at the end of training, Theta_0 at initialisation, both on the first
``kernel_points`` (256) test points (computed by the trainer with the Gram op).  In the lazy regime the
weights move by O(1/(alpha sqrt(h))) so the kernel change falls as (alpha*sqrt(h))^-1: the fitted log-log slope
over alpha*sqrt(h) >= --lazy-from (100) should be about -1.  Same grid and run folders as phase_diagram.py (runs
already finished there are reused).  Writes <out>/kernel_change.json and .png.
"""
import _common as C

import matplotlib.pyplot as plt
import numpy as np


def main(argv=None):
    p = C.base_parser(__doc__.splitlines()[0], "runs/experiments")
    p.add_argument("--lazy-from", type=float, default=100.0, help="fit over alpha*sqrt(h) >= this (default 100)")
    args = p.parse_args(argv)
    hs, a_list = C.alpha_grid(args)
    rows = C.run_grid(args, C.configs(args, hs, a_list))
    table, fits = [], {}
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, h in enumerate(hs):
        pts = []
        for r in rows:
            if r["h"] != h:
                continue
            kc = [k for k in r.get("kernel_change_per_net") or [] if k is not None]
            val = float(np.mean(kc)) if kc else None
            pts.append((r["alpha_sqrt_h"], val))
            table.append({"h": h, "alpha_sqrt_h": r["alpha_sqrt_h"], "kernel_change": val, "per_net": kc,
                          "status": r.get("status")})
        pts.sort()
        ax.plot([a for a, _ in pts], [v for _, v in pts], "o-", color=f"C{i}", label=f"h={h}")
        lazy = [(a, v) for a, v in pts if a >= args.lazy_from * (1 - 1e-9) and v]
        fit = C.fit_loglog([a for a, _ in lazy], [v for _, v in lazy])
        if fit:
            fits[str(h)] = fit
            xs = np.array([lazy[0][0], lazy[-1][0]])
            ax.plot(xs, 10 ** fit["intercept"] * xs ** fit["slope"], ":", color=f"C{i}",
                    label=f"fit h={h}: slope {fit['slope']:.2f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(r"$\alpha\sqrt{h}$")
    ax.set_ylabel(r"$\|\Theta_T-\Theta_0\|_F / \|\Theta_0\|_F$")
    ax.set_title(f"Kernel change during training\n{C.scale_label(args)}", fontsize=9)
    ax.legend(fontsize=8)
    C.save(args, "kernel_change", {"setup": vars(args), "rows": table, "lazy_fit": fits}, fig)
    for t in table:
        print(f"h={t['h']:5d} alpha*sqrt(h)={t['alpha_sqrt_h']:9.3g} kernel change={t['kernel_change']}")
    for h, f in fits.items():
        print(f"h={h}: lazy-regime slope {f['slope']:.3f} over {f['points']} points (alpha*sqrt(h) >= {args.lazy_from:g})")


if __name__ == "__main__":
    main()
