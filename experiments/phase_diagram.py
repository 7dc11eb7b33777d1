"""Test error against alpha*sqrt(h) for several widths h: single nets and ensemble averages (paper Fig. 3-4).

For each (h, alpha*sqrt(h)) an ensemble of K nets (seeds 0..K-1) is trained by gradient flow to the margin.
Single-net error: mean over the K nets of the test error of F_r.  Ensemble error: error of the mean output
(1/K) sum_r F_r (F = alpha (f - f0)).  Expected: flat in the lazy regime alpha*sqrt(h) >> 1, a change across
alpha*sqrt(h) ~ 1, and ensemble averaging helping most where the fluctuations are large.
Writes <out>/phase_diagram.json and .png; the runs (reused by kernel_change.py) go to <out>/runs.
"""
import _common as C

import matplotlib.pyplot as plt


def main(argv=None):
    p = C.base_parser(__doc__.splitlines()[0], "runs/experiments")
    args = p.parse_args(argv)
    hs, a_list = C.alpha_grid(args)
    rows = C.run_grid(args, C.configs(args, hs, a_list))
    table = []
    for r in rows:
        tr = r.get("train", {})
        errs = [e for e in r.get("test_err_per_net") or [] if e is not None]
        table.append({"h": r["h"], "alpha_sqrt_h": r["alpha_sqrt_h"], "status": r.get("status"),
                      "single_err": sum(errs) / len(errs) if errs else None,
                      "single_err_per_net": errs, "ensemble_err": (r.get("ensemble") or {}).get("ens_err"),
                      "kernel_change": tr.get("kernel_change"), "steps": tr.get("step"), "wall": r.get("wall")})
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, h in enumerate(hs):
        pts = sorted((t["alpha_sqrt_h"], t["single_err"], t["ensemble_err"]) for t in table if t["h"] == h)
        col = f"C{i}"
        ax.plot([a for a, _, _ in pts], [s for _, s, _ in pts], "o-", color=col, label=f"h={h}, single net")
        if args.ensemble > 1:
            ax.plot([a for a, _, _ in pts], [e for _, _, e in pts], "s--", color=col, mfc="none",
                    label=f"h={h}, ensemble of {args.ensemble}")
    ax.set_xscale("log")
    ax.set_xlabel(r"$\alpha\sqrt{h}$  (lazy $\gg 1$, feature $\ll 1$)")
    ax.set_ylabel("test error")
    ax.set_title(f"Test error vs alpha*sqrt(h)\n{C.scale_label(args)}", fontsize=9)
    ax.legend(fontsize=8)
    C.save(args, "phase_diagram", {"setup": vars(args), "rows": table}, fig)
    for t in table:
        print(f"h={t['h']:5d} alpha*sqrt(h)={t['alpha_sqrt_h']:9.3g} status={t['status']:9s} "
              f"single={t['single_err']:.4f} ensemble={t['ensemble_err'] if t['ensemble_err'] is None else round(t['ensemble_err'], 4)}")


if __name__ == "__main__":
    main()
