"""Self-check of the compiled ops on this machine: ``python -m ntk_fast doctor``.

Each op of ``ntk_fast._C`` runs on small random inputs with edge cases (widths of one column, sizes that are
not multiples of the GPU tiles, saturating activations) on every device (the CPU and each visible CUDA GPU)
and in each precision, and is compared with its pure-torch reference evaluated in float64 on the CPU.  The
error reported is normwise relative,

    err = max |got - ref| / max(max |ref|, tiny),

against a tolerance per precision (float64 1e-10, float32 1e-4, tf32 5e-3; docs/cuda.md gives the error
bounds these sit well above).  An op that fails anywhere (wrong values or an exception) is disabled for the
rest of the process with ``ntk_fast.ops._loader.disable``, so that its wrappers use the reference; the
table and ``_loader.status()`` say which.  Cost: milliseconds per op and device.

Without a GPU only the CPU ops are checked (and the report says so).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from ntk_fast.ops import _loader
from ntk_fast.ops import reference as ref_flow
from ntk_fast.ops.reference import gram_full_reference, gram_reference
from ntk_fast.ops.packed import pack_symmetric
from ntk_fast.ops.reference import kernel_flow_step_ref

__all__ = ["CheckResult", "check_cuda", "run_checks", "format_table", "main", "OPS"]

F64 = torch.float64
TOL = {"float64": 1e-10, "float32": 1e-4, "tf32": 5e-3}


@dataclass
class CheckResult:
    op: str
    device: str
    precision: str          # "float64", "float32" or "tf32"
    max_err: float          # normwise relative error (NaN when the op raised or is missing)
    tol: float
    passed: bool
    note: str = ""          # exception text, or "missing"


def _native(op: str):
    """The registered op ``torch.ops.ntk_fast.<op>`` (a hook for the tests)."""
    return getattr(torch.ops.ntk_fast, op)


def _rel_err(pairs: Iterable[Tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Largest normwise relative error over (got, ref) pairs, in float64 on the CPU."""
    worst = 0.0
    for got, ref in pairs:
        g, r = got.detach().to("cpu", F64), ref.detach().to("cpu", F64)
        if g.shape != r.shape:
            return math.inf
        if not torch.equal(torch.isfinite(g), torch.isfinite(r)):
            return math.inf
        fin = torch.isfinite(r)
        if not fin.any():
            continue
        scale = max(float(r[fin].abs().max()), 1e-300)
        worst = max(worst, float((g[fin] - r[fin]).abs().max()) / scale)
    return worst


def _rand(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=F64)


# ------------------------------------------------------------------------------------------------ the checks
# Each takes (device, dtype, precision, gen) and returns the (got, reference) pairs.

def _check_gram(dev, dtype, precision, gen):
    n1, n2 = 37, 19                      # not multiples of the 64 / 128 tiles
    fans = [(5, 7), (7, 1), (3, 13)]     # a width-1 D (the last layer), widths not multiples of 16 bytes
    scales = [0.5, 1.0, 2.0]
    A1 = [_rand(gen, n1, a) for a, _ in fans]
    D1 = [_rand(gen, n1, d) for _, d in fans]
    A2 = [_rand(gen, n2, a) for a, _ in fans]
    D2 = [_rand(gen, n2, d) for _, d in fans]
    on = [[t.to(dev, dtype) for t in lst] for lst in (A1, D1, A2, D2)]
    # The reference from the same (rounded) inputs, in float64.
    rA1, rD1, rA2, rD2 = ([t.to(F64).cpu() for t in lst] for lst in on)
    op = _native("gram")
    sym = op(on[0], on[1], None, None, scales, 0, precision)
    non = op(on[0], on[1], on[2], on[3], scales, 0, precision)
    return [(sym, gram_reference(rA1, rD1, None, None, scales)),
            (non, gram_reference(rA1, rD1, rA2, rD2, scales))]


def _check_gram_full(dev, dtype, precision, gen):
    n1, n2, k = 13, 6, 3                 # tiles not filled; one token layer, one Hadamard layer, a width-1 D
    layers = [(2, 5, 3), (1, 4, 1)]
    A1 = [_rand(gen, n1, T, p) for T, p, _ in layers]
    D1 = [_rand(gen, n1, k, T, q) for T, _, q in layers]
    A2 = [_rand(gen, n2, T, p) for T, p, _ in layers]
    D2 = [_rand(gen, n2, k, T, q) for T, _, q in layers]
    on = [[t.to(dev, dtype) for t in lst] for lst in (A1, D1, A2, D2)]
    rA1, rD1, rA2, rD2 = ([t.to(F64).cpu() for t in lst] for lst in on)
    op = _native("gram_full")
    # a dense layer and a factored one (w given: d = s (n, 1, 1, q), D[i, c] = s_i o w_c), k = 6: the symmetric-pair
    # path of the CPU kernel
    kf, q = 6, 7
    fw = [None, _rand(gen, kf, q).to(dev, dtype)]
    fa, fd = [], []
    for n in (n1, n2):
        fa.append([_rand(gen, n, 1, 2).to(dev, dtype), _rand(gen, n, 1, 4).to(dev, dtype)])
        fd.append([_rand(gen, n, kf, 1, 3).to(dev, dtype), _rand(gen, n, 1, 1, q).to(dev, dtype)])
    up = lambda ts: [None if t is None else t.to(F64).cpu() for t in ts]     # noqa: E731
    return [(op(on[0], on[1], None, None, [0.5, 2.0], 0), gram_full_reference(rA1, rD1, None, None, [0.5, 2.0])),
            (op(on[0], on[1], on[2], on[3], [0.5, 2.0], 2), gram_full_reference(rA1, rD1, rA2, rD2, [0.5, 2.0])),
            (op(fa[0], fd[0], fa[1], fd[1], [1.0, 3.0], 0, fw),
             gram_full_reference(up(fa[0]), up(fd[0]), up(fa[1]), up(fd[1]), [1.0, 3.0], up(fw)))]


def _check_flow_step(dev, dtype, precision, gen):
    K, P = 3, 1001
    pairs = []
    for tau in (0.0, 0.37):
        w, g, v = (_rand(gen, K, P).to(dtype) for _ in range(3))
        dt = torch.rand(K, generator=gen, dtype=F64).to(dtype)
        w_out, v_out = torch.empty_like(w, device=dev), torch.empty_like(v, device=dev)
        vin = v.to(dev) if tau > 0 else torch.empty(0, dtype=dtype, device=dev)
        vo = v_out if tau > 0 else torch.empty(0, dtype=dtype, device=dev)
        _native("flow_step")(w.to(dev), g.to(dev), vin, dt.to(dev), tau, w_out, vo)
        rw, rv = torch.empty_like(w, dtype=F64), torch.empty_like(w, dtype=F64)
        ref_flow.flow_step(w.double(), g.double(), v.double() if tau > 0 else None, dt.double(), tau, rw, rv)
        pairs.append((w_out, rw))
        if tau > 0:
            pairs.append((v_out, rv))
    return pairs


def _check_flow_grad_stats(dev, dtype, precision, gen):
    g, gp = _rand(gen, 2, 777).to(dtype), _rand(gen, 2, 777).to(dtype)
    got = _native("flow_grad_stats")(g.to(dev), gp.to(dev))
    return [(got, ref_flow.flow_grad_stats(g.double(), gp.double()))]


def _check_flow_loss(dev, dtype, precision, gen):
    K, n = 2, 515
    pairs = []
    for kind in ("softhinge", "qhinge", "hinge", "mse"):
        f, f0, Fp = (_rand(gen, K, n).to(dtype) for _ in range(3))
        y = torch.where(_rand(gen, n) > 0, 1.0, -1.0).to(dtype) if kind != "mse" else _rand(gen, n).to(dtype)
        got = _native("flow_loss")(f.to(dev), f0.to(dev), y.to(dev), Fp.to(dev), 0.7, 20.0, kind)
        want = ref_flow.flow_loss(f.double(), f0.double(), y.double(), Fp.double(), 0.7, 20.0, kind)
        pairs += list(zip(got, want))
    return pairs


def _check_softplus_act(dev, dtype, precision, gen):
    z = (_rand(gen, 33, 65) * 4).to(dtype)
    z.view(-1)[:4] = torch.tensor([0.0, 200.0, -200.0, 30.0], dtype=dtype)   # saturation, both tails
    a, s = z.to(dev, copy=True), torch.empty(z.shape, dtype=dtype, device=dev)
    _native("softplus_act")(a, s, 5.0, 0.3)
    ra, rs = z.double().clone(), torch.empty(z.shape, dtype=F64)
    ref_flow.softplus_act(ra, rs, 5.0, 0.3)
    return [(a, ra), (s, rs)]


def _check_kernel_flow_step(dev, dtype, precision, gen):
    E, n = 3, 70                         # n not a multiple of the 64 tile
    A = _rand(gen, n, n + 3)
    K = A @ A.T / n
    pairs = []
    for pb in (0, 64):
        theta = (pack_symmetric(K, pb) if pb else K).to(dtype)
        y = torch.where(_rand(gen, E, n) > 0, 1.0, -1.0).to(dtype)
        f, g, r, c = (_rand(gen, E, n).to(dtype) for _ in range(4))
        dt = torch.rand(E, generator=gen, dtype=F64).to(dtype)
        active = torch.tensor([True, False, True])
        args = [t.to(dev) for t in (theta, y, f, g, r, c, dt, active)]
        got = _native("kernel_flow_step")(*args, "softhinge", 20.0, pb, 0)
        want = kernel_flow_step_ref(*(t.double() if t.is_floating_point() else t
                                      for t in (theta, y, f, g, r, c, dt, active)), "softhinge", 20.0, pb)
        pairs += list(zip(got, want))
    return pairs


def _limit_args(x1: torch.Tensor, x2: torch.Tensor, activation: str, L: int, tabulate: bool):
    """(q1, q2, table, nodes, weights) of ``limit_kernels`` for these inputs, float64 on the CPU (a fixed
    20-point rule and a 16-row table: the check compares the op with its reference on the same arguments)."""
    from ntk_fast.limits.quadrature import normal_rule, resolve_activation
    from ntk_fast.limits.recursion import layer_variances
    from ntk_fast.limits.tabulated import build_tables
    act = resolve_activation(activation, 5.0)
    nodes, weights = normal_rule(20) if activation != "relu" else (torch.empty(0, dtype=F64),) * 2
    d = x1.shape[1]
    q1 = layer_variances(act, x1.pow(2).sum(1) / d, L, nodes, weights)
    q2 = layer_variances(act, x2.pow(2).sum(1) / d, L, nodes, weights)
    table = build_tables(act, q1[:, 0], 16, nodes, weights) if tabulate else torch.empty(0, dtype=F64)
    return act, (q1, q2, table, nodes, weights)


def _sphere(x: torch.Tensor) -> torch.Tensor:
    """Rows rescaled to norm sqrt(d) (equal norms: the tabulated path of limit_kernels)."""
    return x / x.norm(dim=1, keepdim=True) * math.sqrt(x.shape[1])


def _check_limit_kernels(dev, dtype, precision, gen):
    from ntk_fast.ops.reference_limits import limit_kernels_ref
    n1, n2, d, L = 9, 7, 5, 2
    x1, x2 = _rand(gen, n1, d), _rand(gen, n2, d)
    pairs = []
    # ReLU closed form (symmetric), softplus by quadrature (x2, bias), softplus tabulated (equal norms).
    for activation, a, b, sym, tab, bias in (("relu", x1, x1, True, False, 0.0),
                                             ("softplus", x1, x2, False, False, 1.0),
                                             ("softplus", _sphere(x1), _sphere(x2), False, True, 0.0)):
        a, b = a.to(dtype).to(F64), b.to(dtype).to(F64)          # the reference sees the rounded inputs
        act, extra = _limit_args(a, b, activation, L, tab)
        tail = (sym, L, act.name, act.beta, act.c, bias, 0)
        got = _native("limit_kernels")(a.to(dev, dtype), b.to(dev, dtype), *(t.to(dev) for t in extra), *tail)
        pairs += list(zip(got, limit_kernels_ref(a, b, *extra, *tail)))
    return pairs


# op -> (check, precisions); precision names map to (dtype, the op's precision argument).
OPS: Dict[str, Tuple[Callable, Sequence[str]]] = {
    "gram": (_check_gram, ("float64", "float32", "tf32")),
    "gram_full": (_check_gram_full, ("float64", "float32")),
    "flow_step": (_check_flow_step, ("float64", "float32")),
    "flow_grad_stats": (_check_flow_grad_stats, ("float64", "float32")),
    "flow_loss": (_check_flow_loss, ("float64", "float32")),
    "softplus_act": (_check_softplus_act, ("float64", "float32")),
    "kernel_flow_step": (_check_kernel_flow_step, ("float64", "float32")),
    "limit_kernels": (_check_limit_kernels, ("float64", "float32")),
}
_PREC = {"float64": (torch.float64, "highest"), "float32": (torch.float32, "highest"),
         "tf32": (torch.float32, "tf32")}


def default_devices() -> List[torch.device]:
    """The CPU and every visible CUDA GPU."""
    devs = [torch.device("cpu")]
    if torch.cuda.is_available():
        devs += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return devs


def run_checks(devices: Optional[Sequence[torch.device]] = None, ops: Optional[Sequence[str]] = None, *,
               disable_failing: bool = True, seed: int = 0) -> List[CheckResult]:
    """Check every op (or ``ops``) on every device (default: the CPU and each GPU) in each precision.

    Ops that fail anywhere are disabled with ``_loader.disable`` when ``disable_failing``.
    """
    devices = default_devices() if devices is None else [torch.device(d) for d in devices]
    results: List[CheckResult] = []
    for op in (ops or list(OPS)):
        check, precisions = OPS[op]
        for dev in devices:
            for prec in precisions:
                if prec == "tf32" and dev.type != "cuda":
                    continue                     # tf32 is a CUDA precision; on the CPU it equals float32
                results.append(_run_one(op, check, dev, prec, seed))
    if disable_failing:
        for r in results:
            if not r.passed and r.note != "missing":
                _loader.disable(r.op, f"self-check failed on {r.device} ({r.precision}): "
                                      f"{r.note or f'max error {r.max_err:.2e} > {r.tol:.0e}'}")
    return results


def _run_one(op: str, check: Callable, dev: torch.device, prec: str, seed: int) -> CheckResult:
    tol = TOL[prec]
    if not _loader.registered(op):
        return CheckResult(op, str(dev), prec, math.nan, tol, False, "missing")
    dtype, precision = _PREC[prec]
    gen = torch.Generator().manual_seed(seed)
    try:
        err = _rel_err(check(dev, dtype, precision, gen))
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)          # surface asynchronous kernel faults here
    except Exception as exc:                     # noqa: BLE001 - any failure of the op is reported
        return CheckResult(op, str(dev), prec, math.nan, tol, False, f"{type(exc).__name__}: {exc}".splitlines()[0])
    return CheckResult(op, str(dev), prec, err, tol, err <= tol)


def format_table(results: Sequence[CheckResult]) -> str:
    rows = [("op", "device", "precision", "max error", "tolerance", "result")]
    for r in results:
        verdict = "missing" if r.note == "missing" else ("pass" if r.passed else "FAIL")
        err = "-" if math.isnan(r.max_err) else f"{r.max_err:.1e}"
        rows.append((r.op, r.device, r.precision, err, f"{r.tol:.0e}", verdict + ("" if r.passed or r.note in (
            "", "missing") else f" ({r.note[:80]})")))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row[:5], widths)) + "  " + row[5] for row in rows)


def check_cuda(devices: Optional[Sequence[str]] = None, ops: Optional[Sequence[str]] = None, *,
               verbose: bool = True) -> List[CheckResult]:
    """Check each compiled op on every visible CUDA GPU (or ``devices``) against its torch reference.

    Prints the table (op, device, precision, max error, tolerance, result) when ``verbose`` and returns its
    rows; ops that fail are disabled for the rest of the process (their wrappers use the reference).  Without
    a GPU it says so and checks the CPU ops instead, like ``python -m ntk_fast doctor``.
    Cost: milliseconds per op, precision and device.
    """
    say = print if verbose else (lambda *a: None)
    if not _loader.extension_available():
        say(f"ntk_fast._C could not be loaded ({_loader.LOAD_ERROR}); every op runs its pure-torch reference.")
        return []
    if devices is None:
        if torch.cuda.is_available():
            devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        else:
            say("no CUDA GPU visible to torch (torch.cuda.is_available() is False): checking the CPU ops only")
            devices = ["cpu"]
    results = run_checks(devices, ops)
    say(format_table(results))
    return results


def main(devices: Optional[Sequence[str]] = None, ops: Optional[Sequence[str]] = None) -> int:
    """Print the table and the ops' status; 0 when every check passed, 1 otherwise."""
    if not _loader.extension_available():
        print(f"ntk_fast._C could not be loaded ({_loader.LOAD_ERROR}); every op runs its pure-torch reference.")
        return 1
    if devices is None and not torch.cuda.is_available():
        print("no CUDA GPU visible to torch: checking the CPU ops only")
    results = run_checks(devices, ops)
    print(format_table(results))
    status = _loader.status()
    for op in {r.op for r in results}:
        status.setdefault(op, "native" if _loader.native(op) else "missing")
    print("\nop status in this process:")
    for op in sorted(status):
        print(f"  {op}: {status[op]}")
    bad = [r for r in results if not r.passed]
    if bad:
        print(f"\n{len(bad)} check(s) failed; failing ops are disabled (their torch reference is used).")
    return 1 if bad else 0
