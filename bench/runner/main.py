"""Side-by-side benchmark: the empirical NTK Gram of the paper's FC net by ntk_fast and by the alternatives.

    python -m ntk_fast bench --n 4000 --h 1024            # one table (d=784, L=3, float32 by default)
    python -m ntk_fast bench --n 500 1000 2000 4000 --h 256 512 1024 --plot   # sweeps + log-log plot
    python -m bench.runner ...                           # the same, from the repository root

Every method computes the same kernel, Theta(x_i, x_j) = sum_p df(x_i)/dw_p df(x_j)/dw_p of the FC net
z1 = W0 x / sqrt(d), z(l+1) = W(l) sigma(z(l)) / sqrt(h), f = W(L) sigma(z(L)) / sqrt(h) (no bias, k = 1,
sigma = c softplus(beta z) / beta, c = 1.40438 for beta = 5) with the same weights and the same points
(x2 = x1, the symmetric case), and is checked against ntk_fast's float64 Gram (column "max rel err").

Methods (``--methods``, default all):
  ntk_fast        ntk_fast.empirical_ntk(net, x): features (one forward, one backward pass) + the fused Gram op
  reference       plain torch, structured: the same features, per-layer Grams (D D^T) o (A A^T), summed
  func_jacobian   torch.func vmap(jacrev) per-sample Jacobians in row blocks, contracted block by block
                  (upper blocks only, column blocks recomputed; whole Jacobian at once when it fits the block)
  func_ntvp       torch.func NTK-vector products: columns K e_j = J (J^T e_j) by vmap over vjp then jvp
  neural_tangents neural-tangents 0.6.5 empirical_ntk_fn, STRUCTURED_DERIVATIVES, jax.jit (own venv, subprocess)
  nngeometry      nngeometry GramMatrix(..., representation=FMatDense) (in-process, or the peers venv)
  asdl            ASDL (PyPI asdfghjkl) kernel.batch(empirical_class_wise_hadamard_ntk, ...) (likewise)
  brute_force     reference-code style: one backward pass per point, dense Jacobian product J J^T, over
                  parameter groups of at most 2e9 bytes of Jacobian (as the paper's code does)

Timing: median of ``--repeats`` calls after ``--warmup`` calls.  Each method ramps up through n/2^k, from the
first size >= ``--probe-n``, one call per size; it stops below n when the next size's predicted time (the last
time scaled by the method's flop model) exceeds ``--max-seconds`` per call, or its memory model exceeds
``--max-memory-gb``.  It is then measured at the last size and its time extrapolated to n with its flop model
(marked "extrap."; its rate, memory and error are those of the measured size).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from typing import List, Optional

import torch

from ntk_fast.diagnostics.machine import matmul_rate

from .case import run_case
from .machine import busy_warning, machine_dict, machine_slug
from .methods import ALL_METHODS
from .plot import plot_results
from .ramp import fix_malloc
from .report import markdown
from .subprocess_runner import REPO, default_python


# ------------------------------------------------------------------------------------------ main

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ntk_fast bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[4000], help="points (several: a sweep)")
    p.add_argument("--h", type=int, nargs="+", default=[1024], help="widths (several: a sweep)")
    p.add_argument("--d", type=int, default=784)
    p.add_argument("--L", type=int, default=3)
    p.add_argument("--beta", type=float, default=5.0)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--methods", default=",".join(ALL_METHODS),
                   help="comma-separated subset of " + ",".join(ALL_METHODS))
    p.add_argument("--skip", default="", help="comma-separated methods to leave out")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--probe-n", type=int, default=64, help="smallest size of the ramp (n/2^k >= it)")
    p.add_argument("--max-seconds", type=float, default=30.0, help="time limit of one call (else extrapolate)")
    p.add_argument("--max-memory-gb", type=float, default=12.0, help="memory limit (else extrapolate)")
    p.add_argument("--brute-max-n", type=int, default=512, help="largest n for the brute force")
    p.add_argument("--jac-block", type=int, default=None, help="points per Jacobian block (default ~0.5 GB)")
    p.add_argument("--ntvp-block", type=int, default=None, help="columns per vmap of NTK-vector products")
    p.add_argument("--peer-block", type=int, default=None, help="nngeometry/ASDL batch size (default: n)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--matmul-n", type=int, default=2048, help="size of the square torch.mm rate measurement")
    p.add_argument("--peers-python", default=default_python("NTK_FAST_PEERS_PYTHON", (".venv-peers", "venv-peers")),
                   help="Python of a venv with nngeometry/asdfghjkl (used when they are not importable here)")
    p.add_argument("--peers-subprocess", action="store_true",
                   help="run nngeometry/ASDL in the peers venv even when importable here")
    p.add_argument("--nt-python", default=default_python("NTK_FAST_NT_PYTHON", (".venv-nt", "venv-nt")),
                   help="Python of the neural-tangents venv (scripts/setup_peers.sh creates it with its pins)")
    p.add_argument("--out-dir", default=None, help="folder of the results (default bench/results of the repo)")
    p.add_argument("--tag", default=None, help="suffix of the result files (default from n, h, dtype)")
    p.add_argument("--no-save", action="store_true", help="print only")
    p.add_argument("--plot", action="store_true", help="write the log-log plot (PNG; default for sweeps)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--no-malloc-tuning", action="store_true",
                   help="leave glibc's malloc as it is (by default large freed blocks go back to the OS, for the "
                        "peak-memory column; the setting stays for the rest of the process)")
    return p


def _measure_all(args, methods: List[str], log) -> dict:
    """Every case (h x n), with the torch.mm rate measured before and after (the larger one is used)."""
    dtype = getattr(torch, args.dtype)
    machine = machine_dict()
    result = {"what": "empirical NTK Gram of the paper's FC net, ntk_fast vs alternatives, symmetric case",
              "date": datetime.date.today().isoformat(), "machine": machine,
              "config": {k: v for k, v in vars(args).items()}, "cases": []}
    if busy_warning(machine):
        log(busy_warning(machine).replace("**", ""))
    log(f"measuring torch.mm ({args.dtype}, {args.matmul_n}^2) ...")
    samples = [matmul_rate(dtype, n=args.matmul_n)]
    rates = {args.dtype: max(samples)}
    for h in args.h:
        for n in args.n:
            log(f"case n={n} h={h} d={args.d} L={args.L} {args.dtype}")
            result["cases"].append(run_case(n, h, args, methods, rates, log))
    samples.append(matmul_rate(dtype, n=args.matmul_n))
    rates[args.dtype] = max(samples)
    # rates are final only now: recompute the percentages against the larger measurement
    for case in result["cases"]:
        for r in case["rows"]:
            if r["gflops"] is not None:
                r["pct_matmul"] = 100.0 * r["gflops"] * 1e9 / rates[args.dtype]
    result["matmul_gflops"] = {k: v / 1e9 for k, v in rates.items()}
    result["matmul_gflops_samples"] = [s / 1e9 for s in samples]
    return result


def _save(args, result: dict, md: str) -> None:
    """<out-dir>/<machine>-<date>-<tag>.{json,md} (and .png for sweeps or --plot)."""
    out_dir = args.out_dir or os.path.join(REPO if os.path.isdir(os.path.join(REPO, "bench")) else os.getcwd(),
                                           "bench", "results")
    os.makedirs(out_dir, exist_ok=True)
    sweep = len(args.n) > 1 or len(args.h) > 1
    tag = args.tag or (f"sweep-n{min(args.n)}-{max(args.n)}-h{min(args.h)}-{max(args.h)}-{args.dtype}" if sweep
                       else f"n{args.n[0]}-h{args.h[0]}-{args.dtype}")
    base = os.path.join(out_dir, f"{machine_slug()}-{result['date']}-{tag}")
    if args.plot or sweep:
        png = plot_results(result, base + ".png")
        result["plot"] = os.path.basename(png) if png else None
        if png:
            md += f"\n![time per method]({os.path.basename(png)})\n"
        else:
            md += "\n(no plot: matplotlib is not installed here nor in the peers venv)\n"
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=2, default=str)
    with open(base + ".md", "w") as f:
        f.write(md)
    print(f"saved {base}.json, {base}.md" + (f", {base}.png" if result.get("plot") else ""))


def main(argv: Optional[List[str]] = None) -> int:
    """Run the benchmark (arguments as on the command line); 0 on success, 2 on bad arguments."""
    args = build_parser().parse_args(argv)
    if not args.no_malloc_tuning:
        fix_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    skip = {m.strip() for m in args.skip.split(",") if m.strip()}
    bad = [m for m in methods + sorted(skip) if m not in ALL_METHODS]
    if bad:
        print(f"error: unknown method(s) {bad}; choose from {', '.join(ALL_METHODS)}", file=sys.stderr)
        return 2
    methods = [m for m in methods if m not in skip]
    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    result = _measure_all(args, methods, log)
    argv_s = " ".join(sys.argv[1:]) if argv is None else " ".join(argv)
    result["command"] = f"python -m ntk_fast bench {argv_s}".strip()
    md = markdown(result)
    print()
    print(md)
    if not args.no_save:
        _save(args, result, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
