"""Side-by-side speed of the gradient-flow trainer.

Compares, per attempt of the adaptive step (one forward and one backward pass each):
  * ref:   a reference-code-style loop written by us (feature_lazy's train_regular, article units): a deep copy
           of the state every step, autograd through FCNet.forward, the loss, the gradient flattened with cat,
           the update and the step-rule statistics as separate passes with host reads;
  * ours:  ntk_fast.train (flat double buffers, fused flow_step / flow_loss / flow_grad_stats ops);
  * floor: the flops of one forward and one backward pass,
           2 n (d h + (L-1) h^2 + h)  +  2 n (d h + (L-1) h^2 + h) + 2 n ((L-1) h^2 + h),
           at the best rate torch.mm reaches on the step's (n, d) x (d, h) and (n, h) x (h, h) products.
Times are medians over the timed attempts, and the three are measured in alternated rounds whose medians (and
median per-round ratios) are reported: this shared machine's speed drifts from minute to minute.
Prints a table and writes JSON into bench/results/.  Defaults: n=2000, d=784, L=3, h in {100, 1000},
float32 and float64, 3 rounds; about 5 minutes.

    python bench/bench_flow.py [--steps 60] [--big-steps 23] [--h 100 1000] [--n 2000] [--out bench/results]
    python bench/bench_flow.py --device cuda --n 10000 --ensemble 10     # the GPU targets (issue 4)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time

import torch

from ntk_fast.models.fc import FCNet
from ntk_fast.dynamics.trainer import train
from ntk_fast.testing import net_flow_loop
from ntkbench_util import sync


def make_data(n, d, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    x = x / x.norm(dim=1, keepdim=True) * math.sqrt(d)
    y = torch.where(torch.randn(n, generator=g) > 0, 1.0, -1.0).to(dtype)
    x, y = x.to(device), y.to(device)
    return x, y


def reference_style(net, x, y, alpha, attempts):
    """Median seconds per attempt of the reference-code-style loop (ntk_fast.testing.net_flow_loop: deep copy of
    the state per step, autograd, separate passes with host reads), over ``attempts`` attempts."""
    r = net_flow_loop(net, x, y, alpha, max_attempts=attempts)
    return statistics.median(r["attempt_seconds"])


def ours(net, x, y, alpha, attempts):
    """Median seconds per attempt of ntk_fast.train, from the wall clock of its checkpoint records, taken every
    11 steps here (checkpoint_rate=1e3, spacing=10) as in the steady state of a real run, where they are rarer
    still; the record's own cost (a few passes over the weights) is included, spread over those steps."""
    r = train(net, x, y, alpha, max_steps=attempts + 1, progress=False, kernel_points=0,
              checkpoint_rate=1e3, checkpoint_spacing=10)
    recs = [q for q in r.history_of(0) if q["event"] == "checkpoint" and q["step"] >= 1]
    per = [(b["wall"] - a["wall"]) / (b["attempts"] - a["attempts"]) for a, b in zip(recs, recs[1:])]
    return statistics.median(per)


def mm_rate(n, d, h, dtype, reps=3, device="cpu"):
    """Best torch.mm rate (flop/s) over the step's two main shapes, (n, d) x (d, h) and (n, h) x (h, h)."""
    best = 0.0
    for k in (d, h):
        a = torch.randn(n, k, dtype=dtype, device=device)
        b = torch.randn(k, h, dtype=dtype, device=device)
        torch.mm(a, b)
        sync(device)
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.mm(a, b)
            sync(device)
            best = max(best, 2.0 * n * k * h / (time.perf_counter() - t0))
    return best


def step_flops(n, d, h, L):
    fwd = 2 * n * (d * h + (L - 1) * h * h + h)
    bwd = fwd + 2 * n * ((L - 1) * h * h + h)
    return fwd + bwd


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--d", type=int, default=784)
    ap.add_argument("--L", type=int, default=3)
    ap.add_argument("--h", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=60, help="attempts timed at h < 500")
    ap.add_argument("--big-steps", type=int, default=23, help="attempts timed at h >= 500 (>= 13: two records)")
    ap.add_argument("--rounds", type=int, default=3, help="alternated rounds of ref, ours, floor (medians reported)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the GPU targets: --device cuda --n 10000)")
    ap.add_argument("--ensemble", type=int, default=0,
                    help="K > 0: also time one batched attempt of K nets against K single-net attempts")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    rows = []
    print(f"{'h':>6} {'dtype':>8} {'ref ms':>9} {'ours ms':>9} {'floor ms':>9} {'ours/floor':>10} "
          f"{'speedup':>8} {'ref steps/s':>11} {'ours steps/s':>12}")
    for h in args.h:
        for dn in args.dtypes:
            dtype = getattr(torch, dn)
            x, y = make_data(args.n, args.d, dtype, device=args.device)
            net = FCNet(args.d, h, args.L, dtype=dtype, device=args.device, generator=torch.Generator().manual_seed(1))
            k = args.steps if h < 500 else args.big_steps
            flops = step_flops(args.n, args.d, h, args.L)
            per = []                     # rounds of (ref, ours, floor): alternated, so drift hits all three
            for _ in range(args.rounds):
                t_ref = reference_style(net, x, y, args.alpha, k)
                t_ours = ours(net, x, y, args.alpha, k)
                per.append((t_ref, t_ours, flops / mm_rate(args.n, args.d, h, dtype, device=args.device)))
            med = statistics.median
            t_ref, t_ours, floor = (med(p[i] for p in per) for i in range(3))
            over = med(p[1] / p[2] for p in per)
            speed = med(p[0] / p[1] for p in per)
            row = dict(n=args.n, d=args.d, L=args.L, h=h, dtype=dn, attempts=k, rounds=args.rounds, ref_s=t_ref,
                       ours_s=t_ours, floor_s=floor, mm_gflops=flops / floor / 1e9,
                       ours_over_floor=over, speedup=speed,
                       per_round=[dict(ref_s=a, ours_s=b, floor_s=c) for a, b, c in per])
            rows.append(row)
            print(f"{h:>6} {dn:>8} {1e3 * t_ref:>9.2f} {1e3 * t_ours:>9.2f} {1e3 * floor:>9.2f} "
                  f"{over:>10.2f} {speed:>8.2f} {1 / t_ref:>11.2f} {1 / t_ours:>12.2f}   "
                  f"(ours/floor by round: {', '.join(f'{b / c:.2f}' for _, b, c in per)})")
            if args.ensemble > 0:
                nets = [FCNet(args.d, h, args.L, dtype=dtype, device=args.device,
                              generator=torch.Generator().manual_seed(1 + j)) for j in range(args.ensemble)]
                ens = []
                for _ in range(args.rounds):
                    ens.append((ours(nets, x, y, args.alpha, k), ours(net, x, y, args.alpha, k)))
                t_ens, t_one = (statistics.median(p[i] for p in ens) for i in range(2))
                row.update(ensemble=args.ensemble, ensemble_s=t_ens, single_s=t_one,
                           ensemble_speedup=statistics.median(args.ensemble * b / a for a, b in ens))
                print(f"{'':>6} {'':>8} ensemble of {args.ensemble}: {1e3 * t_ens:.2f} ms per batched attempt vs "
                      f"{args.ensemble} x {1e3 * t_one:.2f} ms: {row['ensemble_speedup']:.2f}x")
    machine = dict(host=platform.node(), cpu=platform.processor() or platform.machine(),
                   threads=torch.get_num_threads(), torch=torch.__version__, python=platform.python_version(),
                   device=args.device,
                   gpu=torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else None)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"flow_{platform.node()}_{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as fh:
        json.dump(dict(machine=machine, args=vars(args), rows=rows), fh, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
