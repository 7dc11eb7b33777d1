"""Issue 13 benchmarks: the structured NTK of models beyond FCNet, each alternative in the same run.

    PYTHONPATH=$PWD nice python bench/bench_any_model.py [--quick] [--cases cnn,resmlp,full10,fc]

Cases (float32, CPU):
* cnn:    the paper's CV (h=32, k=1) on Fashion-MNIST (Gaussian stand-ins when the files are absent), n=2000:
          ntk_fast vs torch.func vmap(jacrev) + one Gram (full square torch.mm), torch.func NTK-vector products
          (vjp + jvp per column, timed on a few columns and scaled to n), and the floor: per-sample gradients +
          one symmetric Gram at this run's torch.mm rate.  With --peers (default: all three, each skipped with a
          message when its interpreter is absent), the peers users would pick instead, in the same run, on the
          same weights and points, each in a subprocess of its own venv: nngeometry (GramMatrix, FMatDense),
          ASDL (class-wise direct NTK, its Hadamard-factored NTK, empirical_direct_ntk, batched gradients +
          one Gram) through
          bench/_peer_ntk_worker_torch.py (--peers-python, $NTK_FAST_PEERS_PYTHON, else .venv-peers), and
          neural-tangents (empirical_ntk_fn, structured derivatives and Jacobian contraction, stax.Conv) through
          bench/_peer_ntk_worker_nt.py (--nt-python, $NTK_FAST_NT_PYTHON, else .venv-nt).  Each is timed at
          --peer-n points (default n; below n its time is scaled by n^2) and compared with ntk_fast's Gram.
* resmlp: residual MLP 784 -> 512, 2 blocks of LayerNorm + Linear(512, 512) + tanh, Linear(512, 1), n=2000:
          ntk_fast vs torch.func vmap(jacrev) + Gram (measured at n=500: its Jacobians do not fit at 2000;
          scaled by its cost model, Jacobians x n, Gram x n^2).
* full10: Linear(784,512)-ReLU-Linear(512,512)-ReLU-Linear(512,10), mode="full", n=1500: the gram_full op vs the
          shared-A panel path it replaced (torch.mm per panel + in-place multiply-add, main dfe84b0) vs
          the previous one (A repeated k times, one Gram op on n k rows), and the flop floor
          n^2 sum_l (p_l + k^2 q_l) at this run's torch.mm rate.
* fc:     FCNet(784, 1024, L=3), n=4000, trace: no regression against bench/results (0.943 s on 2026-11-22).
Results: bench/results/any-model-<date>.{json,md} (any-model-peers-<date> when peers ran).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import ntk_fast  # noqa: E402
from ntk_fast.ntk.anymodel import fc_pieces, op_features  # noqa: E402
from ntk_fast.ops import gram as _ops  # noqa: E402
from ntk_fast.ops.gram_full import factored_pairs  # noqa: E402
from ntk_fast.ops.reference import per_sample_jacobian  # noqa: E402

MACHINE = "2-core AMD EPYC VM, no GPU"
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
# peer family -> (the worker's methods, what each calls)
PEERS = {
    "nngeometry": ("torch", {"nngeometry": "GramMatrix(model, DataLoader(x, batch_size=n), FMatDense)"}),
    "asdl": ("torch", {"asdl_direct": "kernel.batch(empirical_class_wise_direct_ntk, batch_size=n)",
                       "asdl_hadamard": "kernel.batch(empirical_class_wise_hadamard_ntk, batch_size=n)",
                       "asdl_direct_ntk": "kernel.empirical_direct_ntk (batched grads + einsum)",
                       "asdl_batch_grads": "extend(model, OP_BATCH_GRADS), full_batch_grads, J @ J.T"}),
    "neural-tangents": ("nt", {"nt_structured": "empirical_ntk_fn STRUCTURED_DERIVATIVES, stax.Conv, jit",
                               "nt_jacobian": "empirical_ntk_fn JACOBIAN_CONTRACTION, stax.Conv, jit"}),
}


def timeit(fn, repeats=1, warmup=0):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        res = fn()
        ts.append(time.perf_counter() - t)
    return min(ts), res


def mm_rate(n=2048):
    a = torch.randn(n, n)
    timeit(lambda: a @ a)
    t, _ = timeit(lambda: a @ a, repeats=3)
    return 2 * n ** 3 / t


def fashion(n, d=784):
    try:
        from ntk_fast.data import binary_dataset
        x = binary_dataset("fashion", p=n, p_test=0, dtype=torch.float32)[0]
        return x[:n], "Fashion-MNIST"
    except Exception:  # noqa: BLE001 - the timing does not depend on the pixel values
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, d, generator=g)
        return x * (math.sqrt(d) / x.norm(dim=1, keepdim=True)), "Gaussian (Fashion-MNIST not found)"


def jac_gram(model, x, block=250):
    """torch.func: per-sample Jacobians in blocks into one (n, P) matrix, then one full-square Gram."""
    J = torch.cat([per_sample_jacobian(model, x[i:i + block]).flatten(1) for i in range(0, x.shape[0], block)])
    return J @ J.T


def ntk_vp_columns(model, x, cols):
    """torch.func NTK-vector products: Theta e_j = J (J^T e_j) by one vjp and one jvp, for the first cols columns."""
    from torch.func import functional_call, jvp, vjp
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p):
        return functional_call(model, p, (x,)).reshape(-1)

    out, pullback = vjp(f, params)
    res = []
    for j in range(cols):
        e = torch.zeros_like(out)
        e[j] = 1
        (g,) = pullback(e)
        res.append(jvp(f, (params,), (g,))[1])
    return torch.stack(res, 1)


class ResMLP(nn.Module):
    def __init__(self, d=784, h=512, k=1, depth=2):
        super().__init__()
        self.inp = nn.Linear(d, h)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(h), nn.Linear(h, h), nn.Tanh()) for _ in range(depth))
        self.out = nn.Linear(h, k)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = h + b(h)
        return self.out(h)


def run_peer_worker(python, worker, net, x, methods, tmp, timeout):
    """Run bench/<worker> with ``python`` on the CV's weights and x: {method: {"s"[, "first_s"]} | {"error"}}, Grams."""
    xs = os.path.join(tmp, "x.npy")
    np.save(xs, x.reshape(x.shape[0], 1, 28, 28).numpy())
    ws = []
    for i, w in enumerate([c.weight for c in net.convs] + [net.readout.weight]):
        ws.append(os.path.join(tmp, f"w{i}.npy"))
        np.save(ws[-1], w.detach().numpy())
    out = os.path.join(tmp, worker.split(".")[0])
    spec = dict(x=xs, weights=ws, strides=[c.stride[0] for c in net.convs], padding=net.convs[0].padding[0],
                beta=5.0, c=ntk_fast.activation_normaliser("softplus", 5.0), threshold=20.0, methods=methods,
                out=out, warmup_n=16, repeats=1, threads=torch.get_num_threads())
    sp = out + "_spec.json"
    with open(sp, "w") as f:
        json.dump(spec, f)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    try:
        r = subprocess.run([python, os.path.join(ROOT, "bench", worker), sp], capture_output=True, text=True,
                           timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        r = None
    res = {}
    if os.path.exists(out + ".json"):
        with open(out + ".json") as f:
            res = json.load(f)
    for m in methods:
        if m not in res:
            why = "timed out" if r is None else f"worker exit {r.returncode}: {r.stderr.strip()[-300:]}"
            res[m] = {"error": why}
        elif "s" in res[m]:
            res[m]["K"] = np.load(f"{out}_{m}.npy")
    return res


def interpreter_ok(python, module):
    if not python or not os.path.exists(python):
        return f"skipped: no interpreter at {python}"
    r = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    return None if r.returncode == 0 else f"skipped: {python} cannot import {module}"


def cnn_peers(net, x, K, t_ours, peers, peer_n, interp, timeout):
    """The peers' rows: seconds (scaled by n^2 when timed at peer_n < n), ratio to ntk_fast, rel err vs ntk_fast."""
    n = x.shape[0]
    m = min(peer_n or n, n)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for fam in peers:
            kind, methods = PEERS[fam]
            python = interp[kind]
            skip = interpreter_ok(python, {"torch": "nngeometry" if fam == "nngeometry" else "asdl",
                                           "nt": "neural_tangents"}[kind])
            res = {} if skip else run_peer_worker(python, f"_peer_ntk_worker_{kind}.py", net, x[:m], list(methods),
                                                  tmp, timeout)
            for meth, what in methods.items():
                row = dict(peer=fam, method=meth, calls=what, measured_n=m)
                r = res.get(meth, {"error": skip})
                if "s" in r:
                    Km = K[:m, :m].double().numpy()
                    row.update(measured_s=r["s"], s=r["s"] * (n / m) ** 2,
                               rel_err_vs_ntk_fast=float(np.abs(r["K"] - Km).max() / np.abs(Km).max()))
                    row["ratio_to_ntk_fast"] = row["s"] / t_ours
                    if "first_s" in r:
                        row["first_call_s"] = r["first_s"]
                    if m < n:
                        row["note"] = f"timed at n={m}, scaled by (n/{m})^2"
                else:
                    row["error"] = r["error"]
                if "versions" in res:
                    row["versions"] = res["versions"]
                out.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "versions"}), flush=True)
    return out


def case_cnn(n, rows, rate, peers=(), peer_n=None, interp=None, timeout=3600):
    torch.manual_seed(0)
    net = ntk_fast.CV(32, generator=torch.Generator().manual_seed(1))
    x, src = fashion(n)
    P = sum(p.numel() for p in net.parameters())
    t_ours, K = timeit(lambda: ntk_fast.empirical_ntk(net, x), warmup=1)
    plan = str(ntk_fast.ntk_plan(net, x[:n]))
    t_func, K2 = timeit(lambda: jac_gram(net, x))
    err = ((K - K2).abs().max() / K2.abs().max()).item()
    del K2
    t_grads, _ = timeit(lambda: torch.cat([per_sample_jacobian(net, x[i:i + 250]).flatten(1)
                                           for i in range(0, n, 250)]))
    floor_gram = n * n * P / rate                      # n^2 P / 2 multiply-adds = n^2 P flops
    cols = 4
    t_vp, _ = timeit(lambda: ntk_vp_columns(net, x, cols))
    rows.append(dict(case="cnn", data=src, n=n, P=P, ours_s=t_ours, torch_func_jac_gram_s=t_func,
                     torch_func_ntk_vp_s_scaled=t_vp * n / cols, ntk_vp_measured_columns=cols,
                     floor_s=floor_gram + t_grads, floor_gram_s=floor_gram, per_sample_grads_funcs_s=t_grads,
                     rel_err_vs_torch_func=err, plan=plan))
    if peers:
        rows[-1]["peers"] = cnn_peers(net, x, K, t_ours, peers, peer_n, interp, timeout)


def case_resmlp(n, rows, rate, n_func=500):
    torch.manual_seed(0)
    net = ResMLP()
    x, src = fashion(n)
    P = sum(p.numel() for p in net.parameters())
    t_ours, K = timeit(lambda: ntk_fast.empirical_ntk(net, x), warmup=1)
    xs = x[:n_func]
    t_jac, J = timeit(lambda: per_sample_jacobian(net, xs).flatten(1))
    t_g, Ks = timeit(lambda: J @ J.T)
    err = ((K[:n_func, :n_func] - Ks).abs().max() / Ks.abs().max()).item()
    scaled = t_jac * n / n_func + t_g * (n / n_func) ** 2
    rows.append(dict(case="resmlp", data=src, n=n, P=P, ours_s=t_ours, torch_func_measured_n=n_func,
                     torch_func_s_scaled=scaled, torch_func_jac_s=t_jac, torch_func_gram_s=t_g,
                     rel_err_vs_torch_func=err, plan=str(ntk_fast.ntk_plan(net, x[:n]))))


def old_full(net, x):
    """The previous full mode: A repeated k times, one Gram op on (n k) rows."""
    A, D, k = ntk_fast.structured_features(net, x)
    n = x.shape[0]
    A = [a.repeat_interleave(k, dim=0) for a in A]
    D = [d.reshape(n * k, d.shape[2]) for d in D]
    return _ops.gram(A, D).reshape(n, k, n, k).permute(0, 2, 1, 3).contiguous()


def panel_full(net, x, panels=8):
    """The full mode of main before the gram_full op (2026-12-06, dfe84b0): per row panel one (r, c) A Gram and
    one (r k, c k) D Gram by torch.mm, combined by an in-place multiply-add, written to a (n, n, k, k) result
    through a permuted copy and mirrored."""
    A, D, k = ntk_fast.structured_features(net, x)
    n = x.shape[0]
    res = torch.empty(n, n, k, k, dtype=x.dtype)
    b = max(64, -(-n // panels))
    for r0 in range(0, n, b):
        r1 = min(n, r0 + b)
        buf = torch.empty((r1 - r0) * k, (n - r0) * k, dtype=x.dtype)
        view = buf.view(r1 - r0, k, n - r0, k)
        tmp = torch.empty_like(buf)
        for i, (a, d) in enumerate(zip(A, D)):
            ka = (a[r0:r1] @ a[r0:].T)[:, None, :, None]
            torch.mm(d[r0:r1].flatten(0, 1), d[r0:].flatten(0, 1).T, out=tmp if i else buf)
            view.mul_(ka) if i == 0 else view.addcmul_(tmp.view_as(view), ka)
        res[r0:r1, r0:] = view.permute(0, 2, 1, 3)
        dg = res[r0:r1, r0:r1]
        dg.copy_((dg + dg.permute(1, 0, 3, 2)) / 2)
        if r1 < n:
            res[r1:, r0:r1] = res[r0:r1, r1:].permute(1, 0, 3, 2)
    return res


def case_full10(n, rows, rate):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    x, src = fashion(n)
    t_ours, K = timeit(lambda: ntk_fast.empirical_ntk(net, x, mode="full"), warmup=1)
    t_panel, K3 = timeit(lambda: panel_full(net, x))
    err_panel = ((K - K3).abs().max() / K3.abs().max()).item()
    del K3
    t_ours2, K = timeit(lambda: ntk_fast.empirical_ntk(net, x, mode="full"))     # alternated with the others
    t_old, K2 = timeit(lambda: old_full(net, x))
    err = ((K - K2).abs().max() / K2.abs().max()).item()
    del K2
    t_ours = min(t_ours, t_ours2)
    fans = [(785, 512), (513, 512), (513, 10)]
    flops = n * n * sum(p + 100 * q for p, q in fans)       # 2 flops per multiply-add, symmetric half
    rate = max(rate, mm_rate())     # the faster of the run's two rate measurements: the stricter floor
    floor = flops / rate
    # the torch.mm rate drifts on this VM (98-182 GFLOP/s in one session): rate and ntk_fast alternated, medians
    pairs = [(mm_rate(), timeit(lambda: ntk_fast.empirical_ntk(net, x, mode="full"))[0]) for _ in range(5)]
    rates, ts = [r for r, _ in pairs], [t for _, t in pairs]
    med_floor = flops / statistics.median(rates)
    # where the time goes beyond the products: the features as empirical_ntk captures them (the layer below the
    # readout factored), the op into a fresh result and into touched memory
    capture = lambda: ntk_fast.structured_features(net, x, factored=True)        # noqa: E731
    A, D, k = capture()
    t_cap = timeit(capture, repeats=3)[0]
    a3, d3, w3 = op_features(fc_pieces(A, D))
    t_alloc = timeit(lambda: ntk_fast.gram_full(a3, d3, w=w3), repeats=3)[0]
    t_pre = timeit(lambda: ntk_fast.gram_full(a3, d3, w=w3, out=K), repeats=3)[0]   # K: touched, no page faults
    # the op's own count: the readout skips its D product (unit rows), the layer below it forms 56 of the 100
    # (c, c') pairs (55 = k(k+1)/2 rounded up to 8) plus the s_i o s_j products
    op_flops = n * n * (785 + 100 * 512 + 513 + (factored_pairs(10) + 1) * 512 + 513)
    t_fault = timeit(lambda: torch.empty_like(K).fill_(0), repeats=3)[0] - timeit(lambda: K.fill_(0), repeats=3)[0]
    rows.append(dict(case="full10", data=src, n=n, ours_s=t_ours, panel_path_dfe84b0_s=t_panel, previous_path_s=t_old,
                     previous_main_recorded_s=5.37, floor_s=floor, ratio_to_floor=t_ours / floor,
                     speedup_vs_recorded=5.37 / t_ours, speedup_vs_panel_path=t_panel / t_ours,
                     rel_err_vs_previous=err, rel_err_vs_panel_path=err_panel,
                     alternated_rates_gflops=[r / 1e9 for r in rates], alternated_ours_s=ts,
                     median_floor_s=med_floor, median_ratio_to_floor=statistics.median(ts) / med_floor,
                     capture_s=t_cap, op_alloc_s=t_alloc, op_prealloc_s=t_pre, first_touch_of_result_s=t_fault,
                     op_flops=op_flops, op_flops_over_floor_flops=op_flops / flops))


def case_fc(n, rows, rate):
    net = ntk_fast.FCNet(784, 1024, 3, dtype=torch.float32, generator=torch.Generator().manual_seed(1))
    x, src = fashion(n)
    t, _ = timeit(lambda: ntk_fast.empirical_ntk(net, x), repeats=2, warmup=1)
    rows.append(dict(case="fc", data=src, n=n, ours_s=t, recorded_2026_11_22_s=0.943))


def peer_table(r):
    """Markdown: every method of the cnn case with seconds, ratio to ntk_fast and rel err vs ntk_fast."""
    t0 = r["ours_s"]
    lines = ["", f"### Side by side (n={r['n']}, P={r['P']}, float32)", "",
             "| method | seconds | x ntk_fast | rel err vs ntk_fast | note |", "|---|---|---|---|---|",
             f"| ntk_fast `empirical_ntk` | {t0:.3g} | 1 | 0 | structured per-layer Grams |",
             f"| torch.func vmap(jacrev) + one Gram | {r['torch_func_jac_gram_s']:.3g} | "
             f"{r['torch_func_jac_gram_s'] / t0:.3g} | {r['rel_err_vs_torch_func']:.2g} | full square torch.mm |",
             f"| torch.func NTK-vector products | {r['torch_func_ntk_vp_s_scaled']:.3g} | "
             f"{r['torch_func_ntk_vp_s_scaled'] / t0:.3g} | - | {r['ntk_vp_measured_columns']} columns timed, "
             f"scaled to n |",
             f"| floor (per-sample grads + symmetric Gram at the torch.mm rate) | {r['floor_s']:.3g} | "
             f"{r['floor_s'] / t0:.3g} | - | |"]
    for p in r["peers"]:
        name = f"{p['peer']} `{p['method']}`"
        if "s" in p:
            note = p["calls"] + (f"; {p['note']}" if "note" in p else "")
            if "first_call_s" in p:
                note += f"; first call (jit) {p['first_call_s']:.3g} s"
            lines.append(f"| {name} | {p['s']:.3g} | {p['ratio_to_ntk_fast']:.3g} | "
                         f"{p['rel_err_vs_ntk_fast']:.2g} | {note} |")
        else:
            err = p["error"].replace("|", "/").replace("\n", " ")
            lines.append(f"| {name} | - | - | - | {p['calls']}: {err} |")
    vers = {}
    for p in r["peers"]:
        vers.update(p.get("versions", {}))
    if vers:
        lines += ["", "Peer versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()) + "."]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="cnn,resmlp,full10,fc")
    ap.add_argument("--quick", action="store_true", help="small n (a smoke run, not recorded)")
    ap.add_argument("--tag", default="", help="suffix of the result files")
    ap.add_argument("--peers", default="nngeometry,asdl,neural-tangents",
                    help="peers of the cnn case, comma-separated among " + ",".join(PEERS) + " ('' or none: no peer)")
    ap.add_argument("--peer-n", type=int, default=None, help="n at which the peers are timed (default: the case's n; "
                    "below it their times are scaled by n^2)")
    ap.add_argument("--peers-python", default=os.environ.get("NTK_FAST_PEERS_PYTHON",
                                                             os.path.join(ROOT, ".venv-peers", "bin", "python")),
                    help="interpreter of a venv with torch, nngeometry and asdfghjkl (scripts/setup_peers.sh)")
    ap.add_argument("--nt-python", default=os.environ.get("NTK_FAST_NT_PYTHON",
                                                          os.path.join(ROOT, ".venv-nt", "bin", "python")),
                    help="interpreter of a venv with jax and neural-tangents (scripts/setup_peers.sh)")
    ap.add_argument("--peer-timeout", type=float, default=3600, help="seconds per peer worker")
    ap.add_argument("--cnn-n", type=int, default=None, help="n of the cnn case (default 2000, --quick 200)")
    args = ap.parse_args()
    peers = [p for p in args.peers.split(",") if p and p != "none"]
    for p in peers:
        if p not in PEERS:
            ap.error(f"unknown peer {p!r}: one of {', '.join(PEERS)}")
    torch.set_num_threads(os.cpu_count() or 1)
    sizes = dict(cnn=2000, resmlp=2000, full10=1500, fc=4000)
    if args.quick:
        sizes = dict(cnn=200, resmlp=200, full10=150, fc=400)
    if args.cnn_n:
        sizes["cnn"] = args.cnn_n
    rate0 = mm_rate()
    rows = []
    fns = dict(cnn=case_cnn, resmlp=case_resmlp, full10=case_full10, fc=case_fc)
    for c in args.cases.split(","):
        kw = dict(n_func=min(500, sizes[c])) if c == "resmlp" else {}
        if c == "cnn":
            kw = dict(peers=peers, peer_n=args.peer_n, interp=dict(torch=args.peers_python, nt=args.nt_python),
                      timeout=args.peer_timeout)
        fns[c](sizes[c], rows, rate0, **kw)
        print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("plan", "peers")}), flush=True)
    rate1 = mm_rate()
    meta = dict(machine=MACHINE, torch=torch.__version__, threads=torch.get_num_threads(),
                mm_rate_gflops=[rate0 / 1e9, rate1 / 1e9], date=datetime.date.today().isoformat(),
                load_average=os.getloadavg(), python=platform.python_version(), quick=args.quick)
    if args.quick:
        for r in rows:
            if "peers" in r:
                print(peer_table(r))
        return
    name = "any-model-peers" if any("peers" in r for r in rows) else "any-model"
    out = os.path.join(os.path.dirname(__file__), "results", f"{name}-{meta['date']}{args.tag}")
    with open(out + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    with open(out + ".md", "w") as f:
        f.write(f"# Structured NTK of any model (issue 13), {meta['date']}\n\nMachine: {MACHINE}; torch {torch.__version__}, "
                f"{meta['threads']} threads, load average {meta['load_average'][0]:.2f} at the end "
                f"(machine shared with other jobs). torch.mm rate {rate0/1e9:.0f} / {rate1/1e9:.0f} GFLOP/s "
                f"(before / after). Floors use the rate before. Times: min of the timed calls (after one warm-up "
                f"for ntk_fast).\n\n")
        for r in rows:
            f.write(f"## {r['case']} (n={r['n']}, {r['data']})\n\n| quantity | value |\n|---|---|\n")
            for k, v in r.items():
                if k not in ("case", "plan", "data", "n", "peers"):
                    f.write(f"| {k} | {v:.4g} |\n" if isinstance(v, float) else f"| {k} | {v} |\n")
            if "peers" in r:
                f.write(peer_table(r))
            if "plan" in r:
                f.write("\n```\n" + r["plan"] + "\n```\n")
            f.write("\n")
    print("written", out + ".md")


if __name__ == "__main__":
    main()
