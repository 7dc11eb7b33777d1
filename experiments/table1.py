"""The paper's Table 1 at reduced scale: which regime (feature, alpha sqrt(h) << 1, or lazy, >> 1) generalises
better, per architecture / dataset / dynamics.

Rows (``--rows``):
    cnn-adam   the paper's CNN (2 blocks of 2 convs, 5x5, padding 1, stride 2 first, softplus, no bias, global
               average pool), ADAM lr 1e-3, batch 32, hinge loss with 1/alpha (the paper's ADAM runs)
    fc-adam    FCNet (L = 3, softplus), same ADAM recipe
    fc-flow    FCNet (L = 3) by the adaptive gradient flow with the soft hinge (the fused trainer)
on Fashion-MNIST (``ntk_fast.data``, the paper's preprocessing and parity labels).  alpha sqrt(h) is the
paper's axis (= the reference code's alpha); the models here have a 1/sqrt(h) readout, so alpha = alpha_sqrt_h
/ sqrt(h) (h = FC width or CNN channels).  Every run stops at the margin (y F >= 1 on all training points) or
at its budget (``--max-epochs`` for ADAM, ``--max-steps`` for the flow, ``--max-wall`` seconds for both); the
test error is reported either way and the JSON records which.

Defaults (reduced scale, a few minutes on a 2-core CPU): p = 256 train, 1000 test points, 2 seeds,
alpha sqrt(h) in {0.1, 1000}, FC h = 64, CNN h = 16 channels, float32 for the ADAM rows (``--dtype``; the flow
row is float64 as the paper).  ``--paper`` sets the paper's sizes
(p = 10k, 50k test, 10 seeds, FC h = 100, CNN h = 50, 8 hours per ADAM run): meant for a GPU (``--device cuda``).

The CNN here is a local copy of the paper's ``CV`` (reference code article:archi.py) with a 1/sqrt(h) readout;
ntk_fast.models.cnn (being written in parallel) is its package home.

Writes ``<tag>.json`` (arguments, every run, the summary) and ``<tag>.md`` (mean +- std over seeds) under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
from torch import nn

from ntk_fast.data import load_dataset
from ntk_fast.dynamics.generic import train_any
from ntk_fast.dynamics.trainer import train as train_fused
from ntk_fast.models.fc import FCNet, activation_and_derivative


DTYPES = {"float32": torch.float32, "float64": torch.float64}


class LocalCV(nn.Module):
    """The paper's CNN ``CV`` (reference: L1 = 2 blocks of L2 = 2 convs, h channels, 5x5 filters, padding 1, stride 2
    on the first conv of each block, filters over sqrt(C_in 25), activation after every conv, global average
    pool, readout W ~ N(0, 1) over h).  Here the readout is over sqrt(h) (alpha_code = sqrt(h) alpha)."""

    def __init__(self, h: int = 16, in_channels: int = 1, side: int = 28, dtype=torch.float64, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.side, self.cin = side, in_channels
        chans = [in_channels, h, h, h, h]
        self.ws = nn.ParameterList([nn.Parameter(torch.randn(chans[i + 1], chans[i], 5, 5, dtype=dtype, generator=g))
                                    for i in range(4)])
        self.w = nn.Parameter(torch.randn(h, dtype=dtype, generator=g))
        self.sigma = activation_and_derivative("softplus", 5.0)[0]

    def forward(self, x):
        a = x.view(x.shape[0], self.cin, self.side, self.side)
        for i, w in enumerate(self.ws):
            a = self.sigma(nn.functional.conv2d(a, w / math.sqrt(w[0].numel()), stride=2 if i % 2 == 0 else 1,
                                                padding=1))
        return a.mean((2, 3)) @ self.w / math.sqrt(self.w.numel())


def run_one(row, a_sqrt_h, seed, data, args):
    x, y, xt, yt = data
    if row == "cnn-adam":
        h = args.cnn_h
        model = LocalCV(h, seed=seed, dtype=DTYPES[args.dtype]).to(args.device)
    else:
        h = args.fc_h
        dt = DTYPES[args.dtype] if row.endswith("adam") else torch.float64
        model = FCNet(x.shape[1], h, 3, dtype=dt, generator=torch.Generator().manual_seed(seed)).to(args.device)
    alpha = a_sqrt_h / math.sqrt(h)
    dt = next(model.parameters()).dtype
    x, y, xt, yt = (t.to(dt) for t in (x, y, xt, yt))
    t0 = time.perf_counter()
    if row.endswith("adam"):
        res = train_any(model, x, y, alpha, dynamics="adam", loss="hinge", lr=args.lr, batch_size=args.bs, seed=seed,
                        x_test=xt, y_test=yt, max_epochs=args.max_epochs, max_wall=args.max_wall, test_every=10 ** 9)
    else:
        res = train_fused(model, x, y, alpha, x_test=xt, y_test=yt, max_steps=args.max_steps, max_wall=args.max_wall,
                          progress=False, kernel_points=0)
    fin = res.final[0]
    return dict(row=row, alpha_sqrt_h=a_sqrt_h, alpha=alpha, h=h, seed=seed, status=res.status,
                test_err=fin["test_err"], train_err=fin["train_err"], train_nd=fin["train_nd"], step=fin["step"],
                t=fin["t"], epoch=fin.get("epoch"), wall=time.perf_counter() - t0, p=len(y), p_test=len(yt))


def summarise(runs, rows, alphas):
    out = []
    for row in rows:
        errs = {}
        for a in alphas:
            e = [r["test_err"] for r in runs if r["row"] == row and r["alpha_sqrt_h"] == a]
            conv = sum(r["status"] == "converged" for r in runs if r["row"] == row and r["alpha_sqrt_h"] == a)
            errs[a] = (float(np.mean(e)), float(np.std(e)), len(e), conv)
        lo, hi = min(alphas), max(alphas)
        better = "feature" if errs[lo][0] < errs[hi][0] else "lazy" if errs[hi][0] < errs[lo][0] else "tie"
        out.append(dict(row=row, errors={str(a): v for a, v in errs.items()}, better=better))
    return out


def markdown(summary, alphas, args):
    head = "| architecture, dynamics | " + " | ".join(f"test err, alpha sqrt(h) = {a:g}" for a in alphas) + \
        " | regime performing better |"
    lines = [head, "|" + "---|" * (len(alphas) + 2)]
    for s in summary:
        cells = [f"{m:.3f} +- {sd:.3f} ({c}/{n} conv.)" for m, sd, n, c in (s["errors"][str(a)] for a in alphas)]
        lines.append(f"| {s['row']} | " + " | ".join(cells) + f" | {s['better']} |")
    lines.append("")
    lines.append(f"Fashion-MNIST, p = {args.p} train, {args.p_test} test, {args.seeds} seeds, FC h = {args.fc_h} (L = 3), "
                 f"CNN h = {args.cnn_h}; ADAM lr {args.lr}, batch {args.bs}, <= {args.max_epochs} epochs; flow <= "
                 f"{args.max_steps} steps; <= {args.max_wall} s per run.  mean +- std over seeds; 'conv.' = runs that "
                 f"reached the margin.")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", nargs="+", default=["cnn-adam", "fc-adam", "fc-flow"])
    ap.add_argument("--alphas", nargs="+", type=float, default=[0.1, 1000.0], help="alpha sqrt(h) values")
    ap.add_argument("--p", type=int, default=256)
    ap.add_argument("--p-test", type=int, default=1000)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--fc-h", type=int, default=64)
    ap.add_argument("--cnn-h", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--bs", type=int, default=32)
    ap.add_argument("--max-epochs", type=float, default=100.0)
    ap.add_argument("--max-steps", type=int, default=20000)
    ap.add_argument("--max-wall", type=float, default=60.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="of the ADAM rows")
    ap.add_argument("--paper", action="store_true", help="the paper's sizes (GPU)")
    ap.add_argument("--tag", default="table1", help="file stem of the outputs")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    if args.paper:
        args.p, args.p_test, args.seeds, args.fc_h, args.cnn_h = 10000, 50000, 10, 100, 50
        args.max_epochs, args.max_steps, args.max_wall = math.inf, 10 ** 9, 8 * 3600.0
        args.alphas = [1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4]
    os.makedirs(args.out, exist_ok=True)
    runs = []
    for seed in range(args.seeds):
        data = [t.to(args.device) for t in load_dataset("fashion", p=args.p, p_test=args.p_test, seed=seed)]
        for row in args.rows:
            for a in args.alphas:
                r = run_one(row, a, seed, data, args)
                runs.append(r)
                print(json.dumps(r), file=sys.stderr, flush=True)
    summary = summarise(runs, args.rows, args.alphas)
    with open(os.path.join(args.out, args.tag + ".json"), "w") as fh:
        json.dump(dict(args=vars(args), runs=runs, summary=summary), fh, indent=1)
    md = markdown(summary, args.alphas, args)
    with open(os.path.join(args.out, args.tag + ".md"), "w") as fh:
        fh.write(md)
    print(md)


if __name__ == "__main__":
    main()
