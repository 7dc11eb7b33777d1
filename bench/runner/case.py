"""One case of the benchmark: every method at one (n, h), measured by the size ramp, checked against float64.

Each method ramps up through n/2^k (ramp.ramp_measure); when it stops below n its time is extrapolated to n with
its flop model.  The float64 truth is ntk_fast's Gram of the float64 copy of the same net at the largest size
measured (prefix property: the Gram of x[:m] is the leading m x m block of the Gram of x).
"""
from __future__ import annotations

import gc
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .methods import PEERS, make_in_process
from .peer_worker import peer_available, peer_version, torch_sequential
from .problem import Dims, flops_model, make_problem, memory_model
from .ramp import ramp_measure, ramp_sizes
from .subprocess_runner import NT_WORKER, PEER_WORKER, SubprocessRunner


@dataclass
class Row:
    """One method's line of a case table."""
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


def median(ts: Sequence[float]) -> float:
    s = sorted(ts)
    return s[len(s) // 2] if len(s) % 2 else 0.5 * (s[len(s) // 2 - 1] + s[len(s) // 2])


class _Case:
    """The state shared by the methods of one case: problem, options, temporary folder, float64 kernels."""

    def __init__(self, n: int, h: int, args, rates: Dict[str, float], log):
        self.n, self.h, self.args, self.rates, self.log = n, h, args, rates, log
        self.dtype = getattr(torch, args.dtype)
        self.dims = Dims(args.d, h, args.L, torch.empty((), dtype=self.dtype).element_size())
        self.x, self.x64, self.net, self.net64 = make_problem(n, args.d, h, args.L, args.beta, self.dtype,
                                                              args.seed)
        self.opts = {"jac_block": args.jac_block, "ntvp_block": args.ntvp_block, "peer_block": args.peer_block}
        self.kernels: Dict[str, tuple] = {}
        self.versions = {"torch": torch.__version__}
        self.tmp = tempfile.mkdtemp(prefix="ntk_fast-bench-")
        self._npz: Optional[str] = None
        self._seq = None

    def problem_file(self) -> str:
        """x and the weights (torch orientation) in tmp/problem.npz, for the subprocess workers."""
        if self._npz is None:
            self._npz = os.path.join(self.tmp, "problem.npz")
            np.savez(self._npz, x=self.x.numpy(),
                     **{f"W{l}": w.detach().to(self.dtype).numpy() for l, w in enumerate(self.net.weights)})
        return self._npz

    def timeout(self) -> float:
        return (self.args.warmup + self.args.repeats + 8) * self.args.max_seconds * 2 + 300

    def where(self, method: str, row: Row):
        """(runner or None, description); None, None with row marked skipped when the method cannot run here."""
        args = self.args
        if method in PEERS and not args.peers_subprocess and peer_available(method):
            if self._seq is None:
                self._seq = torch_sequential([w.detach() for w in self.net.weights], args.beta, self.net.act_c,
                                             self.dtype)
            self.opts["seq_model"] = self._seq
            self.versions[method] = peer_version(method)
            return None, "in-process"
        if method in PEERS:
            py, script = args.peers_python, PEER_WORKER
            spec = {"dtype": args.dtype, "beta": args.beta, "c": self.net.act_c, "block": args.peer_block,
                    "threads": torch.get_num_threads()}
            missing = (f"{method} not importable here and no peers venv "
                       "(pip install -e .[peers], or scripts/setup_peers.sh; --peers-python)")
        elif method == "neural_tangents":
            py, script = args.nt_python, NT_WORKER
            spec = {"dtype": args.dtype, "beta": args.beta, "c": self.net.act_c}
            missing = "no neural-tangents venv (scripts/setup_peers.sh creates .venv-nt; --nt-python)"
        else:
            return None, "in-process"
        if not py or not os.path.exists(py):
            row.status, row.note = "skipped", missing
            self.log(f"  {method:16s} skipped: {row.note}")
            return None, None
        runner = SubprocessRunner(method, py, script, self.problem_file(), spec, self.tmp, timeout=self.timeout())
        return runner, f"subprocess {py}"

    def measure(self, method: str, row: Row, runner, where: str) -> None:
        """Ramp, time and record ``method`` into ``row`` (the kernel at the measured size is kept)."""
        args, dims, opts, n = self.args, self.dims, self.opts, self.n
        cap_n = args.brute_max_n if method == "brute_force" else None
        sizes = ramp_sizes(n, min(n, args.probe_n), cap_n)
        ramp = {"sizes": sizes, "flops": [flops_model(method, dims, m, opts) for m in sizes],
                "fits": [memory_model(method, dims, m, opts) <= args.max_memory_gb * 2**30 for m in sizes],
                "budget": args.max_seconds, "warmup": args.warmup, "repeats": args.repeats}
        self.log(f"  {method:16s} ({where}) sizes {sizes[0]}..{sizes[-1]}")
        if runner is None:
            m, times, peak, K, reason, _ = ramp_measure(
                lambda m: make_in_process(method, self.net, self.x[:m], dims, opts), sizes, ramp["flops"],
                ramp["fits"], args.max_seconds, args.warmup, args.repeats, log=self.log)
            K = K.detach().to(torch.float64)
        else:
            rec = runner.run(ramp)
            m, times, peak, reason = rec["n"], rec["times"], rec["peak_bytes"], rec["reason"]
            K = torch.from_numpy(np.load(rec["kernel"]))
            os.remove(rec["kernel"])
            self.versions.update(runner.versions)
        if cap_n is not None and m < n and not reason:
            reason = f"n capped at {cap_n}"
        self.kernels[method] = (m, K)
        self._fill(row, method, m, times, peak, reason, remote=where != "in-process")

    def _fill(self, row: Row, method: str, m: int, times, peak, reason: str, remote: bool) -> None:
        row.measured_n, row.times = m, times
        row.measured_seconds = median(times)
        row.flops = flops_model(method, self.dims, self.n, self.opts)
        fm = flops_model(method, self.dims, m, self.opts)
        row.gflops = fm / row.measured_seconds / 1e9
        row.pct_matmul = 100.0 * fm / row.measured_seconds / self.rates[self.args.dtype]
        row.peak_bytes = peak
        if m == self.n:
            row.seconds = row.measured_seconds
        else:
            row.status = "extrapolated"
            row.seconds = row.measured_seconds * row.flops / fm
            row.note = f"measured at n={m} ({reason}), time scaled by its flop model"
        if remote:
            row.note = (row.note + "; " if row.note else "") + "subprocess (own venv)"
        self.log(f"  {method:16s} n={m}: median {row.measured_seconds:.4g} s"
                 + (f" -> {row.seconds:.4g} s at n={self.n} (extrap.)" if m != self.n else ""))

    def check_float64(self, rows: List[Row]) -> None:
        """max|K - K64| / max|K64| per method, K64 = ntk_fast's float64 Gram at the largest measured size."""
        import ntk_fast
        m_max = max([k[0] for k in self.kernels.values()], default=0)
        if m_max:
            K64 = ntk_fast.empirical_ntk(self.net64, self.x64[:m_max])
            for row in rows:
                if row.method in self.kernels:
                    m, K = self.kernels[row.method]
                    ref = K64[:m, :m]
                    row.max_rel_err = ((K - ref).abs().max() / ref.abs().max()).item()
        self.kernels.clear()


def run_case(n: int, h: int, args, methods: Sequence[str], rates: Dict[str, float], log) -> dict:
    """All methods at one (n, h).  Returns the case dict of the JSON output."""
    case = _Case(n, h, args, rates, log)
    rows: List[Row] = []
    try:
        for method in methods:
            row = Row(method, n, h)
            rows.append(row)
            runner, where = case.where(method, row)
            if where is None:
                continue
            try:
                case.measure(method, row, runner, where)
            except Exception as exc:  # a failing peer must not sink the table
                row.status = "failed"
                row.note = f"{type(exc).__name__}: {str(exc)[:200]}"
                log(f"  {method:16s} failed: {row.note}")
            gc.collect()
        case.check_float64(rows)
    finally:
        shutil.rmtree(case.tmp, ignore_errors=True)
    return {"n": n, "h": h, "d": args.d, "L": args.L, "dtype": args.dtype, "P": case.dims.P, "S": case.dims.S,
            "rows": [r.__dict__ for r in rows], "versions": case.versions, "notes": []}
