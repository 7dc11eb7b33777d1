"""Command line: ``python -m ntk_fast <subcommand> ...`` (``--help`` on each).

Subcommands: gram (NTK Gram timing, the README's main job), train (the alpha-scaled net: FC, CNN or
Wide-ResNet, by gradient flow, ADAM or SGD),
kernel (frozen-kernel dynamics), sweep (grid over alpha, h and seeds), bench (the benchmark runner),
demo (a tiny end-to-end example on scikit-learn's digits) and doctor (self-check of the compiled ops).  Article notation: last layer over sqrt(h),
F = alpha (f - f0); the reference code's alpha is alpha sqrt(h) (``--alpha-sqrt-h``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import List, Optional

import numpy as np
import torch

from ntk_fast.data import DTYPES
from ntk_fast.diagnostics.machine import machine_info


def cmd_gram(args: argparse.Namespace) -> int:
    """Empirical NTK Gram of the paper's FC net on Fashion-MNIST (or --dataset), timed against the plain-torch
    reference; writes gram.npy and summary.json to --out.  Under ``torchrun --nproc_per_node N``, with
    --to-disk, or for a Gram above 2 GiB, the Gram is streamed to --out/gram.npy tile by tile across the
    ranks (resumable: run the same command again after a kill), after a check of the free disk space, with
    the reference off unless --reference; summary.json then holds per-rank timings (docs/distributed.md)."""
    from ntk_fast.distributed import commands as dc

    dtype = DTYPES[args.dtype]
    device = torch.device(args.device)
    nbytes = float(args.p) ** 2 * torch.empty(0, dtype=dtype).element_size()
    stream = args.to_disk or dc.torchrun_world() > 1 or nbytes > dc.STREAM_ABOVE_BYTES
    reference = args.reference or (not args.no_reference and not stream)
    if stream and not os.path.exists(os.path.join(args.out, "gram.npy")):
        dc.check_free_space(args.out, nbytes)                  # before any work
    with dc.process_group(device, args.pg_timeout):
        return _gram(args, dtype, device, stream, reference)


def _gram(args: argparse.Namespace, dtype: torch.dtype, device: torch.device, stream: bool, reference: bool) -> int:
    from ntk_fast import data
    from ntk_fast.distributed import commands as dc
    from ntk_fast.distributed.comm import rank_world
    from ntk_fast.models.fc import FCNet
    from ntk_fast.ntk.empirical import empirical_ntk, fcnet_fans, gram_flops, structured_features
    from ntk_fast.ops.reference import gram_reference
    from ntk_fast.diagnostics.machine import matmul_rate

    rank, _ = rank_world()
    say = print if rank == 0 else (lambda *a, **k: None)
    os.makedirs(args.out, exist_ok=True)
    say(f"loading {args.dataset} ({args.p} training points, seed {args.seed}) ...", flush=True)
    x, y, _, _ = data.binary_dataset(args.dataset, p=args.p, p_test=1, seed=args.seed, root=args.data)
    x = x.to(dtype=dtype, device=device)
    net = FCNet(x.shape[1], args.h, args.L, activation="softplus", beta=args.beta, dtype=dtype, device=device,
                generator=torch.Generator(device=device).manual_seed(args.seed))
    fans = fcnet_fans(x.shape[1], args.h, args.L)
    flops_gram = gram_flops(fans, args.p)                                # symmetric half of the Gram
    n_weights = sum(p * q for p, q in fans)
    flops_feat = 2.0 * args.p * n_weights + 2.0 * args.p * (n_weights - x.shape[1] * args.h)  # forward + deltas
    flops = flops_gram + flops_feat
    summary = {"n": args.p, "d": x.shape[1], "h": args.h, "L": args.L, "beta": args.beta, "dtype": args.dtype,
               "device": str(device), "gram_flops_symmetric_half": flops_gram, "feature_flops": flops_feat,
               "machine": machine_info()}
    if stream:
        summary.update(dc.gram_to_folder(net, x, y, args.out, args.tile, True if args.progress else None))
        summary["gflops"] = flops / summary["seconds"] / 1e9
        say(f"ntk_fast      : {summary['seconds']:8.2f} s on {summary['world_size']} rank(s), "
            f"{summary['tiles_this_run']} tiles ({summary['gflops']:.1f} GFLOP/s), Gram in {summary['path']}", flush=True)
        if reference and rank == 0:
            summary.update(dc.reference_check(net, x, summary["path"]))
            say(f"plain torch   : {summary['reference_seconds']:8.2f} s  (max relative difference "
                f"{summary['max_rel_diff_vs_reference']:.1e})")
        if rank == 0:
            with open(os.path.join(args.out, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
            say(f"saved {summary['path']}, labels.npy and summary.json")
        return 0
    rate = matmul_rate(dtype, device=device)
    t0 = time.perf_counter()
    K = empirical_ntk(net, x, progress=args.progress)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    A, D, _ = structured_features(net, x)
    t_feat = time.perf_counter() - t0
    summary.update({"seconds": t_ours, "features_seconds": t_feat, "gflops": flops / t_ours / 1e9,
                    "matmul_gflops_measured": rate / 1e9, "fraction_of_matmul": flops / t_ours / rate})
    print(f"ntk_fast      : {t_ours:8.2f} s  ({summary['gflops']:.1f} GFLOP/s counting the features and the Gram's symmetric half, "
          f"{100 * summary['fraction_of_matmul']:.0f}% of torch.mm's {rate / 1e9:.0f} GFLOP/s; features {t_feat:.2f} s)",
          flush=True)
    if reference:
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
    np.save(os.path.join(args.out, "labels.npy"), y.cpu().numpy())
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"saved {path} ({K.shape[0]} x {K.shape[1]} {args.dtype}), labels.npy and summary.json")
    return 0


# ------------------------------------------------------------------------------------------------ runs
def _alpha_from(args: argparse.Namespace, h: int) -> float:
    """alpha (article) from --alpha or --alpha-sqrt-h (= alpha sqrt(h), the reference code's alpha)."""
    if args.alpha_sqrt_h is not None:
        return args.alpha_sqrt_h / math.sqrt(h)
    return args.alpha


def _config_from(args: argparse.Namespace, **over) -> "RunConfig":
    """The RunConfig of the parsed arguments.  Defaults that depend on the model or the dynamics: --loss
    (softhinge for the flow, hinge for ADAM/SGD: the paper's ADAM runs) and --kernel-points (256 for the FC
    net, 0 (off) for the CNN and the ResNet: see ntk_fast.dynamics.trainer.train)."""
    from ntk_fast.runs.experiment import RunConfig
    h = over.pop("h", args.h)
    alpha = over.pop("alpha", None)
    dynamics = getattr(args, "dynamics", "flow")
    from ntk_fast.dynamics.generic.losses import default_loss
    loss = args.loss or default_loss(dynamics)
    kernel_points = args.kernel_points if args.kernel_points is not None else 256 if args.model == "fc" else 0
    cfg = RunConfig(dataset=args.dataset, p=args.p, p_test=args.p_test, data_seed=args.data_seed, d=args.d or None,
                    whitening=not args.no_whitening, data_root=args.data, h=h, L=args.L, act_beta=args.act_beta,
                    seed=args.seed, ensemble=args.ensemble,
                    alpha=alpha if alpha is not None else _alpha_from(args, h),
                    loss=loss, loss_beta=args.loss_beta, max_dgrad=args.max_dgrad, max_dout=args.max_dout,
                    tau=args.tau, max_time=args.max_time, max_steps=args.max_steps, max_wall=args.max_wall,
                    kernel_points=kernel_points, dtype=args.dtype, device=args.device,
                    checkpoint_every=args.checkpoint_every, model=args.model, depth=args.depth, dynamics=dynamics,
                    lr=getattr(args, "lr", 1e-3), batch_size=getattr(args, "batch_size", 32),
                    momentum=getattr(args, "momentum", 0.0), max_epochs=getattr(args, "epochs", None))
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def _print_summary(s: dict) -> None:
    line = [f"alpha={s['alpha']:.4g} (alpha*sqrt(h)={s['alpha_sqrt_h']:.4g}) h={s['h']}"]
    if "train" in s:
        t = s["train"]
        line.append(f"status={s.get('status')} steps={t.get('step')} t={_g(t.get('t'))} "
                    f"test_err={_g(t.get('test_err'))} kernel_change={_g(t.get('kernel_change'))}")
        if s.get("ensemble"):
            e = s["ensemble"]
            line.append(f"ensemble: K={e.get('K')} ens_err={_g(e.get('ens_err'))} var={_g(e.get('var'))}")
    for name in ("init_kernel", "final_kernel"):
        if name in s:
            k = s[name]
            line.append(f"{name}: status={k.get('status')} test_err={_g(k.get('test_err'))} "
                        f"gap_vs_net={_g(k.get('test_output_gap_vs_net'))}")
    print("\n  ".join(line), flush=True)


def _g(v) -> str:
    return f"{v:.4g}" if isinstance(v, (int, float)) else str(v)


def cmd_train(args: argparse.Namespace) -> int:
    """Train the alpha-scaled model (--model fc: the FC net, cnn: the paper's CNN, resnet: the Wide-ResNet without
    batch norm) by the paper's adaptive gradient flow, or by ADAM / SGD on minibatches (--dynamics; --lr,
    --batch-size, --momentum, --epochs) (ntk_fast.dynamics.trainer.train) until every training point has
    y F >= 1 (or a budget runs out); optionally also the frozen-kernel runs with Theta(w0)
    (--init-kernel) and Theta(w_T) (--final-kernel).  Writes config.json, train.pt/.json, outputs.pt and
    summary.json to --out; an interrupted run resumes from its checkpoint when run again."""
    from ntk_fast.runs.experiment import run_experiment
    cfg = _config_from(args, init_kernel=args.init_kernel, final_kernel=args.final_kernel)
    s = run_experiment(cfg, args.out, progress=False if args.no_progress else None)
    _print_summary(s)
    print(f"run folder: {args.out}")
    return 0


def cmd_kernel(args: argparse.Namespace) -> int:
    """Frozen-kernel dynamics dF/dt = -(1/n) Theta (l'(y F) y) with Theta the empirical NTK at initialisation
    (ntk_fast.dynamics.solver.frozen_kernel_run), same loss, step rule and stop as the trainer: the lazy limit.
    Writes config.json, init_kernel.json, outputs.pt and summary.json to --out."""
    if args.gram is not None:
        return _kernel_on_disk(args)
    from ntk_fast.runs.experiment import run_experiment
    cfg = _config_from(args, regular=False, init_kernel=True, final_kernel=False)
    s = run_experiment(cfg, args.out, progress=False if args.no_progress else None)
    _print_summary(s)
    print(f"run folder: {args.out}")
    return 0


def _kernel_on_disk(args: argparse.Namespace) -> int:
    """kernel --gram DIR: kernel_flow on the on-disk Gram (ntk_fast.distributed.commands.kernel_on_folder)."""
    from ntk_fast.distributed import commands as dc
    from ntk_fast.distributed.comm import rank_world
    with dc.process_group(torch.device("cpu"), args.pg_timeout):
        s = dc.kernel_on_folder(args)
        if rank_world()[0] == 0:
            with open(os.path.join(args.out, "summary.json"), "w") as f:
                json.dump(s, f, indent=2)
            print(f"status={s['status']} steps={s['steps']} t={[_g(v) for v in s['t']]} train_err={_g(s['train_err'])} "
                  f"on {s['world_size']} rank(s) in {s['seconds']:.2f} s", flush=True)
            print(f"run folder: {args.out}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Grid of runs over alpha (or alpha*sqrt(h)), h and seeds, one run folder each under --out.  Finished runs
    (summary.json present) are skipped, interrupted ones resume from their checkpoint; --jobs N runs N
    processes at once; a file named 'stop' in --out stops launching new runs.  Writes --out/sweep.json
    (the grid) and --out/results.json (one summary line per finished run)."""
    from ntk_fast.runs.sweep import grid_configs, run_sweep
    if (args.alphas is None) == (args.alphas_sqrt_h is None):
        print("error: give exactly one of --alphas and --alphas-sqrt-h", file=sys.stderr)
        return 2
    cfgs = grid_configs(lambda **kw: _config_from(args, **kw), hs=args.hs, seeds=args.seeds,
                        alphas=args.alphas, alphas_sqrt_h=args.alphas_sqrt_h,
                        init_kernel=args.init_kernel, final_kernel=args.final_kernel)
    res = run_sweep(cfgs, args.out, jobs=args.jobs, progress=False if args.no_progress else None, threads=args.threads)
    print(f"{res['done']} runs done ({res['skipped']} skipped as finished, {res['failed']} failed) in {args.out}")
    return 0 if res["failed"] == 0 else 1


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cmd_bench(args: argparse.Namespace) -> int:
    """The side-by-side benchmark runner of a source checkout (bench/runner/, also ``python -m bench.runner``);
    every argument after 'bench' goes to it (``python -m ntk_fast bench --help`` shows its options)."""
    return run_bench(list(args.bench_args))


def run_bench(argv: List[str]) -> int:
    """Launch bench/runner/main.py with ``argv``; exit status 2 and a message where bench/ is absent."""
    if not os.path.isfile(os.path.join(REPO, "bench", "runner", "main.py")):
        print(f"error: the benchmark runner lives in the source repository (bench/runner/), which this installation "
              f"({REPO}) does not have; run `python -m ntk_fast bench` from a clone of the repository "
              "(pip install -e . there)", file=sys.stderr)
        return 2
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    from bench.runner.main import main as bench_main
    if argv[:1] == ["--"]:
        argv = argv[1:]
    return int(bench_main(argv) or 0)


def cmd_demo(args: argparse.Namespace) -> int:
    """A tiny end-to-end example in seconds: scikit-learn's 8x8 digits (odd vs even), an FC net with h=--h,
    trained in the feature regime (alpha*sqrt(h) = 0.1) and the lazy regime (alpha*sqrt(h) = 1000), with the
    frozen-kernel run at initialisation.  Prints test errors, the kernel change and
    the trainer/kernel gap; writes a run folder per regime under --out and --out/demo.json."""
    from ntk_fast.runs.experiment import RunConfig, run_experiment, write_json
    rows = []
    for regime, a_sqrt_h in (("feature", 0.1), ("lazy", 1000.0)):
        cfg = RunConfig(dataset="digits", p=args.p, p_test=args.p_test, h=args.h, L=args.L, seed=args.seed,
                        alpha=a_sqrt_h / math.sqrt(args.h), init_kernel=True, dtype="float64",
                        max_wall=args.max_wall)
        print(f"== {regime} regime: alpha*sqrt(h) = {a_sqrt_h:g}", flush=True)
        s = run_experiment(cfg, os.path.join(args.out, regime), progress=False if args.no_progress else None)
        _print_summary(s)
        rows.append({"regime": regime, "alpha_sqrt_h": a_sqrt_h, "status": s.get("status"),
                     "test_err": s["train"].get("test_err"), "kernel_change": s["train"].get("kernel_change"),
                     "init_kernel_test_err": s.get("init_kernel", {}).get("test_err"),
                     "gap_vs_kernel": s.get("init_kernel", {}).get("test_output_gap_vs_net")})
    write_json(os.path.join(args.out, "demo.json"), {"runs": rows})
    print(f"{'regime':8s} {'a*sqrt(h)':>9s} {'test err':>9s} {'|dTheta|/|Theta|':>16s} {'kernel err':>10s} {'gap':>8s}")
    for r in rows:
        print(f"{r['regime']:8s} {r['alpha_sqrt_h']:9g} {_g(r['test_err']):>9s} {_g(r['kernel_change']):>16s} "
              f"{_g(r['init_kernel_test_err']):>10s} {_g(r['gap_vs_kernel']):>8s}")
    print(f"wrote {os.path.join(args.out, 'demo.json')}")
    return 0


# ---------------------------------------------------------------------------------------------- parser
def _add_run_args(p: argparse.ArgumentParser, single: bool = True, minibatch: bool = True) -> None:
    from .data import DATASETS
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default="digits",
                   help="dataset (default digits: scikit-learn's 8x8 digits, bundled)")
    g.add_argument("--data", default=None, help="folder of a file-based dataset (see ntk_fast.data)")
    g.add_argument("--p", type=int, default=500, help="training points (default 500)")
    g.add_argument("--p-test", type=int, default=1000, help="test points (default 1000)")
    g.add_argument("--data-seed", type=int, default=0, help="per-class shuffle seed (default 0)")
    g.add_argument("--d", type=int, default=None, help="PCA dimension (default: no PCA)")
    g.add_argument("--no-whitening", action="store_true", help="PCA without whitening")
    g = p.add_argument_group("network")
    g.add_argument("--model", choices=("fc", "cnn", "resnet"), default="fc",
                   help="fc: FC net (width h, L hidden layers); cnn: the paper's CNN (h channels, 2 blocks of 2 5x5 "
                        "convs); resnet: Wide-ResNet without batch norm (--depth, h = readout channels = 64 widen). "
                        "cnn and resnet take square images (no --d)")
    g.add_argument("--depth", type=int, default=10, help="resnet depth 6 N + 4 (default 10)")
    if single:
        g.add_argument("--h", type=int, default=100,
                       help="readout width: FC width, CNN channels, ResNet 64 widen (default 100)")
        g.add_argument("--seed", type=int, default=0, help="init seed; net r of an ensemble uses seed + r")
    g.add_argument("--L", type=int, default=3, help="hidden layers (default 3)")
    g.add_argument("--act-beta", type=float, default=5.0, help="softplus beta of the activation (default 5)")
    g.add_argument("--ensemble", type=int, default=1, help="train K nets at once (seeds seed..seed+K-1)")
    g.add_argument("--dtype", choices=sorted(DTYPES), default="float64")
    g.add_argument("--device", default="cpu")
    g = p.add_argument_group("dynamics (article notation)")
    if single:
        a = g.add_mutually_exclusive_group()
        a.add_argument("--alpha", type=float, default=1.0, help="alpha of F = alpha (f - f0) (default 1)")
        a.add_argument("--alpha-sqrt-h", type=float, default=None,
                       help="alpha * sqrt(h) instead (= the reference code's alpha)")
    if minibatch:
        g.add_argument("--dynamics", choices=("flow", "adam", "sgd"), default="flow",
                       help="flow: adaptive gradient flow (default); adam / sgd: minibatch optimizers")
        g.add_argument("--lr", type=float, default=1e-3, help="adam/sgd learning rate (default 1e-3)")
        g.add_argument("--batch-size", type=int, default=32, help="adam/sgd minibatch size (default 32)")
        g.add_argument("--momentum", type=float, default=0.0, help="sgd momentum (default 0)")
        g.add_argument("--epochs", type=float, default=None, help="adam/sgd: stop after this many epochs")
    g.add_argument("--loss", choices=("softhinge", "qhinge", "hinge"), default=None,
                   help="default softhinge for the flow, hinge (with 1/alpha) for adam/sgd")
    g.add_argument("--loss-beta", type=float, default=20.0, help="soft-hinge beta (default 20)")
    g.add_argument("--max-dgrad", type=float, default=1e-4, help="step rule: gradient change bound (1e-4)")
    g.add_argument("--max-dout", type=float, default=0.1, help="step rule: output change bound (0.1)")
    g.add_argument("--tau", type=float, default=0.0, help="momentum time (0: gradient flow)")
    g.add_argument("--max-time", type=float, default=math.inf, help="stop at flow time t (default: none)")
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many accepted steps")
    g.add_argument("--max-wall", type=float, default=math.inf, help="seconds per training / kernel run")
    g.add_argument("--kernel-points", type=int, default=None,
                   help="test points of the kernel change |Theta_T - Theta_0|/|Theta_0| (0: off; default 256 for "
                        "fc, 0 for cnn/resnet, whose Jacobians cost ~m^2 P flops)")
    g.add_argument("--checkpoint-every", type=float, default=60.0, help="seconds between checkpoints")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (default: on only when stderr is a terminal)")


def cmd_doctor(args: argparse.Namespace) -> int:
    """Run each compiled op on small edge-case inputs on the CPU and every GPU against its torch reference;
    print a table (op, device, precision, max error, pass) and disable failing ops (ntk_fast/diagnostics/doctor.py)."""
    from ntk_fast.diagnostics import doctor
    return doctor.main(args.device or None, args.op or None)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ntk_fast", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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
    g.add_argument("--dataset", default="fashion", help="dataset (default fashion; see ntk_fast.data.DATASETS)")
    g.add_argument("--data", default=None, help="folder with the dataset's files (default: Debian's Fashion-MNIST)")
    g.add_argument("--out", default="runs/gram", help="output folder (gram.npy, labels.npy, summary.json)")
    r = g.add_mutually_exclusive_group()
    r.add_argument("--no-reference", action="store_true", help="skip the plain-torch reference timing")
    r.add_argument("--reference", action="store_true",
                   help="run the reference also when streaming to disk (needs the n x n reference in memory)")
    g.add_argument("--to-disk", action="store_true",
                   help="stream the Gram to --out/gram.npy tile by tile, resumable (default under torchrun "
                        "or above 2 GiB)")
    g.add_argument("--tile", type=int, default=None, help="rows per tile when streaming (default 1024)")
    g.add_argument("--pg-timeout", type=float, default=1800.0,
                   help="seconds a rank waits for the others in a collective under torchrun (default 1800)")
    g.add_argument("--progress", action="store_true", help="progress bar over row panels / tiles (rank 0)")
    g.set_defaults(func=cmd_gram)

    t = sub.add_parser("train", help="train the alpha-scaled net (fc/cnn/resnet; flow/adam/sgd) (run folder)",
                       description=cmd_train.__doc__)
    _add_run_args(t)
    t.add_argument("--init-kernel", action="store_true", help="also the frozen-kernel run with Theta(w0)")
    t.add_argument("--final-kernel", action="store_true", help="also the frozen-kernel run with Theta(w_T)")
    t.add_argument("--out", default="runs/train", help="run folder (default runs/train)")
    t.set_defaults(func=cmd_train)

    k = sub.add_parser("kernel", help="frozen-kernel dynamics with the NTK at initialisation (run folder)",
                       description=cmd_kernel.__doc__)
    _add_run_args(k, minibatch=False)
    k.add_argument("--out", default="runs/kernel", help="run folder (default runs/kernel)")
    k.add_argument("--gram", default=None, metavar="DIR",
                   help="run kernel_flow on DIR/gram.npy and DIR/labels.npy (written by `gram --out DIR`), read "
                        "by row blocks, rows split across ranks under torchrun; the data and network options are "
                        "then unused")
    k.add_argument("--pg-timeout", type=float, default=1800.0,
                   help="with --gram under torchrun: seconds a rank waits for the others (default 1800)")
    k.set_defaults(func=cmd_kernel)

    s = sub.add_parser("sweep", help="grid over alpha, h and seeds; skips finished runs, resumes, --jobs",
                       description=cmd_sweep.__doc__)
    _add_run_args(s, single=False)
    s.add_argument("--hs", type=int, nargs="+", default=[100], help="widths (default 100)")
    s.add_argument("--seeds", type=int, nargs="+", default=[0], help="init seeds (default 0)")
    s.add_argument("--alphas", type=float, nargs="+", default=None, help="alpha values (article)")
    s.add_argument("--alphas-sqrt-h", type=float, nargs="+", default=None,
                   help="alpha*sqrt(h) values (the paper's axis), converted per h")
    s.add_argument("--init-kernel", action="store_true", help="also the frozen-kernel run with Theta(w0)")
    s.add_argument("--final-kernel", action="store_true", help="also the frozen-kernel run with Theta(w_T)")
    s.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process (default 1)")
    s.add_argument("--threads", type=int, default=None, help="torch threads per job (default cpus / jobs)")
    s.add_argument("--out", default="runs/sweep", help="sweep folder (default runs/sweep)")
    s.set_defaults(func=cmd_sweep, seed=0, h=None, alpha=None, alpha_sqrt_h=None)

    b = sub.add_parser("bench", help="side-by-side benchmark runner (bench/runner/ of a source checkout)",
                       description=cmd_bench.__doc__, add_help=True)
    b.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for the runner (see: bench --help)")
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser("demo", help="tiny end-to-end example on scikit-learn's digits (seconds)",
                       description=cmd_demo.__doc__)
    d.add_argument("--p", type=int, default=200, help="training points (default 200)")
    d.add_argument("--p-test", type=int, default=500, help="test points (default 500)")
    d.add_argument("--h", type=int, default=64, help="width (default 64)")
    d.add_argument("--L", type=int, default=3, help="hidden layers (default 3)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--max-wall", type=float, default=60.0, help="seconds per run (default 60)")
    d.add_argument("--no-progress", action="store_true")
    d.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    d.set_defaults(func=cmd_demo)

    dr = sub.add_parser("doctor", help="self-check of the compiled ops on this machine's CPU and GPUs",
                        description=cmd_doctor.__doc__)
    dr.add_argument("--device", action="append", help="device to check (repeatable; default: cpu and every GPU)")
    dr.add_argument("--op", action="append", help="op to check (repeatable; default: all)")
    dr.set_defaults(func=cmd_doctor)
    return p


def _check_args(args: argparse.Namespace) -> None:
    """Checks argparse cannot express: a usable --device, a non-negative --max-steps, options of the other
    dynamics (ValueError naming the option)."""
    devs = getattr(args, "device", None)
    for dev in ([] if devs is None else devs if isinstance(devs, list) else [devs]):   # doctor: repeatable
        try:
            d = torch.device(dev)
        except RuntimeError as exc:
            raise ValueError(f"--device {dev!r} is not a device ({exc})") from None
        if d.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {dev}: this torch has no usable CUDA device (use --device cpu)")
    if getattr(args, "max_steps", None) is not None and args.max_steps < 0:
        raise ValueError(f"--max-steps must be >= 0, got {args.max_steps}")
    if getattr(args, "tile", None) is not None and args.tile < 1:
        raise ValueError(f"--tile must be >= 1, got {args.tile}")
    if hasattr(args, "pg_timeout") and not (args.pg_timeout > 0 and math.isfinite(args.pg_timeout)):
        raise ValueError(f"--pg-timeout must be a positive number of seconds, got {args.pg_timeout}")
    if getattr(args, "epochs", None) is not None and args.dynamics == "flow":
        raise ValueError("--epochs is for --dynamics adam/sgd (the flow is full batch: use --max-steps or --max-time)")
    if getattr(args, "dynamics", "flow") != "flow":
        if not args.lr > 0:
            raise ValueError(f"--lr must be > 0, got {args.lr}")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    elif getattr(args, "momentum", 0.0):
        raise ValueError("--momentum is for --dynamics sgd")


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:                 # everything after 'bench' belongs to the runner, options included
        return run_bench(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        _check_args(args)
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError, MemoryError) as exc:   # MemoryError: the memory guard
        print(f"error: {exc}", file=sys.stderr)
        return 2
