"""Where the time of one flow attempt of an ensemble goes: K MLPs (a plain nn.Module, width 64, n = 1000,
float64) trained by the generic trainer, against the bare forward + backward of the same loss done three ways.

Timed in alternated rounds (min and median of the rounds), seconds per attempt of all K models:
  * trainer: K sequential runs (train_any on one model, K times), the K models in one call by the loop path
    (batched=False: working copies on the flat buffers), and by vmap (batched=True);
  * bare compute, no trainer: K x (module forward + loss + backward) one model after the other;
    vmap(grad(functional_call)) over the stacked rows (what the trainer's vmap path runs); and a batched form
    written by hand for this MLP that uses the input shared by all models: the first layer is one
    (n, d) @ (d, K h) matrix product and the next layers are batched products (baddbmm).
The bare times bound what any batching of the same per-model work can gain: the trainer's sequential
attempt divided by the fastest bare batched computation is the best ratio a zero-overhead batched path
would reach.  Then torch.profiler's self CPU time per attempt of each bare form, by aten op and input
shapes (the logical, per-model shapes under vmap).  Writes bench/results/ensemble_mlp_profile_<date>.md/.json.

    python bench/profile_ensemble_mlp.py [--rounds 5] [--K 8] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_generic import data, generic_flow, mlp  # noqa: E402
from ntk_fast.dynamics.losses import softhinge  # noqa: E402

MACHINE = "2-core AMD EPYC VM, no GPU (shared with other jobs)"


def bare_forms(models: List[nn.Module], x: torch.Tensor, y: torch.Tensor) -> Dict[str, Callable[[], None]]:
    """The three bare forward + backward computations of sum_k L_k, L_k = mean softhinge(y (f_k - f0_k))."""
    K, (n, d), h = len(models), x.shape, models[0][0].out_features
    with torch.no_grad():
        f0 = torch.stack([m(x).reshape(-1) for m in models])

    def sequential():
        for k, m in enumerate(models):
            m.zero_grad(set_to_none=True)
            softhinge(y * (m(x).reshape(-1) - f0[k])).mean().backward()

    params, bufs = stack_module_state(models)
    template = mlp(d, h, 0, x.dtype).to("meta")
    vg = vmap(grad(lambda p, b, g0: softhinge(y * (functional_call(template, (p, b), (x,)).reshape(-1) - g0)).mean()))

    def vmapped():
        vg(params, bufs, f0)

    W = [torch.stack([m[i].weight.detach() for m in models]).requires_grad_() for i in (0, 2, 4)]
    B = [torch.stack([m[i].bias.detach() for m in models]).requires_grad_() for i in (0, 2, 4)]

    def folded():
        z1 = torch.addmm(B[0].reshape(-1), x, W[0].reshape(K * h, d).t()).reshape(n, K, h).transpose(0, 1)
        a1 = nn.functional.softplus(z1, beta=5.0)
        a2 = nn.functional.softplus(torch.baddbmm(B[1][:, None], a1, W[1].transpose(1, 2)), beta=5.0)
        f = torch.baddbmm(B[2][:, None], a2, W[2].transpose(1, 2)).reshape(K, n)
        softhinge(y * (f - f0)).mean(1).sum().backward()
        for t in W + B:
            t.grad = None

    return {"bare: K x module fwd+bwd": sequential, "bare: vmap(grad(functional_call))": vmapped,
            "bare: hand-folded batched (this MLP only)": folded}


def op_table(fn: Callable[[], None], reps: int, top: int) -> List[dict]:
    """Self CPU ms per call of fn by (aten op, input shapes), largest first."""
    fn()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(reps):
            fn()
    rows = [dict(op=e.key, shapes=str(e.input_shapes), calls=e.count / reps, self_ms=e.self_cpu_time_total / 1e3 / reps)
            for e in prof.key_averages(group_by_input_shape=True) if e.key.startswith("aten::")]
    return sorted(rows, key=lambda r: -r["self_ms"])[:top]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--K", type=int, default=8)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--attempts", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dt, K, A = torch.float64, args.K, args.attempts
    x, y = data(args.n, 64, dt)
    bare = bare_forms([mlp(64, 64, s, dt) for s in range(K)], x, y)
    cases = {"trainer: K sequential runs": lambda: sum(generic_flow(mlp(64, 64, s, dt), x, y, 1.0, A) for s in range(K)),
             "trainer: K in one call, loop": lambda: generic_flow([mlp(64, 64, s, dt) for s in range(K)], x, y, 1.0, A,
                                                                  batched=False),
             "trainer: K in one call, vmap": lambda: generic_flow([mlp(64, 64, s, dt) for s in range(K)], x, y, 1.0, A,
                                                                  batched=True)}

    def timed(fn):
        t0 = time.perf_counter()
        r = fn()
        return r if r is not None else time.perf_counter() - t0

    cases.update({k: (lambda f=f: timed(f)) for k, f in bare.items()})
    for f in cases.values():
        f()
    times = {k: [] for k in cases}
    load_before = os.getloadavg()
    for r in range(args.rounds):
        for k, f in (list(cases.items()) if r % 2 == 0 else list(cases.items())[::-1]):
            times[k].append(f())
    load_after = os.getloadavg()
    tables = {k: op_table(f, 5, 12) for k, f in bare.items()}
    out = dict(machine=MACHINE, platform=platform.platform(), torch=torch.__version__, threads=torch.get_num_threads(),
               args=vars(args), times=times, min={k: min(v) for k, v in times.items()},
               median={k: statistics.median(v) for k, v in times.items()}, ops=tables,
               loadavg_before=load_before, loadavg_after=load_after)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, time.strftime("ensemble_mlp_profile_%Y%m%d-%H%M%S.json"))
    with open(path, "w") as fh:
        json.dump(out, fh, indent=1)
    with open(path[:-5] + ".md", "w") as fh:
        fh.write(markdown(out))
    print(markdown(out))
    print(path)


def markdown(out) -> str:
    K = out["args"]["K"]
    seq = out["median"]["trainer: K sequential runs"]
    lines = [f"# ensemble MLP profile: {out['machine']}", "",
             f"torch {out['torch']}, {out['threads']} thread(s), K = {K}, n = {out['args']['n']}, width 64, float64; "
             f"load average (1, 5, 15 min) {tuple(round(v, 1) for v in out['loadavg_before'])} before, "
             f"{tuple(round(v, 1) for v in out['loadavg_after'])} after; {out['args']['rounds']} alternated rounds.", "",
             "| ms per attempt of all K models | min | median | K sequential runs / this (medians) |", "|---|---|---|---|"]
    lines += [f"| {k} | {out['min'][k] * 1e3:.2f} | {v * 1e3:.2f} | {seq / v:.2f}x |" for k, v in out["median"].items()]
    for k, rows in out["ops"].items():
        lines += ["", f"{k}: self CPU ms per attempt by op (torch.profiler, top 12)", "",
                  "| op | input shapes | calls | ms |", "|---|---|---|---|"]
        lines += [f"| {r['op']} | {r['shapes']} | {r['calls']:g} | {r['self_ms']:.2f} |" for r in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
