"""Side-by-side benchmark: the empirical NTK Gram of the paper's FC net by ntk_fast and by the alternatives.

    python -m ntk_fast.bench_runner --n 4000 --h 1024            # one table (d=784, L=3, float32 by default)
    python -m ntk_fast.bench_runner --n 500 1000 2000 4000 --h 256 512 1024 --plot   # sweeps + log-log plot

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
import copy
import datetime
import gc
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

ALL_METHODS = ("ntk_fast", "reference", "func_jacobian", "func_ntvp", "neural_tangents", "nngeometry", "asdl",
               "brute_force")
IN_PROCESS = ("ntk_fast", "reference", "func_jacobian", "func_ntvp", "brute_force")
LABELS = {
    "ntk_fast": "ntk_fast (features + fused Gram op)",
    "reference": "plain torch structured (per-layer Grams)",
    "func_jacobian": "torch.func Jacobian contraction (blocked)",
    "func_ntvp": "torch.func NTK-vector products (vjp+jvp)",
    "neural_tangents": "neural-tangents structured derivatives (jit)",
    "nngeometry": "nngeometry GramMatrix (FMatDense)",
    "asdl": "ASDL class-wise Hadamard NTK",
    "brute_force": "reference-code style brute force (backward per point)",
}
COMPLEXITY = {
    "ntk_fast": "F(n) + n^2 S",
    "reference": "F(n) + 2 n^2 S",
    "func_jacobian": "jac blocks 5 b P each + 2 b^2 P per upper block",
    "func_ntvp": "F(n) + 8 n^2 P",
    "neural_tangents": "F(n) + 2 n^2 S",
    "nngeometry": "(B+3)/2 F(n) + n^2 S (lower blocks)",
    "asdl": "B F(n) + 2 n^2 S (upper blocks)",
    "brute_force": "groups x 6 n P + 2 n^2 P",
}
GROUP_BYTES = 2e9   # the paper's reference code caps the Jacobian of a parameter group at 2e9 bytes


# ------------------------------------------------------------------------------------------ problem

@dataclass
class Dims:
    d: int
    h: int
    L: int
    esize: int

    @property
    def fans(self):
        return [(self.d, self.h)] + [(self.h, self.h)] * (self.L - 1) + [(self.h, 1)]

    @property
    def P(self) -> int:        # number of weights
        return sum(p * q for p, q in self.fans)

    @property
    def S(self) -> int:        # sum_l (fan_in + fan_out): width of the structured features
        return sum(p + q for p, q in self.fans)

    def F(self, n: float) -> float:
        """Flops of the structured features: forward 2 n P, backward deltas 2 n (P - d h)."""
        return 2.0 * n * self.P + 2.0 * n * (self.P - self.d * self.h)


def _param_groups(sizes: Sequence[int], n: int, esize: int, cap: float = GROUP_BYTES) -> List[List[int]]:
    """Greedy groups of consecutive parameter tensors whose n-point Jacobian fits ``cap`` bytes."""
    groups, cur, cur_size = [], [], 0
    for i, s in enumerate(sizes):
        if cur and (cur_size + s) * n * esize > cap:
            groups.append(cur)
            cur, cur_size = [], 0
        cur.append(i)
        cur_size += s
    if cur:
        groups.append(cur)
    return groups


def flops_model(method: str, dims: Dims, n: int, opts: dict) -> float:
    """Counted flops of one Gram evaluation (documented in docs/benchmarks.md)."""
    P, S, F = dims.P, dims.S, dims.F(n)
    if method == "ntk_fast":
        return F + float(n) * n * S
    if method in ("reference", "neural_tangents"):
        return F + 2.0 * n * n * S
    if method == "func_jacobian":
        b = min(n, _jac_block(dims, opts))
        B = math.ceil(n / b)
        return 5.0 * b * P * (B + B * (B - 1) / 2) + 2.0 * b * b * P * B * (B + 1) / 2
    if method == "func_ntvp":
        return F + 8.0 * n * n * P
    if method == "nngeometry":
        b = min(n, opts.get("peer_block") or n)
        B = math.ceil(n / b)
        return F * (B + 3) / 2 + float(n) * n * S
    if method == "asdl":
        b = min(n, opts.get("peer_block") or n)
        B = math.ceil(n / b)
        return F * B + 2.0 * n * n * S
    if method == "brute_force":
        G = len(_param_groups([p * q for p, q in dims.fans], n, dims.esize))
        return G * 6.0 * n * P + 2.0 * n * n * P
    raise ValueError(method)


def memory_model(method: str, dims: Dims, n: int, opts: dict) -> float:
    """Rough peak bytes, used only to decide whether a size is attempted."""
    e, P, S, hL = dims.esize, dims.P, dims.S, dims.h * dims.L
    feats = e * n * S
    if method == "ntk_fast":
        return feats + e * n * n
    if method == "reference":
        return feats + 3.0 * e * n * n
    if method == "func_jacobian":
        b = min(n, _jac_block(dims, opts))
        return e * n * n + 4.0 * e * b * P
    if method == "func_ntvp":
        m = _ntvp_block(dims, n, opts)
        return e * n * n + 3.0 * e * m * P + 6.0 * e * m * n * hL
    if method == "neural_tangents":
        return 8.0 * e * n * n + 4.0 * feats
    if method in ("nngeometry", "asdl"):
        return 5.0 * e * n * n + 3.0 * feats
    if method == "brute_force":
        return e * n * n + min(GROUP_BYTES, e * n * P) + 2 * e * P
    raise ValueError(method)


def _jac_block(dims: Dims, opts: dict) -> int:
    if opts.get("jac_block"):
        return int(opts["jac_block"])
    return max(1, int(opts.get("jac_block_bytes", 5e8) // (dims.P * dims.esize)))


def _ntvp_block(dims: Dims, n: int, opts: dict) -> int:
    if opts.get("ntvp_block"):
        return int(opts["ntvp_block"])
    per_col = dims.esize * (3.0 * dims.P + 6.0 * n * dims.h * dims.L)
    return max(1, min(n, int(5e8 // per_col)))


# ------------------------------------------------------------------------------------------ in-process methods

def _brute_force_fn(net, x):
    """One backward pass per point, J (n x P_group) stored densely, K += J J^T per parameter group."""
    params = [p for p in net.parameters() if p.requires_grad]
    n = x.shape[0]

    def fn():
        K = torch.zeros(n, n, dtype=x.dtype)
        for group in _param_groups([p.numel() for p in params], n, x.element_size()):
            ps = [params[i] for i in group]
            J = torch.empty(n, sum(p.numel() for p in ps), dtype=x.dtype)
            for i in range(n):
                out = net(x[i:i + 1]).sum()
                gs = torch.autograd.grad(out, ps)
                J[i] = torch.cat([g.reshape(-1) for g in gs])
            K += J @ J.T
            del J
        return K
    return fn


def _func_jacobian_fn(net, x, block):
    from ntk_fast.ops.reference import per_sample_jacobian
    n = x.shape[0]

    def jac(i):
        return per_sample_jacobian(net, x[i:i + block]).reshape(min(block, n - i), -1)

    def fn():
        with torch.no_grad():
            K = torch.empty(n, n, dtype=x.dtype)
            starts = list(range(0, n, block))
            for a, i in enumerate(starts):
                Ji = jac(i)
                K[i:i + Ji.shape[0], i:i + Ji.shape[0]] = Ji @ Ji.T
                for j in starts[a + 1:]:
                    Jj = jac(j)
                    blk = Ji @ Jj.T
                    K[i:i + Ji.shape[0], j:j + Jj.shape[0]] = blk
                    K[j:j + Jj.shape[0], i:i + Ji.shape[0]] = blk.T
                    del Jj
            return K
    return fn


def _func_ntvp_fn(net, x, block):
    from torch.func import functional_call, jvp, vjp, vmap
    n = x.shape[0]
    params = {k: v.detach() for k, v in net.named_parameters()}

    def f(p):
        return functional_call(net, p, (x,)).reshape(n)

    def fn():
        _, vjp_fn = vjp(f, params)

        def column(v):
            (ct,) = vjp_fn(v)
            return jvp(f, (params,), (ct,))[1]
        K = torch.empty(n, n, dtype=x.dtype)
        for i in range(0, n, block):
            m = min(block, n - i)
            E = torch.zeros(m, n, dtype=x.dtype)
            E[torch.arange(m), i + torch.arange(m)] = 1.0
            K[:, i:i + m] = vmap(column)(E).T
        return K
    return fn


def make_in_process(method: str, net, x, dims: Dims, opts: dict):
    from ntk_fast import empirical_ntk
    from ntk_fast.ops.reference import gram_reference
    if method == "ntk_fast":
        return lambda: empirical_ntk(net, x)
    if method == "reference":
        def fn():
            A, D = net.features(x)
            return gram_reference(A, D)
        return fn
    if method == "func_jacobian":
        return _func_jacobian_fn(net, x, min(x.shape[0], _jac_block(dims, opts)))
    if method == "func_ntvp":
        return _func_ntvp_fn(net, x, _ntvp_block(dims, x.shape[0], opts))
    if method == "brute_force":
        return _brute_force_fn(net, x)
    if method in ("nngeometry", "asdl"):
        from ._bench_worker import peer_kernel_fn
        return peer_kernel_fn(method, opts["seq_model"], x, opts.get("peer_block"))
    raise ValueError(method)


# ------------------------------------------------------------------------------------------ subprocess methods

def _default_python(env_var: str, names: Sequence[str]) -> Optional[str]:
    if os.environ.get(env_var):
        return os.environ[env_var]
    for name in names:
        for root in (REPO, os.path.dirname(REPO)):
            p = os.path.join(root, name, "bin", "python")
            if os.path.exists(p):
                return p
    return None


class SubprocessRunner:
    """Runs one peer in another Python (its own venv) on the problem saved in a temporary folder."""

    def __init__(self, method: str, python: str, script: str, problem_npz: str, spec_base: dict, tmp: str,
                 timeout: float):
        self.method, self.python, self.script = method, python, script
        self.npz, self.spec_base, self.tmp, self.timeout = problem_npz, spec_base, tmp, timeout
        self.versions: dict = {}

    def run(self, ramp: dict) -> dict:
        out = tempfile.mkdtemp(dir=self.tmp, prefix=self.method + "-")
        spec = dict(self.spec_base, method=self.method, data=self.npz, out=out, ramp=ramp, save=True)
        path = os.path.join(out, "spec.json")
        with open(path, "w") as f:
            json.dump(spec, f)
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        r = subprocess.run([self.python, self.script, path], capture_output=True, text=True, env=env,
                           timeout=self.timeout)
        res_path = os.path.join(out, "result.json")
        if r.returncode != 0 or not os.path.exists(res_path):
            tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"{self.method} worker failed (rc {r.returncode}): " + " | ".join(tail))
        with open(res_path) as f:
            res = json.load(f)
        self.versions = res.get("versions", {})
        return res


# ------------------------------------------------------------------------------------------ machine

def machine_slug() -> str:
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1]
                    break
    except OSError:
        pass
    name = name or platform.processor() or platform.machine()
    name = re.sub(r"\((r|tm)\)|cpu|processor|\d+-core", "", name.lower())
    slug = re.sub(r"[^a-z0-9]+", "-", name).strip("-")[:32].strip("-")
    return f"{slug}-{os.cpu_count()}c" if slug else f"cpu-{os.cpu_count()}c"


def machine_dict() -> dict:
    from .cli import machine_info
    info = machine_info()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    return info


# ------------------------------------------------------------------------------------------ core

@dataclass
class Row:
    method: str
    n: int
    h: int
    status: str = "ok"                  # ok | extrapolated | skipped | failed
    measured_n: Optional[int] = None
    times: List[float] = field(default_factory=list)
    seconds: Optional[float] = None     # median at measured_n, extrapolated to n when status == extrapolated
    measured_seconds: Optional[float] = None
    flops: Optional[float] = None       # counted flops at n
    gflops: Optional[float] = None      # at measured_n
    pct_matmul: Optional[float] = None
    peak_bytes: Optional[int] = None    # at measured_n
    max_rel_err: Optional[float] = None  # at measured_n, against ntk_fast float64
    note: str = ""


def _median(ts):
    s = sorted(ts)
    return s[len(s) // 2] if len(s) % 2 else 0.5 * (s[len(s) // 2 - 1] + s[len(s) // 2])


def _make_problem(n: int, d: int, h: int, L: int, beta: float, dtype, seed: int):
    from ntk_fast.models.fc import FCNet
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x = x * (math.sqrt(d) / x.norm(dim=1, keepdim=True))        # the paper's inputs have norm sqrt(d)
    net = FCNet(d, h, L, activation="softplus", beta=beta, dtype=torch.float64,
                generator=torch.Generator().manual_seed(seed + 1))
    net64 = net
    net_t = copy.deepcopy(net).to(dtype)
    return x.to(dtype), x, net_t, net64


def run_case(n: int, h: int, args, methods: Sequence[str], rates: Dict[str, float], log) -> dict:
    """All methods at one (n, h).  Returns the case dict of the JSON output."""
    dtype = getattr(torch, args.dtype)
    dims = Dims(args.d, h, args.L, torch.empty((), dtype=dtype).element_size())
    x, x64, net, net64 = _make_problem(n, args.d, h, args.L, args.beta, dtype, args.seed)
    opts = {"jac_block": args.jac_block, "ntvp_block": args.ntvp_block, "peer_block": args.peer_block}
    max_bytes = args.max_memory_gb * 2**30
    calls = args.warmup + args.repeats
    rows: List[Row] = []
    kernels: Dict[str, tuple] = {}
    notes: List[str] = []
    versions = {"torch": torch.__version__}

    import ntk_fast
    from ._bench_ramp import ramp_measure, ramp_sizes
    from ._bench_worker import peer_available, peer_version, torch_sequential

    seq = None
    tmp = tempfile.mkdtemp(prefix="ntk_fast-bench-")
    npz = None

    def problem_file():
        nonlocal npz
        if npz is None:
            npz = os.path.join(tmp, "problem.npz")
            np.savez(npz, x=x.numpy(), **{f"W{l}": w.detach().to(dtype).numpy() for l, w in enumerate(net.weights)})
        return npz

    try:
        for method in methods:
            row = Row(method, n, h)
            rows.append(row)
            cap_n = args.brute_max_n if method == "brute_force" else None
            runner = None
            if method in ("nngeometry", "asdl") and not args.peers_subprocess and peer_available(method):
                if seq is None:
                    seq = torch_sequential([w.detach() for w in net.weights], args.beta, net.act_c, dtype)
                opts["seq_model"] = seq
                versions[method] = peer_version(method)
                where = "in-process"
            elif method in ("nngeometry", "asdl"):
                py = args.peers_python
                if not py or not os.path.exists(py):
                    row.status = "skipped"
                    row.note = (f"{method} not importable here and no peers venv "
                                "(pip install -e .[peers], or scripts/setup_peers.sh; --peers-python)")
                    log(f"  {method:16s} skipped: {row.note}")
                    continue
                runner = SubprocessRunner(method, py, os.path.join(HERE, "_bench_worker.py"), problem_file(),
                                          {"dtype": args.dtype, "beta": args.beta, "c": net.act_c,
                                           "block": args.peer_block, "threads": torch.get_num_threads()},
                                          tmp, timeout=(calls + 8) * args.max_seconds * 2 + 300)
                where = f"subprocess {py}"
            elif method == "neural_tangents":
                py = args.nt_python
                if not py or not os.path.exists(py):
                    row.status = "skipped"
                    row.note = "no neural-tangents venv (scripts/setup_peers.sh creates .venv-nt; --nt-python)"
                    log(f"  {method:16s} skipped: {row.note}")
                    continue
                runner = SubprocessRunner(method, py, os.path.join(HERE, "_bench_nt_worker.py"), problem_file(),
                                          {"dtype": args.dtype, "beta": args.beta, "c": net.act_c},
                                          tmp, timeout=(calls + 8) * args.max_seconds * 2 + 300)
                where = f"subprocess {py}"
            else:
                where = "in-process"
            try:
                sizes = ramp_sizes(n, min(n, args.probe_n), cap_n)
                ramp = {"sizes": sizes, "flops": [flops_model(method, dims, m, opts) for m in sizes],
                        "fits": [memory_model(method, dims, m, opts) <= max_bytes for m in sizes],
                        "budget": args.max_seconds, "warmup": args.warmup, "repeats": args.repeats}
                log(f"  {method:16s} ({where}) sizes {sizes[0]}..{sizes[-1]}")
                if runner is None:
                    m, times, peak, K, reason, trace = ramp_measure(
                        lambda m: make_in_process(method, net, x[:m], dims, opts), sizes, ramp["flops"],
                        ramp["fits"], args.max_seconds, args.warmup, args.repeats, log=log)
                    K = K.detach().to(torch.float64)
                else:
                    rec = runner.run(ramp)
                    m, times, peak, reason = rec["n"], rec["times"], rec["peak_bytes"], rec["reason"]
                    K = torch.from_numpy(np.load(rec["kernel"]))
                    os.remove(rec["kernel"])
                    versions.update(runner.versions)
                if cap_n is not None and m < n and not reason:
                    reason = f"n capped at {cap_n}"
                kernels[method] = (m, K)
                row.measured_n, row.times = m, times
                row.measured_seconds = _median(times)
                row.flops = flops_model(method, dims, n, opts)
                fm = flops_model(method, dims, m, opts)
                row.gflops = fm / row.measured_seconds / 1e9
                row.pct_matmul = 100.0 * fm / row.measured_seconds / rates[args.dtype]
                row.peak_bytes = peak
                if m == n:
                    row.seconds = row.measured_seconds
                else:
                    row.status = "extrapolated"
                    row.seconds = row.measured_seconds * row.flops / fm
                    row.note = f"measured at n={m} ({reason}), time scaled by its flop model"
                if where != "in-process":
                    row.note = (row.note + "; " if row.note else "") + "subprocess (own venv)"
                log(f"  {method:16s} n={m}: median {row.measured_seconds:.4g} s"
                    + (f" -> {row.seconds:.4g} s at n={n} (extrap.)" if m != n else ""))
            except Exception as exc:  # a failing peer must not sink the table
                row.status = "failed"
                row.note = f"{type(exc).__name__}: {str(exc)[:200]}"
                log(f"  {method:16s} failed: {row.note}")
            gc.collect()

        # float64 truth: ntk_fast's structured Gram in float64 at the largest measured size (prefix property:
        # the Gram of x[:m] is the leading m x m block of the Gram of x)
        m_max = max([k[0] for k in kernels.values()], default=0)
        if m_max:
            K64 = ntk_fast.empirical_ntk(net64, x64[:m_max])
            for row in rows:
                if row.method in kernels:
                    m, K = kernels[row.method]
                    ref = K64[:m, :m]
                    row.max_rel_err = ((K - ref).abs().max() / ref.abs().max()).item()
            del K64
        kernels.clear()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"n": n, "h": h, "d": args.d, "L": args.L, "dtype": args.dtype,
            "P": dims.P, "S": dims.S, "rows": [r.__dict__ for r in rows], "versions": versions, "notes": notes}


# ------------------------------------------------------------------------------------------ output

def _fmt_s(row: dict) -> str:
    if row["seconds"] is None:
        return "—"
    s = row["seconds"]
    txt = f"{s:.3g}" if s < 1000 else f"{s:.0f}"
    return f"~{txt} (extrap.)" if row["status"] == "extrapolated" else txt


def _fmt_err(e) -> str:
    return "—" if e is None else f"{e:.1e}"


def _fmt_mem(b) -> str:
    if b is None or b < 0:
        return "—"
    return f"{b / 2**20:.0f} MiB"


def case_table(case: dict, rates: Dict[str, float]) -> List[str]:
    lines = [f"n={case['n']}, d={case['d']}, h={case['h']}, L={case['L']}, {case['dtype']}, x2 = x1 "
             f"(P = {case['P']:,} weights; torch.mm {rates[case['dtype']] / 1e9:.0f} GFLOP/s in this run)", "",
             "| method | time s | measured at n | counted GFLOP | GFLOP/s | % of torch.mm | peak extra memory "
             "| max rel err vs float64 | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    best = min((r["seconds"] for r in case["rows"] if r["seconds"] is not None), default=None)
    for r in case["rows"]:
        label = LABELS.get(r["method"], r["method"])
        if r["seconds"] is None:
            lines.append(f"| {label} | {r['status']} | | | | | | | {r['note']} |")
            continue
        rel = f" ({r['seconds'] / best:.1f}x)" if best and r["seconds"] > best * 1.0001 else ""
        lines.append(
            f"| {label} | {_fmt_s(r)}{rel} | {r['measured_n']} | {r['flops'] / 1e9:.4g} | {r['gflops']:.1f} | "
            f"{r['pct_matmul']:.0f}% | {_fmt_mem(r['peak_bytes'])} | "
            f"{_fmt_err(r['max_rel_err'])} | {r['note']} |")
    return lines


def plot_results(result: dict, path: str) -> Optional[str]:
    """Log-log time vs n (one panel per h) and time vs h (one panel per n); hollow markers: extrapolated."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return _plot_elsewhere(result, path)
    cases = result["cases"]
    hs = sorted({c["h"] for c in cases})
    ns = sorted({c["n"] for c in cases})
    panels = ([("n", h) for h in hs] if len(ns) > 1 else []) + ([("h", n) for n in ns] if len(hs) > 1 else [])
    if not panels:
        panels = [("n", hs[0])]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    methods = [m for m in ALL_METHODS if any(r["method"] == m for c in cases for r in c["rows"])]
    colors = {m: f"C{i}" for i, m in enumerate(ALL_METHODS)}
    for ax, (axis, fixed) in zip(axes[0], panels):
        sel = [c for c in cases if (c["h"] == fixed if axis == "n" else c["n"] == fixed)]
        sel.sort(key=lambda c: c[axis])
        for m in methods:
            pts = [(c[axis], r["seconds"], r["status"]) for c in sel for r in c["rows"]
                   if r["method"] == m and r["seconds"] is not None]
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color=colors[m], label=m, lw=1.2)
            for xv, yv, st in pts:
                ax.plot([xv], [yv], "o", color=colors[m], mfc="none" if st == "extrapolated" else colors[m])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(axis)
        ax.set_ylabel("seconds")
        ax.set_title(f"time vs {axis} ({'h' if axis == 'n' else 'n'}={fixed}, {result['config']['dtype']})")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"empirical NTK Gram, d={result['config']['d']}, L={result['config']['L']}; "
                 f"hollow = extrapolated; {result['machine'].get('cpu_model', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_elsewhere(result: dict, path: str) -> Optional[str]:
    """No matplotlib here: plot with the peers venv's Python if it has it."""
    py = result["config"].get("peers_python")
    if not py or not os.path.exists(py):
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(result, f)
        jpath = f.name
    code = ("import json,sys; sys.path.insert(0, sys.argv[3]); import importlib.util as u; "
            "s=u.spec_from_file_location('br', sys.argv[4]); br=u.module_from_spec(s); s.loader.exec_module(br); "
            "br.plot_results(json.load(open(sys.argv[1])), sys.argv[2])")
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    r = subprocess.run([py, "-c", code, jpath, path, REPO, os.path.abspath(__file__)], capture_output=True,
                       text=True, env=env)
    os.remove(jpath)
    return path if r.returncode == 0 and os.path.exists(path) else None


def busy_warning(mach: dict) -> str:
    """A warning when the machine was busy at the start (load average over half the cores)."""
    la, cpus = mach.get("load_average"), mach.get("cpus") or 1
    if not la or la[0] <= 0.5 * cpus:
        return ""
    return (f"**Warning: the machine was busy (load average {la[0]:.1f} on {cpus} cores): these timings are not "
            "reliable.** With the cores oversubscribed, torch's OpenMP threads slow small and medium calls down "
            "by 10-60x here (2 threads vs 1), while JAX's thread pool suffers much less. Re-run on a quiet machine.")


def markdown(result: dict) -> str:
    cfg, mach, rates = result["config"], result["machine"], result["matmul_gflops"]
    rates_flops = {k: v * 1e9 for k, v in rates.items()}
    lines = [f"# Empirical NTK Gram, side by side ({result['date']})", "",
             f"Machine: {mach.get('cpu_model', mach.get('processor'))}, {mach.get('cpus')} cores, "
             f"torch {mach.get('torch')}, {mach.get('threads')} threads"
             + (f", load average at start {mach['load_average'][0]:.2f}" if mach.get("load_average") else "")
             + f". Command: `{result['command']}`.", "",
             *(busy_warning(mach) and [busy_warning(mach), ""] or []),
             f"torch.mm rate measured in this run ({cfg['dtype']}, square {cfg['matmul_n']}): "
             + ", ".join(f"{v:.0f}" for v in result["matmul_gflops_samples"]) + " GFLOP/s (the largest is used).",
             ""]
    for case in result["cases"]:
        lines += case_table(case, rates_flops) + [""]
    vers = {}
    for case in result["cases"]:
        vers.update(case.get("versions", {}))
    lines += ["Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(vers.items())) + ".", "",
              "Time: median of the timed calls after warm-up; `~x (extrap.)`: measured at the smaller n shown and "
              "scaled by the method's flop model; `(k.kx)`: times the fastest. Counted GFLOP: the method's own "
              "flop model at n (docs/benchmarks.md); GFLOP/s and % of torch.mm are at the measured n. Peak extra "
              "memory: peak RSS above the RSS before the call (process-wide; the subprocess's own for peers). "
              "Max rel err: max|K - K64| / max|K64| against ntk_fast's float64 Gram of the same net and points "
              "(a kernel of another network or parameterisation would show an O(1) error)."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ main

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ntk_fast.bench_runner", description=__doc__,
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
    p.add_argument("--peers-python", default=_default_python("NTK_FAST_PEERS_PYTHON", (".venv-peers", "venv-peers")),
                   help="Python of a venv with nngeometry/asdfghjkl (used when they are not importable here)")
    p.add_argument("--peers-subprocess", action="store_true",
                   help="run nngeometry/ASDL in the peers venv even when importable here")
    p.add_argument("--nt-python", default=_default_python("NTK_FAST_NT_PYTHON", (".venv-nt", "venv-nt")),
                   help="Python of the neural-tangents venv (see shared/PEERS.md for the pins)")
    p.add_argument("--out-dir", default=None, help="folder of the results (default bench/results of the repo)")
    p.add_argument("--tag", default=None, help="suffix of the result files (default from n, h, dtype)")
    p.add_argument("--no-save", action="store_true", help="print only")
    p.add_argument("--plot", action="store_true", help="write the log-log plot (PNG; default for sweeps)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--no-malloc-tuning", action="store_true",
                   help="leave glibc's malloc as it is (by default large freed blocks go back to the OS, for the "
                        "peak-memory column; the setting stays for the rest of the process)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.no_malloc_tuning:
        from ._bench_ramp import fix_malloc
        fix_malloc()
    from .timing import matmul_rate
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
    dtype = getattr(torch, args.dtype)
    machine = machine_dict()
    date = datetime.date.today().isoformat()
    argv_s = " ".join(sys.argv[1:]) if argv is None else " ".join(argv)
    result = {"what": "empirical NTK Gram of the paper's FC net, ntk_fast vs alternatives, symmetric case",
              "command": f"python -m ntk_fast.bench_runner {argv_s}".strip(), "date": date, "machine": machine,
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
    md = markdown(result)
    print()
    print(md)
    if not args.no_save:
        out_dir = args.out_dir or os.path.join(REPO if os.path.isdir(os.path.join(REPO, "bench")) else os.getcwd(),
                                               "bench", "results")
        os.makedirs(out_dir, exist_ok=True)
        sweep = len(args.n) > 1 or len(args.h) > 1
        tag = args.tag or (f"sweep-n{min(args.n)}-{max(args.n)}-h{min(args.h)}-{max(args.h)}-{args.dtype}" if sweep
                           else f"n{args.n[0]}-h{args.h[0]}-{args.dtype}")
        base = os.path.join(out_dir, f"{machine_slug()}-{date}-{tag}")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
