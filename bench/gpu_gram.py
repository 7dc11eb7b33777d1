"""GPU benchmark of torch.ops.ntk_fast.gram (symmetric empirical-NTK Gram of the paper's FC net).

    python bench/gpu_gram.py OUTDIR [--n 2000 10000 30000] [--d 784] [--h 1024] [--L 3] [--reps 5]

For each n and precision (float64, float32, tf32): the op's time (CUDA events, median after warm-up),
TFLOP/s counted on the symmetric half (n^2 * sum_l (fan_in_l + fan_out_l) flops), the cuBLAS GEMM rate
measured in the same run in the same precision (torch.mm on square matrices; allow_tf32 set for tf32),
the fraction of it the op reaches, the speedup over the plain-torch reference on the same GPU (per-layer
torch.mm Grams and a Hadamard product, where memory fits) and over torch.func's Jacobian contraction
(J J^T with J from vmap(jacrev), where it fits), and the error relative to max |ref| against a float64
reference of the same inputs.  Writes OUTDIR/gpu_gram.json and OUTDIR/gpu_gram.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import ntk_fast._C  # noqa: E402,F401
from ntk_fast.models.fc import FCNet  # noqa: E402

PRECISIONS = [("float64", torch.float64, "highest"), ("float32", torch.float32, "highest"),
              ("tf32", torch.float32, "tf32")]


def cuda_time(fn, warmup=2, reps=5):
    """Median milliseconds of fn() over reps, timed with CUDA events after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def set_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def cublas_tflops(dtype, tf32, size=8192, reps=10):
    set_tf32(tf32)
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(size, size, device="cuda", dtype=dtype, generator=g)
    b = torch.randn(size, size, device="cuda", dtype=dtype, generator=g)
    c = torch.empty(size, size, device="cuda", dtype=dtype)
    ms = cuda_time(lambda: torch.mm(a, b, out=c), warmup=3, reps=reps)
    set_tf32(False)
    del a, b, c
    torch.cuda.empty_cache()
    return 2.0 * size ** 3 / (ms * 1e-3) / 1e12


def plain_reference(A, D, scales):
    out = None
    for a, d, s in zip(A, D, scales):
        term = torch.mm(a, a.T)
        term.mul_(torch.mm(d, d.T))
        if s != 1.0:
            term.mul_(s)
        if out is None:
            out = term
        else:
            out.add_(term)
            del term
    return out


def fits(bytes_needed, margin=0.85):
    free, _ = torch.cuda.mem_get_info()
    return bytes_needed < margin * free


def jacobian_ntk(net, x, chunk=250):
    """Theta = J J^T with J (n x P) from torch.func (vmap over jacrev of the scalar output)."""
    params = {k: v.detach() for k, v in net.named_parameters()}

    def f(p, xi):
        return torch.func.functional_call(net, p, (xi.unsqueeze(0),)).squeeze(0)

    jac_fn = torch.func.vmap(torch.func.jacrev(f), in_dims=(None, 0))
    P = sum(p.numel() for p in params.values())
    J = torch.empty(x.shape[0], P, dtype=x.dtype, device=x.device)
    for i in range(0, x.shape[0], chunk):
        jac = jac_fn(params, x[i:i + chunk])
        c0 = 0
        for j in jac.values():
            j = j.reshape(j.shape[0], -1)
            J[i:i + j.shape[0], c0:c0 + j.shape[1]] = j
            c0 += j.shape[1]
        del jac
    return J @ J.T


def measure_n(n, args, dev, cublas):
    """All precisions at one n: the op, the per-layer reference and (n <= --func-max-n) torch.func."""
    records = []
    torch.manual_seed(n)
    net = FCNet(args.d, args.h, args.L, dtype=torch.float32, device=dev)
    x = torch.randn(n, args.d, device=dev)
    A32, D32 = net.features(x)
    fans = [a.shape[1] for a in A32], [d.shape[1] for d in D32]
    scales = [1.0] * len(A32)
    flops_half = float(n) ** 2 * (sum(fans[0]) + sum(fans[1]))
    A64, D64 = [a.double() for a in A32], [d.double() for d in D32]
    ref64 = plain_reference(A64, D64, scales) if fits(3 * 8 * n * n) else None
    scale_ref = ref64.abs().max().item() if ref64 is not None else None

    func_ms = {}
    if n <= args.func_max_n:
        for name, dtype, prec in PRECISIONS:
            netp = FCNet(args.d, args.h, args.L, dtype=dtype, device=dev)
            netp.load_state_dict({k: v.to(dtype) for k, v in net.state_dict().items()})
            xp = x.to(dtype)
            set_tf32(prec == "tf32")
            try:
                func_ms[name] = cuda_time(lambda: jacobian_ntk(netp, xp), warmup=1, reps=3)
            except torch.cuda.OutOfMemoryError:
                func_ms[name] = None
            finally:
                set_tf32(False)
                torch.cuda.empty_cache()

    for name, dtype, prec in PRECISIONS:
        A = A64 if dtype == torch.float64 else A32
        D = D64 if dtype == torch.float64 else D32
        out = torch.empty(n, n, device=dev, dtype=dtype)
        op = lambda: torch.ops.ntk_fast.gram.out(A, D, None, None, scales, 0, prec, out=out)  # noqa: E731
        ms = cuda_time(op, reps=args.reps)
        err = None
        if ref64 is not None:
            op()
            err = ((out.double() - ref64).abs().max().item()) / scale_ref
        ref_ms = None
        if fits(3 * n * n * out.element_size()):
            set_tf32(prec == "tf32")
            try:
                ref_ms = cuda_time(lambda: plain_reference(A, D, scales), reps=args.reps)
            except torch.cuda.OutOfMemoryError:
                ref_ms = None
            finally:
                set_tf32(False)
        del out
        torch.cuda.empty_cache()
        tflops = flops_half / (ms * 1e-3) / 1e12
        rec = dict(n=n, precision=name, time_ms=ms, tflops_sym_half=tflops, cublas_tflops=cublas[name],
                   frac_cublas=tflops / cublas[name], ref_time_ms=ref_ms,
                   speedup_vs_ref=(ref_ms / ms) if ref_ms else None,
                   func_time_ms=func_ms.get(name), speedup_vs_func=(func_ms[name] / ms) if func_ms.get(name) else None,
                   rel_err_vs_f64=err, flops_sym_half=flops_half)
        records.append(rec)
        print(json.dumps(rec), flush=True)
    del A64, D64, ref64, A32, D32
    torch.cuda.empty_cache()
    return records


def markdown(records, props, args):
    """The Markdown table of the records."""
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    lines = [f"# ntk_fast gram on {props.name} (torch {torch.__version__}, d={args.d}, h={args.h}, L={args.L})", "",
             "Symmetric Gram, TFLOP/s on n^2 sum_l (fan_in + fan_out); cuBLAS = torch.mm 8192^3 in the same "
             "precision, same run; ref = per-layer torch.mm Grams + Hadamard; func = torch.func J J^T.", "",
             "| n | precision | time ms | TFLOP/s | cuBLAS TFLOP/s | frac cuBLAS | ref ms | x ref | func ms | x func "
             "| rel err |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['n']} | {r['precision']} | {r['time_ms']:.2f} | {r['tflops_sym_half']:.1f} | "
                     f"{r['cublas_tflops']:.1f} | {r['frac_cublas']:.2f} | {fmt(r['ref_time_ms'], '.2f')} | "
                     f"{fmt(r['speedup_vs_ref'], '.2f')} | {fmt(r['func_time_ms'], '.1f')} | "
                     f"{fmt(r['speedup_vs_func'], '.1f')} | {fmt(r['rel_err_vs_f64'], '.2e')} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir")
    ap.add_argument("--n", type=int, nargs="+", default=[2000, 10000, 30000])
    ap.add_argument("--d", type=int, default=784)
    ap.add_argument("--h", type=int, default=1024)
    ap.add_argument("--L", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--func-max-n", type=int, default=2000, help="largest n for the torch.func comparison")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_gram.py: no CUDA GPU", file=sys.stderr)
        return 2
    os.makedirs(args.outdir, exist_ok=True)
    set_tf32(False)
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)

    cublas = {}
    for name, dtype, prec in PRECISIONS:
        cublas[name] = cublas_tflops(dtype, prec == "tf32")
        print(f"cuBLAS {name}: {cublas[name]:.1f} TFLOP/s", flush=True)

    records = []
    for n in args.n:
        records += measure_n(n, args, dev, cublas)

    meta = dict(device=props.name, sm_count=props.multi_processor_count, total_memory_gb=props.total_memory / 2 ** 30,
                torch=torch.__version__, cuda=torch.version.cuda, d=args.d, h=args.h, L=args.L,
                date=datetime.datetime.now().isoformat(timespec="seconds"), cublas_tflops=cublas,
                flops_counted="n^2 * sum_l (fan_in_l + fan_out_l) (the symmetric half)")
    with open(os.path.join(args.outdir, "gpu_gram.json"), "w") as f:
        json.dump(dict(meta=meta, results=records), f, indent=1)

    md = markdown(records, props, args)
    with open(os.path.join(args.outdir, "gpu_gram.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
