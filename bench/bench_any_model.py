"""Issue 13 benchmarks: the structured NTK of models beyond FCNet, each alternative in the same run.

    PYTHONPATH=$PWD nice python bench/bench_any_model.py [--quick] [--cases cnn,resmlp,full10,fc]

Cases (float32, CPU):
* cnn:    the paper's CV (h=32, k=1) on Fashion-MNIST (Gaussian stand-ins when the files are absent), n=2000:
          ntk_fast vs torch.func vmap(jacrev) + one Gram (full square torch.mm), torch.func NTK-vector products
          (vjp + jvp per column, timed on a few columns and scaled to n), and the floor: per-sample gradients +
          one symmetric Gram at this run's torch.mm rate.
* resmlp: residual MLP 784 -> 512, 2 blocks of LayerNorm + Linear(512, 512) + tanh, Linear(512, 1), n=2000:
          ntk_fast vs torch.func vmap(jacrev) + Gram (measured at n=500: its Jacobians do not fit at 2000;
          scaled by its cost model, Jacobians x n, Gram x n^2).
* full10: Linear(784,512)-ReLU-Linear(512,512)-ReLU-Linear(512,10), mode="full", n=1500: the new shared-A path vs
          the previous one (A repeated k times, one Gram op on n k rows), and the flop floor
          n^2 sum_l (p_l + k^2 q_l) at this run's torch.mm rate.
* fc:     FCNet(784, 1024, L=3), n=4000, trace: no regression against bench/results (0.943 s on 2026-11-22).
Results: bench/results/any-model-<date>.{json,md}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import ntk_fast  # noqa: E402
from ntk_fast.ops import gram as _ops  # noqa: E402
from ntk_fast.ops.reference import per_sample_jacobian  # noqa: E402

MACHINE = "2-core AMD EPYC VM, no GPU"


def timeit(fn, repeats=1, warmup=0):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        res = fn()
        ts.append(time.perf_counter() - t)
    return min(ts), res


def mm_rate(n=2048):
    a = torch.randn(n, n)
    timeit(lambda: a @ a)
    t, _ = timeit(lambda: a @ a, repeats=3)
    return 2 * n ** 3 / t


def fashion(n, d=784):
    try:
        from ntk_fast.data import binary_dataset
        x = binary_dataset("fashion", p=n, p_test=0, dtype=torch.float32)[0]
        return x[:n], "Fashion-MNIST"
    except Exception:  # noqa: BLE001 - the timing does not depend on the pixel values
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, d, generator=g)
        return x * (math.sqrt(d) / x.norm(dim=1, keepdim=True)), "Gaussian (Fashion-MNIST not found)"


def jac_gram(model, x, block=250):
    """torch.func: per-sample Jacobians in blocks into one (n, P) matrix, then one full-square Gram."""
    J = torch.cat([per_sample_jacobian(model, x[i:i + block]).flatten(1) for i in range(0, x.shape[0], block)])
    return J @ J.T


def ntk_vp_columns(model, x, cols):
    """torch.func NTK-vector products: Theta e_j = J (J^T e_j) by one vjp and one jvp, for the first cols columns."""
    from torch.func import functional_call, jvp, vjp
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p):
        return functional_call(model, p, (x,)).reshape(-1)

    out, pullback = vjp(f, params)
    res = []
    for j in range(cols):
        e = torch.zeros_like(out)
        e[j] = 1
        (g,) = pullback(e)
        res.append(jvp(f, (params,), (g,))[1])
    return torch.stack(res, 1)


class ResMLP(nn.Module):
    def __init__(self, d=784, h=512, k=1, depth=2):
        super().__init__()
        self.inp = nn.Linear(d, h)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(h), nn.Linear(h, h), nn.Tanh()) for _ in range(depth))
        self.out = nn.Linear(h, k)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = h + b(h)
        return self.out(h)


def case_cnn(n, rows, rate):
    torch.manual_seed(0)
    net = ntk_fast.CV(32, generator=torch.Generator().manual_seed(1))
    x, src = fashion(n)
    P = sum(p.numel() for p in net.parameters())
    t_ours, K = timeit(lambda: ntk_fast.empirical_ntk(net, x), warmup=1)
    plan = str(ntk_fast.ntk_plan(net, x[:n]))
    t_func, K2 = timeit(lambda: jac_gram(net, x))
    err = ((K - K2).abs().max() / K2.abs().max()).item()
    del K2
    t_grads, _ = timeit(lambda: torch.cat([per_sample_jacobian(net, x[i:i + 250]).flatten(1)
                                           for i in range(0, n, 250)]))
    floor_gram = n * n * P / rate                      # n^2 P / 2 multiply-adds = n^2 P flops
    cols = 4
    t_vp, _ = timeit(lambda: ntk_vp_columns(net, x, cols))
    rows.append(dict(case="cnn", data=src, n=n, P=P, ours_s=t_ours, torch_func_jac_gram_s=t_func,
                     torch_func_ntk_vp_s_scaled=t_vp * n / cols, ntk_vp_measured_columns=cols,
                     floor_s=floor_gram + t_grads, floor_gram_s=floor_gram, per_sample_grads_funcs_s=t_grads,
                     rel_err_vs_torch_func=err, plan=plan))


def case_resmlp(n, rows, rate, n_func=500):
    torch.manual_seed(0)
    net = ResMLP()
    x, src = fashion(n)
    P = sum(p.numel() for p in net.parameters())
    t_ours, K = timeit(lambda: ntk_fast.empirical_ntk(net, x), warmup=1)
    xs = x[:n_func]
    t_jac, J = timeit(lambda: per_sample_jacobian(net, xs).flatten(1))
    t_g, Ks = timeit(lambda: J @ J.T)
    err = ((K[:n_func, :n_func] - Ks).abs().max() / Ks.abs().max()).item()
    scaled = t_jac * n / n_func + t_g * (n / n_func) ** 2
    rows.append(dict(case="resmlp", data=src, n=n, P=P, ours_s=t_ours, torch_func_measured_n=n_func,
                     torch_func_s_scaled=scaled, torch_func_jac_s=t_jac, torch_func_gram_s=t_g,
                     rel_err_vs_torch_func=err, plan=str(ntk_fast.ntk_plan(net, x[:n]))))


def old_full(net, x):
    """The previous full mode: A repeated k times, one Gram op on (n k) rows."""
    A, D, k = ntk_fast.structured_features(net, x)
    n = x.shape[0]
    A = [a.repeat_interleave(k, dim=0) for a in A]
    D = [d.reshape(n * k, d.shape[2]) for d in D]
    return _ops.gram(A, D).reshape(n, k, n, k).permute(0, 2, 1, 3).contiguous()


def case_full10(n, rows, rate):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    x, src = fashion(n)
    t_ours, K = timeit(lambda: ntk_fast.empirical_ntk(net, x, mode="full"), warmup=1)
    t_old, K2 = timeit(lambda: old_full(net, x))
    err = ((K - K2).abs().max() / K2.abs().max()).item()
    del K2
    fans = [(785, 512), (513, 512), (513, 10)]
    floor = n * n * sum(p + 100 * q for p, q in fans) / rate
    rows.append(dict(case="full10", data=src, n=n, ours_s=t_ours, previous_path_s=t_old, previous_main_recorded_s=5.37,
                     floor_s=floor, rel_err_vs_previous=err))


def case_fc(n, rows, rate):
    net = ntk_fast.FCNet(784, 1024, 3, dtype=torch.float32, generator=torch.Generator().manual_seed(1))
    x, src = fashion(n)
    t, _ = timeit(lambda: ntk_fast.empirical_ntk(net, x), repeats=2, warmup=1)
    rows.append(dict(case="fc", data=src, n=n, ours_s=t, recorded_2026_11_22_s=0.943))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="cnn,resmlp,full10,fc")
    ap.add_argument("--quick", action="store_true", help="small n (a smoke run, not recorded)")
    ap.add_argument("--tag", default="", help="suffix of the result files")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    sizes = dict(cnn=2000, resmlp=2000, full10=1500, fc=4000)
    if args.quick:
        sizes = dict(cnn=200, resmlp=200, full10=150, fc=400)
    rate0 = mm_rate()
    rows = []
    fns = dict(cnn=case_cnn, resmlp=case_resmlp, full10=case_full10, fc=case_fc)
    for c in args.cases.split(","):
        kw = dict(n_func=min(500, sizes[c])) if c == "resmlp" else {}
        fns[c](sizes[c], rows, rate0, **kw)
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "plan"}), flush=True)
    rate1 = mm_rate()
    meta = dict(machine=MACHINE, torch=torch.__version__, threads=torch.get_num_threads(),
                mm_rate_gflops=[rate0 / 1e9, rate1 / 1e9], date=datetime.date.today().isoformat(),
                load_average=os.getloadavg(), python=platform.python_version(), quick=args.quick)
    if args.quick:
        return
    out = os.path.join(os.path.dirname(__file__), "results", f"any-model-{meta['date']}{args.tag}")
    with open(out + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    with open(out + ".md", "w") as f:
        f.write(f"# Structured NTK of any model (issue 13), {meta['date']}\n\nMachine: {MACHINE}; torch {torch.__version__}, "
                f"{meta['threads']} threads, load average {meta['load_average'][0]:.2f} at the end "
                f"(machine shared with other jobs). torch.mm rate {rate0/1e9:.0f} / {rate1/1e9:.0f} GFLOP/s "
                f"(before / after). Floors use the rate before. Times: min of the timed calls (after one warm-up "
                f"for ntk_fast).\n\n")
        for r in rows:
            f.write(f"## {r['case']} (n={r['n']}, {r['data']})\n\n| quantity | value |\n|---|---|\n")
            for k, v in r.items():
                if k not in ("case", "plan", "data", "n"):
                    f.write(f"| {k} | {v:.4g} |\n" if isinstance(v, float) else f"| {k} | {v} |\n")
            if "plan" in r:
                f.write("\n```\n" + r["plan"] + "\n```\n")
            f.write("\n")
    print("written", out + ".md")


if __name__ == "__main__":
    main()
