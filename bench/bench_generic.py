"""Side-by-side speed of the generic trainer (ntk_fast.dynamics.generic.train_any).

Three comparisons, each timed in alternated rounds (this shared machine's speed drifts), medians reported:
  * flow-cnn:   seconds per attempt of the generic adaptive flow on the paper's CNN (``ntk_fast.CV``,
                h channels, 28 x 28 inputs) against a reference-code-style loop written by us (deepcopy of the
                model every step, full-batch autograd step, gradient flattened with cat, the step-rule statistics);
  * ensemble:   K models trained together (vmap over the flat (K, P) buffer, and batched=False: the K
                models' working copies looped inside one call) against the same K models one
                after the other, for a plain nn.Module MLP (width 64, n = 1000) and the CNN;
  * adam-epoch: seconds per epoch of dynamics="adam" (batch 32) against a plain torch.optim.Adam loop on the
                reference recipe (randperm(n)[:bs], f0 once), for the MLP.
Prints a table and writes bench/results/generic_vm_<date>.json and .md (with the load average before and
after: this machine is shared).  Defaults take a few minutes.

    python bench/bench_generic.py [--rounds 3] [--n 1000] [--K 8] [--cnn-h 8] [--cases ensemble-mlp,adam]
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

from ntk_fast import CV
from ntk_fast.dynamics.generic import train_any
from ntk_fast.dynamics.losses import softhinge


def data(n, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    x = x / x.norm(dim=1, keepdim=True) * math.sqrt(d)
    return x, torch.where(torch.randn(n, generator=g) > 0, 1.0, -1.0).to(dtype)


def mlp(d, h, seed, dtype):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.Softplus(beta=5.0), nn.Linear(h, h), nn.Softplus(beta=5.0),
                         nn.Linear(h, 1)).to(dtype)


def cnn(h, seed=0, dtype=torch.float64):
    """The paper's CNN (2 blocks of 2 5x5 convolutions, h channels)."""
    return CV(h, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def reference_flow(model, x, y, alpha, attempts):
    """deepcopy per step, autograd full batch, step-rule statistics: seconds per attempt (setup included, as
    in the generic timing)."""
    t0 = time.perf_counter()
    with torch.no_grad():
        f0 = model(x).reshape(-1)

    def lg(m):
        m.zero_grad()
        F = alpha * (m(x).reshape(-1) - f0)
        (softhinge(y * F).mean() / alpha ** 2).backward()
        return F.detach(), torch.cat([p.grad.reshape(-1) for p in m.parameters()])

    F, g = lg(model)
    dt = 1.0
    for _ in range(attempts):
        saved = copy.deepcopy(model)
        with torch.no_grad():
            w = torch.nn.utils.parameters_to_vector(model.parameters())
            torch.nn.utils.vector_to_parameters(w - dt * g, model.parameters())
        F2, g2 = lg(model)
        dgrad = float((g - g2).pow(2).sum() / (g.norm() * g2.norm()))
        dout = float((F2 - F).abs().max())
        if dgrad < 1e-4 and dout < 0.1:
            F, g = F2, g2
            dt *= 1.1 if dgrad < 5e-5 and dout < 0.05 else 1.0
        else:
            model = saved
            dt /= 10
    return (time.perf_counter() - t0) / attempts


def generic_flow(models, x, y, alpha, attempts, batched=None):
    # max_steps accepted steps; the time is divided by the attempts made (rejections included)
    t0 = time.perf_counter()
    res = train_any(models, x, y, alpha, max_steps=attempts, record_rate=1.0, record_spacing=10 ** 9,
                    batched=batched)                        # records at steps 0, 1, 3, 7, 15, ...
    wall = time.perf_counter() - t0
    return wall / max(f["attempts"] for f in res.final)


def reference_adam(model, x, y, alpha, epochs, bs=32):
    t0 = time.perf_counter()
    with torch.no_grad():
        f0 = model(x).reshape(-1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps = math.ceil(epochs * len(x) / bs)
    for _ in range(steps):
        idx = torch.randperm(len(x))[:bs]
        F = alpha * (model(x[idx]).reshape(-1) - f0[idx])
        opt.zero_grad()
        (torch.relu(1 - F * y[idx]).mean() / alpha).backward()
        opt.step()
    return (time.perf_counter() - t0) / epochs


def generic_adam(model, x, y, alpha, epochs, bs=32):
    t0 = time.perf_counter()
    train_any(model, x, y, alpha, dynamics="adam", batch_size=bs, max_epochs=epochs, record_rate=1.0,
              record_spacing=10 ** 9)
    return (time.perf_counter() - t0) / epochs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--K", type=int, default=8)
    ap.add_argument("--cnn-h", type=int, default=8)
    ap.add_argument("--mlp-d", type=int, default=64, help="input dimension of the MLP cases (784: Fashion-MNIST pixels)")
    ap.add_argument("--attempts", type=int, default=20)
    ap.add_argument("--epochs", type=float, default=10.0)
    ap.add_argument("--cases", default="", help="comma-separated prefixes of the cases to run (default: all)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    dt = torch.float64
    x, y = data(args.n, 784, dt)
    xs, ys = data(args.n, args.mlp_d, dt)
    cases = {
        "flow-cnn ref (s/attempt)": lambda: reference_flow(cnn(args.cnn_h), x, y, 1.0, args.attempts),
        "flow-cnn generic (s/attempt)": lambda: generic_flow(cnn(args.cnn_h), x, y, 1.0, args.attempts),
        "ensemble-mlp vmap K (s/attempt)": lambda: generic_flow([mlp(args.mlp_d, 64, s, dt) for s in range(args.K)], xs, ys,
                                                                1.0, args.attempts, batched=True),
        "ensemble-mlp loop K (s/attempt)": lambda: generic_flow([mlp(args.mlp_d, 64, s, dt) for s in range(args.K)], xs, ys,
                                                                1.0, args.attempts, batched=False),
        "ensemble-mlp sequential K (s/attempt)": lambda: sum(generic_flow(mlp(args.mlp_d, 64, s, dt), xs, ys, 1.0,
                                                                          args.attempts) for s in range(args.K)),
        "ensemble-cnn vmap K (s/attempt)": lambda: generic_flow([cnn(args.cnn_h, s) for s in range(args.K)],
                                                                x, y, 1.0, args.attempts // 4 or 1, batched=True),
        "ensemble-cnn loop K (s/attempt)": lambda: generic_flow([cnn(args.cnn_h, s) for s in range(args.K)],
                                                                x, y, 1.0, args.attempts // 4 or 1, batched=False),
        "ensemble-cnn sequential K (s/attempt)": lambda: sum(generic_flow(cnn(args.cnn_h, s), x, y, 1.0,
                                                                          args.attempts // 4 or 1)
                                                             for s in range(args.K)),
        "adam-mlp torch.optim loop (s/epoch)": lambda: reference_adam(mlp(args.mlp_d, 64, 0, dt), xs, ys, 1.0, args.epochs),
        "adam-mlp generic (s/epoch)": lambda: generic_adam(mlp(args.mlp_d, 64, 0, dt), xs, ys, 1.0, args.epochs),
    }
    if args.cases:
        keep = tuple(args.cases.split(","))
        cases = {k: v for k, v in cases.items() if k.startswith(keep)}
    generic_flow(mlp(args.mlp_d, 8, 0, dt), xs[:10], ys[:10], 1.0, 2)       # first-call imports out of the timings,
    generic_flow([mlp(args.mlp_d, 8, s, dt) for s in range(2)], xs[:10], ys[:10], 1.0, 2, batched=True)   # vmap's too
    reference_adam(mlp(args.mlp_d, 8, 0, dt), xs[:64], ys[:64], 1.0, 1.0)   # and torch.optim's
    times = {k: [] for k in cases}
    load_before = os.getloadavg()
    for r in range(args.rounds):
        for k, fn in cases.items():
            times[k].append(fn())
            print(f"round {r} {k}: {times[k][-1]:.4g}", file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    pairs = {"flow-cnn ref / generic": ("flow-cnn ref (s/attempt)", "flow-cnn generic (s/attempt)"),
             "ensemble-mlp sequential / vmap": ("ensemble-mlp sequential K (s/attempt)",
                                                "ensemble-mlp vmap K (s/attempt)"),
             "ensemble-mlp sequential / loop": ("ensemble-mlp sequential K (s/attempt)",
                                                "ensemble-mlp loop K (s/attempt)"),
             "ensemble-cnn sequential / vmap": ("ensemble-cnn sequential K (s/attempt)",
                                                "ensemble-cnn vmap K (s/attempt)"),
             "ensemble-cnn sequential / loop": ("ensemble-cnn sequential K (s/attempt)",
                                                "ensemble-cnn loop K (s/attempt)"),
             "adam torch.optim / generic": ("adam-mlp torch.optim loop (s/epoch)", "adam-mlp generic (s/epoch)")}
    ratios = {k: med[a] / med[b] for k, (a, b) in pairs.items() if a in med and b in med}
    machine = "2-core AMD EPYC VM, no GPU (shared with other jobs)"
    out = dict(machine=machine, platform=platform.platform(), torch=torch.__version__, args=vars(args),
               times=times, median=med, ratios=ratios, threads=torch.get_num_threads(),
               loadavg_before=load_before, loadavg_after=os.getloadavg())
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, time.strftime("generic_vm_%Y%m%d-%H%M%S.json"))
    with open(path, "w") as fh:
        json.dump(out, fh, indent=1)
    with open(path[:-5] + ".md", "w") as fh:
        fh.write(markdown(out))
    for k, v in med.items():
        print(f"{k:45s} {v:.4g}")
    for k, v in ratios.items():
        print(f"{k:45s} {v:.3g}x")
    print(path)


def markdown(out) -> str:
    """The medians and ratios as a markdown table, with the machine and its load."""
    lines = [f"# bench_generic: {out['machine']}", "", f"torch {out['torch']}, {out['threads']} threads, load average "
             f"(1, 5, 15 min) {tuple(round(v, 1) for v in out['loadavg_before'])} before, "
             f"{tuple(round(v, 1) for v in out['loadavg_after'])} after; medians of {out['args']['rounds']} "
             "alternated rounds.", "", "| case | median |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" for k, v in out["median"].items()]
    lines += ["", "| ratio (> 1: the second is faster) | value |", "|---|---|"]
    lines += [f"| {k} | {v:.3g}x |" for k, v in out["ratios"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
