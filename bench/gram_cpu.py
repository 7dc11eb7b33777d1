"""CPU Gram benchmark of issue 2: the fused op vs the plain-torch reference, in one run.

    python bench/gram_cpu.py [--n 4000] [--d 784] [--h 1024] [--L 3] [--dtype float32] [--repeats 3]

Counts the flops of the symmetric half, n^2 sum_l (fan_in_l + fan_out_l), and reports the achieved rate
as a fraction of torch.mm's rate measured in the same run; peak memory (VmHWM, reset before the call, after a
small warm-up call so that BLAS buffers and code pages are not counted) is measured in a child process per method,
against Gram + features.  Writes JSON and markdown under
bench/results/.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

CHILD = r"""
import sys, torch, ntk_fast
from ntk_fast.ops.reference import gram_reference
from ntk_fast.ntk.empirical import fcnet_fans
method, n, d, h, L, dt = sys.argv[1], *map(int, sys.argv[2:6]), sys.argv[6]
dtype = getattr(torch, dt)
g = torch.Generator().manual_seed(0)
fans = fcnet_fans(d, h, L)
A = [torch.randn(n, p, generator=g, dtype=dtype) for p, _ in fans]
D = [torch.randn(n, q, generator=g, dtype=dtype) for _, q in fans]
def rss(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
run = (lambda a, d: ntk_fast.gram(a, d)) if method == 'ntk_fast' else (lambda a, d: gram_reference(a, d))
w0 = rss('VmRSS:')
run([t[:600] for t in A], [t[:600] for t in D])   # warm-up at the same tile size: BLAS's per-thread
warm = rss('VmHWM:') - w0                         # buffers and code pages are allocated once per process
base = rss('VmRSS:')
open('/proc/self/clear_refs', 'w').write('5')
K = run(A, D)
print(rss('VmHWM:') - base, warm)
"""


def peak_bytes(method, n, d, h, L, dtype):
    r = subprocess.run([sys.executable, "-c", CHILD, method, str(n), str(d), str(h), str(L), dtype],
                       capture_output=True, text=True, check=True)
    peak, warm = r.stdout.strip().splitlines()[-1].split()
    return int(peak), int(warm)


def main():
    import ntk_fast
    from ntk_fast.diagnostics.machine import machine_info, matmul_rate, time_call
    from ntk_fast.ntk.empirical import fcnet_fans, gram_flops
    from ntk_fast.ops.reference import gram_reference

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--d", type=int, default=784)
    ap.add_argument("--h", type=int, default=1024)
    ap.add_argument("--L", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--tag", default=None, help="name of the result files (default cpu-gram-<dtype>-<date>)")
    args = ap.parse_args()

    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    fans = fcnet_fans(args.d, args.h, args.L)
    A = [torch.randn(args.n, p, generator=g, dtype=dtype) for p, _ in fans]
    D = [torch.randn(args.n, q, generator=g, dtype=dtype) for _, q in fans]
    flops = gram_flops(fans, args.n)
    esize = A[0].element_size()
    gram_bytes = args.n * args.n * esize
    feat_bytes = sum(t.numel() for t in A + D) * esize

    rate = matmul_rate(dtype)
    t_ours = sorted(time_call(lambda: ntk_fast.gram(A, D), repeats=args.repeats))
    t_ref = sorted(time_call(lambda: gram_reference(A, D), repeats=args.repeats))
    rate_after = matmul_rate(dtype)
    err = ((ntk_fast.gram(A, D).double() - gram_reference([a.double() for a in A], [x.double() for x in D])).abs().max()
           / gram_reference([a.double() for a in A], [x.double() for x in D]).abs().max()).item()
    med = lambda ts: ts[len(ts) // 2]
    res = {
        "what": "ntk_fast.gram vs plain-torch reference (per-layer Grams + Hadamard), symmetric case",
        "command": "python bench/gram_cpu.py " + " ".join(sys.argv[1:]),
        "date": datetime.date.today().isoformat(), "machine": machine_info(),
        "n": args.n, "d": args.d, "h": args.h, "L": args.L, "dtype": args.dtype,
        "flops_symmetric_half": flops,
        "matmul_gflops_before": rate / 1e9, "matmul_gflops_after": rate_after / 1e9,
        "ntk_fast_seconds": t_ours, "reference_seconds": t_ref,
        "ntk_fast_gflops": flops / med(t_ours) / 1e9,
        "fraction_of_matmul": flops / med(t_ours) / max(rate, rate_after),
        "speedup": med(t_ref) / med(t_ours), "max_rel_error_vs_float64": err,
        "gram_bytes": gram_bytes, "feature_bytes": feat_bytes,
    }
    if not args.no_memory:
        for m in ("ntk_fast", "reference"):
            res[f"{m}_peak_extra_bytes"], res[f"{m}_warmup_call_peak_bytes"] = peak_bytes(
                m, args.n, args.d, args.h, args.L, args.dtype)
        res["ntk_fast_peak_over_gram_plus_features"] = (res["ntk_fast_peak_extra_bytes"] + feat_bytes) / (gram_bytes + feat_bytes)
    tag = args.tag or f"cpu-gram-{args.dtype}-n{args.n}-{res['date']}"
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", tag + ".json"), "w") as f:
        json.dump(res, f, indent=2)
    lines = [f"# {res['what']}", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads. Command: `{res['command']}`. Date {res['date']}.", "",
             f"n={args.n}, d={args.d}, h={args.h}, L={args.L}, {args.dtype}; flops (symmetric half) = {flops:.3e}", "",
             "| method | median s | GFLOP/s (sym. half) | % of torch.mm | peak extra memory |", "|---|---|---|---|---|"]
    for m, ts in (("ntk_fast.gram", t_ours), ("plain torch reference", t_ref)):
        key = "ntk_fast" if m.startswith("ntk") else "reference"
        mem = res.get(f"{key}_peak_extra_bytes")
        lines.append(f"| {m} | {med(ts):.3f} | {flops / med(ts) / 1e9:.1f} | "
                     f"{100 * flops / med(ts) / max(rate, rate_after):.0f}% | "
                     f"{'' if mem is None else f'{mem / 2**20:.0f} MiB'} |")
    lines += ["", f"torch.mm rate measured in the same run: {rate / 1e9:.0f} GFLOP/s before, {rate_after / 1e9:.0f} after "
              "(the larger is used).", f"Speedup over the reference: {res['speedup']:.2f}x. "
              f"Max relative error vs float64: {err:.1e}.",
              f"Gram {gram_bytes / 2**20:.0f} MiB, features {feat_bytes / 2**20:.0f} MiB"
              + ("" if args.no_memory else f"; peak of the op / (Gram + features) = "
                 f"{res['ntk_fast_peak_over_gram_plus_features']:.3f} (after a warm-up call on 600 points, "
                 f"whose own peak, {res['ntk_fast_warmup_call_peak_bytes'] / 2**20:.0f} MiB, is mostly BLAS's "
                 "per-thread buffers allocated once per process)") + "."]
    with open(os.path.join(HERE, "results", tag + ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
