"""Command line: ``python -m ntk_fast <subcommand> ...`` (``--help`` on each)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import List, Optional

import numpy as np
import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def machine_info() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def cmd_gram(args: argparse.Namespace) -> int:
    """Empirical NTK Gram of the paper's FC net on Fashion-MNIST, timed against the plain-torch reference."""
    from . import data
    from .fc import FCNet
    from .ntk import empirical_ntk, fcnet_fans, gram_flops, structured_features
    from .reference import gram_reference
    from .timing import matmul_rate

    dtype = DTYPES[args.dtype]
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    print(f"loading Fashion-MNIST ({args.p} training points, seed {args.seed}) ...", flush=True)
    x, _, _, _ = data.binary_dataset("fashion", p=args.p, p_test=1, seed=args.seed, root=args.data)
    x = x.to(dtype=dtype, device=device)
    net = FCNet(x.shape[1], args.h, args.L, activation="softplus", beta=args.beta, dtype=dtype, device=device,
                generator=torch.Generator(device=device).manual_seed(args.seed))
    flops = gram_flops(fcnet_fans(x.shape[1], args.h, args.L), args.p)   # symmetric half
    rate = matmul_rate(dtype, device=device)

    t0 = time.perf_counter()
    K = empirical_ntk(net, x, progress=args.progress)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    A, D, _ = structured_features(net, x)
    t_feat = time.perf_counter() - t0
    summary = {"n": args.p, "d": x.shape[1], "h": args.h, "L": args.L, "beta": args.beta, "dtype": args.dtype,
               "device": str(device), "seconds": t_ours, "features_seconds": t_feat,
               "gram_flops_symmetric_half": flops, "gflops": flops / t_ours / 1e9,
               "matmul_gflops_measured": rate / 1e9, "fraction_of_matmul": flops / t_ours / rate,
               "machine": machine_info()}
    print(f"ntk_fast      : {t_ours:8.2f} s  ({summary['gflops']:.1f} GFLOP/s on the symmetric half, "
          f"{100 * summary['fraction_of_matmul']:.0f}% of torch.mm's {rate / 1e9:.0f} GFLOP/s; features {t_feat:.2f} s)",
          flush=True)
    if not args.no_reference:
        D = [d.reshape(d.shape[0], -1) for d in D]
        t0 = time.perf_counter()
        R = gram_reference(A, D)
        t_ref = time.perf_counter() - t0 + t_feat
        err = ((R - K).abs().max() / R.abs().max()).item()
        del R
        summary.update({"reference_seconds": t_ref, "speedup_over_reference": t_ref / t_ours,
                        "max_rel_diff_vs_reference": err})
        print(f"plain torch   : {t_ref:8.2f} s  (per-layer Grams + Hadamard, same features)")
        print(f"speedup       : {t_ref / t_ours:8.2f} x   (max relative difference {err:.1e})")
    path = os.path.join(args.out, "gram.npy")
    np.save(path, K.cpu().numpy())
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"saved {path} ({K.shape[0]} x {K.shape[1]} {args.dtype}) and summary.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ntk_fast", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("gram", help="empirical NTK Gram of the paper's FC net on Fashion-MNIST",
                       description=cmd_gram.__doc__)
    g.add_argument("--p", type=int, default=10000, help="number of training points (default 10000)")
    g.add_argument("--h", type=int, default=1000, help="width (default 1000)")
    g.add_argument("--L", type=int, default=3, help="hidden layers (default 3)")
    g.add_argument("--beta", type=float, default=5.0, help="softplus beta (default 5)")
    g.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    g.add_argument("--device", default="cpu")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--data", default=None, help="folder with the Fashion-MNIST idx files (default: Debian's)")
    g.add_argument("--out", default="runs/gram", help="output folder (gram.npy + summary.json)")
    g.add_argument("--no-reference", action="store_true", help="skip the plain-torch reference timing")
    g.add_argument("--progress", action="store_true", help="progress bar over row panels")
    g.set_defaults(func=cmd_gram)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
