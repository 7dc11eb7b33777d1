"""Trainer against the frozen-kernel solver as alpha grows, and the final-kernel run (paper Appendix A).

For each alpha*sqrt(h) one net is trained by gradient flow; the frozen-kernel dynamics are run with the NTK at
initialisation Theta(w0) (the lazy limit) and with the NTK at the end of training Theta(w_T).  Plotted: the
relative gap |F_net - F_kernel|_2 / |F_kernel|_2 of the test outputs (falls as alpha*sqrt(h) grows: the net
becomes its linearisation), and the test errors of the net, the init-kernel and the final-kernel predictors.
Writes <out>/kernel_vs_net.json and .png; runs go to <out>/runs_kernel.
"""
import _common as C

import matplotlib.pyplot as plt


def main(argv=None):
    p = C.base_parser(__doc__.splitlines()[0], "runs/experiments")
    args = p.parse_args(argv)
    paper = args.paper
    args.p = args.p or (10000 if paper else 500)
    args.p_test = args.p_test or (50000 if paper else 2000)
    args.ensemble = 1
    hs = args.hs or ([100] if paper else [64])
    a_list = args.alphas_sqrt_h or ([10.0 ** k for k in range(-2, 8)] if paper else [0.1, 1.0, 10.0, 100.0, 1e3, 1e4])
    rows = C.run_grid(args, C.configs(args, hs, a_list, init_kernel=True, final_kernel=True), sub="runs_kernel")
    table = []
    for r in rows:
        ik, fk = r.get("init_kernel", {}), r.get("final_kernel", {})
        table.append({"h": r["h"], "alpha_sqrt_h": r["alpha_sqrt_h"], "status": r.get("status"),
                      "net_err": r.get("train", {}).get("test_err"), "init_kernel_err": ik.get("test_err"),
                      "final_kernel_err": fk.get("test_err"), "gap_init": ik.get("test_output_gap_vs_net"),
                      "gap_final": fk.get("test_output_gap_vs_net"), "init_kernel_status": ik.get("status"),
                      "final_kernel_status": fk.get("status")})
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.2))
    for i, h in enumerate(hs):
        t = sorted((x for x in table if x["h"] == h), key=lambda x: x["alpha_sqrt_h"])
        xs = [x["alpha_sqrt_h"] for x in t]
        a1.plot(xs, [x["gap_init"] for x in t], "o-", color=f"C{i}", label=rf"vs $\Theta(w_0)$, h={h}")
        a1.plot(xs, [x["gap_final"] for x in t], "s--", color=f"C{i}", mfc="none", label=rf"vs $\Theta(w_T)$, h={h}")
        a2.plot(xs, [x["net_err"] for x in t], "o-", color="k", label=f"net, h={h}")
        a2.plot(xs, [x["init_kernel_err"] for x in t], "s-", color="C1", label=r"frozen $\Theta(w_0)$")
        a2.plot(xs, [x["final_kernel_err"] for x in t], "^-", color="C2", label=r"frozen $\Theta(w_T)$")
    for a in (a1, a2):
        a.set_xscale("log")
        a.set_xlabel(r"$\alpha\sqrt{h}$")
        a.legend(fontsize=8)
    a1.set_yscale("log")
    a1.set_ylabel(r"$|F_{net}-F_{kernel}| / |F_{kernel}|$ (test)")
    a1.set_title("net vs frozen-kernel dynamics", fontsize=9)
    a2.set_ylabel("test error")
    a2.set_title(C.scale_label(args), fontsize=9)
    C.save(args, "kernel_vs_net", {"setup": vars(args), "rows": table}, fig)
    for t in table:
        print(f"alpha*sqrt(h)={t['alpha_sqrt_h']:9.3g} net={t['net_err']} init_kernel={t['init_kernel_err']} "
              f"final_kernel={t['final_kernel_err']} gap_init={t['gap_init']} gap_final={t['gap_final']}")


if __name__ == "__main__":
    main()
