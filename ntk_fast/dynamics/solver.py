"""Frozen-kernel solver: kernel gradient flow with the trainer's loss and step rule, and closed forms.

Dynamics (article notation, docs/design.md section 5).  For the model linearised at weights w*, with Theta the NTK
Gram of f at w* on the n training points, the outputs obey (no alpha appears)::

    dF/dt = -(1/n) Theta (l'(y o F) o y),          F(0) = 0,
    stop when y_i F_i >= 1 for all i (margin losses).

Writing r(F) = l'(y o F) o y and c(t) = int_0^t (1/n) r(F(s)) ds, F(t) = -Theta c(t), so the outputs on any
other points are F_test(t) = -Theta_test,train c(t): the solver accumulates c and never touches the test
kernel between records (the reference code instead solved lstsq(Theta, F_train) at the end).

Integration: explicit Euler with the trainer's adaptive step (ntk_fast.dynamics.steprule.StepRule).  From a state
(F, g = Theta r(F) / n) a trial step of size dt gives F' = F - dt g and g' = Theta r(F') / n; it is accepted
when dgrad = |g - g'|^2 / (|g| |g'|) < max_dgrad and dout = max|F' - F| = dt max|g| < max_dout.  One read of
Theta per attempt (torch.ops.ntk_fast.kernel_flow_step fuses the elementwise work, c, the product with the
upper triangle of Theta and the step statistics).  Attempts whose dout already fails are rejected before the
product (same decision, same dt, no Theta read).

Several problems at once: E label vectors sharing one Theta (K (n, n), y (E, n)), or E kernels (K (E, n, n))
with one or E label vectors; each problem follows its own step rule exactly as if run alone, and one pass
over a shared Theta serves all of them.

Closed forms: ``kernel_regression`` (ridge / interpolation by Cholesky) and ``mse_flow`` (the square-loss
gradient flow at any t from one eigendecomposition).
"""
from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, NamedTuple, Optional, Union

import numpy as np
import torch

from ntk_fast.ops.checks import all_finite
from ntk_fast.dynamics.losses import LOSSES, is_margin, loss_value
from ntk_fast.dynamics.config import FlowConfig, PathLike, flow_config, progress_bar
from ntk_fast.dynamics.observables import loglinspace, next_record
from ntk_fast.ops.packed import pack_symmetric, packed_tile
from ntk_fast.dynamics.results import RESUMABLE, V1_KERNEL_CONFIG, KernelFlowResult, atomic_save, load_checkpoint, overall_status
from ntk_fast.dynamics.steprule import dgrad_from_norms
from ntk_fast.dynamics.theta_op import InMemoryTheta, fingerprint
from ntk_fast.guards import DEFAULT_MAX_STEPS, DivergenceMonitor, check_gram, require_memory, solve_report
from ntk_fast.guards.estimates import kernel_flow_bytes, kernel_regression_bytes

__all__ = ["kernel_flow", "KernelFlowResult", "kernel_regression", "KernelRegression", "mse_flow", "MSEFlow",
           "frozen_kernel_run", "check_kernel", "check_labels"]


# ----------------------------------------------------------------------------------------------- validation
def check_kernel(K: Any, name: str = "K", n: Optional[int] = None, symmetric: bool = True,
                 batch_ok: bool = True) -> None:
    """Raise ValueError unless K is a finite float tensor (n, n) or (E, n, n), symmetric when asked.

    Symmetry is tested block by block (no transposed copy): |K - K^T| <= 1e-6 (float32: 1e-4) * max|K|.
    """
    if not isinstance(K, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(K).__name__}")
    if K.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{name} must be float32 or float64, got {K.dtype}")
    dims = (2, 3) if batch_ok else (2,)
    if K.dim() not in dims or K.shape[-1] != K.shape[-2]:
        want = "(n, n) or (E, n, n)" if batch_ok else "(n, n)"
        raise ValueError(f"{name} must be a square matrix {want}, got shape {tuple(K.shape)}")
    if n is not None and K.shape[-1] != n:
        raise ValueError(f"{name} is {K.shape[-1]} x {K.shape[-1]} but there are {n} training points")
    if K.numel() == 0:
        raise ValueError(f"{name} is empty")
    Kb = K if K.dim() == 3 else K.unsqueeze(0)
    size = Kb.shape[-1]
    bs = max(1, (1 << 24) // max(1, size))
    scale = 0.0
    for i0 in range(0, size, bs):
        blk = Kb[:, i0:i0 + bs]
        if not torch.isfinite(blk).all():
            raise ValueError(f"{name} has NaN or infinite entries (rows {i0}..{i0 + blk.shape[1] - 1})")
        scale = max(scale, float(blk.abs().amax()))
    if not symmetric:
        return
    tol = (1e-4 if K.dtype == torch.float32 else 1e-6) * max(scale, 1e-300)
    for i0 in range(0, size, bs):
        blk = Kb[:, i0:i0 + bs]
        diff = float((blk - Kb[:, :, i0:i0 + bs].transpose(1, 2)).abs().amax())
        if diff > tol:
            raise ValueError(f"{name} is not symmetric: max |{name} - {name}^T| = {diff:.3g} in rows {i0}.."
                             f"{i0 + blk.shape[1] - 1} (tolerance {tol:.3g}); a Gram matrix must be symmetric")


def check_labels(y: Any, name: str = "y", n: Optional[int] = None, pm1: bool = True) -> None:
    """Raise ValueError unless y is a finite float tensor (n,) or (E, n), with entries +-1 when pm1."""
    if not isinstance(y, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
    if y.dim() not in (1, 2):
        raise ValueError(f"{name} must have shape (n,) or (E, n), got {tuple(y.shape)}")
    if n is not None and y.shape[-1] != n:
        raise ValueError(f"{name} has {y.shape[-1]} entries per problem but the kernel is {n} x {n}")
    if not y.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got {y.dtype}")
    if not torch.isfinite(y).all():
        raise ValueError(f"{name} has NaN or infinite entries")
    if pm1 and not ((y == 1) | (y == -1)).all():
        bad = y[(y != 1) & (y != -1)].flatten()[:3].tolist()
        raise ValueError(f"{name} must hold labels +1/-1 for margin losses, found e.g. {bad}")


# ------------------------------------------------------------------------------------------------- solver
class StepStats(NamedTuple):
    """One row of the (E, 7) float64 statistics of ``ntk_fast::kernel_flow_step`` (one problem)."""
    g_sq: float          # |g|^2
    gp_sq: float         # |g'|^2
    diff_sq: float       # |g - g'|^2
    dout: float          # dt max|g|
    margin_min: float    # min_i y_i f'_i
    mean_loss: float     # mean_i l(y_i f'_i)
    gp_max: float        # max|g'|


@dataclass
class _Problem:
    """The inputs of kernel_flow, checked and laid out: the Theta operator (ntk_fast.dynamics.theta_op: in memory,
    dense or packed, or on disk by row blocks / rows split across ranks), labels Y (E, n), the test kernel
    (m, n) / (E, m, n) and labels (E, m), and the tiling (block)."""
    op: Any
    Y: torch.Tensor
    Kte: Optional[torch.Tensor]
    Yte: Optional[torch.Tensor]
    E: int
    EK: int
    n: int
    block: int


def _check_test(K_test_train, y_test, n: int, E: int, dtype, device, validate: bool, loss: str):
    """(Kte, Yte) of kernel_flow from K_test_train (m, n) / (E, m, n) and y_test (m,) / (E, m)."""
    if K_test_train is None:
        if y_test is not None:
            raise ValueError("kernel_flow: y_test needs K_test_train")
        return None, None
    if not isinstance(K_test_train, torch.Tensor) or K_test_train.dim() not in (2, 3) or \
            K_test_train.shape[-1] != n:
        raise ValueError(f"kernel_flow: K_test_train must be (m, {n}) or (E, m, {n}), got "
                         f"{tuple(K_test_train.shape) if isinstance(K_test_train, torch.Tensor) else K_test_train}")
    if K_test_train.dim() == 3 and K_test_train.shape[0] != E:
        raise ValueError(f"kernel_flow: K_test_train holds {K_test_train.shape[0]} kernels, expected {E}")
    if validate and not all_finite(K_test_train):
        raise ValueError("kernel_flow: K_test_train has NaN or infinite entries")
    Kte = K_test_train.to(dtype=dtype, device=device)
    m = Kte.shape[-2]
    Yte = None
    if y_test is not None:
        if validate:
            check_labels(y_test, "y_test", m, pm1=is_margin(loss))
        elif y_test.shape[-1] != m:
            raise ValueError(f"kernel_flow: y_test has {y_test.shape[-1]} entries, K_test_train has {m} rows")
        Yte = y_test.to(dtype=dtype, device=device).reshape(-1, m).expand(E, m)
        if y_test.dim() == 2 and y_test.shape[0] not in (1, E):
            raise ValueError(f"kernel_flow: y_test holds {y_test.shape[0]} label vectors, expected {E}")
    return Kte, Yte


def _prepare(K_train, y, K_test_train, y_test, packed: bool, block: Optional[int], validate: bool,
             loss: str) -> _Problem:
    """Check kernel_flow's tensors and lay them out (see :class:`_Problem`)."""
    if not isinstance(K_train, torch.Tensor) and _on_disk(K_train):
        return _prepare_disk(K_train, y, K_test_train, y_test, packed, block, validate, loss)
    if not isinstance(K_train, torch.Tensor) or K_train.dim() not in (2, 3):
        raise ValueError("kernel_flow: K_train must be a tensor (n, n) or (E, n, n), got "
                         f"{tuple(K_train.shape) if isinstance(K_train, torch.Tensor) else type(K_train).__name__}")
    n = K_train.shape[-1]
    if validate:
        check_kernel(K_train, "K_train")
        check_gram(K_train, "K_train", symmetric_checked=True)
        check_labels(y, "y", n, pm1=is_margin(loss))
    elif y.shape[-1] != n:
        raise ValueError(f"kernel_flow: y has {y.shape[-1]} entries but K_train is {n} x {n}")
    dtype, device = K_train.dtype, K_train.device
    EK = K_train.shape[0] if K_train.dim() == 3 else 1
    Ey = y.shape[0] if y.dim() == 2 else 1
    if EK > 1 and Ey > 1 and EK != Ey:
        raise ValueError(f"kernel_flow: K_train holds {EK} kernels but y holds {Ey} label vectors")
    E = max(EK, Ey)
    Y = y.to(dtype=dtype, device=device).reshape(-1, n).expand(E, n).contiguous()
    Kte, Yte = _check_test(K_test_train, y_test, n, E, dtype, device, validate, loss)
    require_memory(kernel_flow_bytes(K_train, E, packed, packed_tile(device) if packed else (block or 256)), "kernel_flow: "
                   f"the solver's copy of Theta (n = {n}, {E} problem(s), packed={packed})", device,
                   "Pass a contiguous K_train (no copy is made then), or solve fewer problems at once.")
    theta = K_train.contiguous()
    if device.type == "cuda":
        if block not in (None, 64):
            raise ValueError(f"kernel_flow: the CUDA kernel uses 64 x 64 tiles, got block={block}")
        block = 64
    elif block is None:
        block = 256
    packed_block = 0
    if packed:   # one layout, the tile edge of the device (ntk_fast/ops/packed.py); block: full storage's compute tile
        packed_block = packed_tile(device)
        theta = pack_symmetric(theta, packed_block)
    step_block = 0 if (packed or device.type == "cuda") else block
    return _Problem(InMemoryTheta(theta, n, packed_block, step_block), Y, Kte, Yte, E, EK, n, block)


def _on_disk(K: Any) -> bool:
    """A Theta that kernel_flow reads from disk by row blocks: a ``.npy`` path or a numpy array / memmap."""
    return isinstance(K, (str, os.PathLike, np.ndarray))


def _prepare_disk(K_train, y, K_test_train, y_test, packed: bool, block: Optional[int], validate: bool,
                  loss: str) -> _Problem:
    """Theta (n, n) in a ``.npy`` file or numpy memmap: this rank's rows by blocks of ``block`` rows
    (ntk_fast.distributed.flow.RowShard; all rows without a process group).  Memory: one block plus O(E n)."""
    from ntk_fast.distributed.flow import RowShard, check_disk_theta
    if packed:
        raise ValueError("kernel_flow: packed=True packs an in-memory K_train; an on-disk K_train is read by row "
                         "blocks (leave packed=False)")
    if block is not None and (not isinstance(block, int) or block < 1):
        raise ValueError(f"kernel_flow: block (rows per read of an on-disk K_train) must be an int >= 1, got {block!r}")
    shard = RowShard.from_file(K_train, block=block)
    n, dtype = shard.n, shard.dtype
    if not isinstance(y, torch.Tensor):
        raise ValueError(f"y must be a torch.Tensor, got {type(y).__name__}")
    if validate:
        check_labels(y, "y", n, pm1=is_margin(loss))
    elif y.dim() not in (1, 2) or y.shape[-1] != n:
        raise ValueError(f"kernel_flow: y must be ({n},) or (E, {n}), got {tuple(y.shape)}")
    E = y.shape[0] if y.dim() == 2 else 1
    Y = y.to(dtype=dtype).reshape(-1, n).expand(E, n).contiguous()
    Kte, Yte = _check_test(K_test_train, y_test, n, E, dtype, shard.device, validate, loss)
    esize = shard.arr.itemsize
    require_memory(float(esize) * (2 * shard.block * n + 14 * E * n), f"kernel_flow: one block of {shard.block} rows "
                   f"of the on-disk K_train (n = {n}) and the vectors of {E} problem(s)", "cpu",
                   "Pass a smaller block (rows per read).")
    if validate:
        check_disk_theta(shard, "K_train")
    return _Problem(shard, Y, Kte, Yte, E, 1, n, shard.block)


def _read_kernel_checkpoint(path: Any, config: Dict[str, Any]) -> Dict[str, Any]:
    """A solver checkpoint (format version 2, or 1 with the old config names), checked against ``config``."""
    st = load_checkpoint(path, "kernel_flow(resume=...)", ("F", "r", "g", "c", "dt", "t", "config", "history"))
    if "format_version" not in st:                     # version 1
        st = {**st, "config": {V1_KERNEL_CONFIG.get(k, k): v for k, v in st["config"].items()},
              "next_record": st["next_ck"]}
    elif st.get("kind") != "kernel_flow":
        raise ValueError(f"kernel_flow: {path} is not a kernel_flow checkpoint (kind {st.get('kind')!r})")
    for key in ("n", "E", "loss", "loss_beta", "max_dgrad", "max_dout", "grow", "shrink", "grow_fraction", "dtype",
                "packed", "block"):
        if st["config"][key] != config[key]:
            raise ValueError(f"kernel_flow: cannot resume {path}: {key} was {st['config'][key]!r}, "
                             f"now {config[key]!r}")
    if any(abs(a - b) > 1e-9 * (1 + abs(a)) for a, b in zip(st["config"]["fingerprint"], config["fingerprint"])):
        raise ValueError(f"kernel_flow: cannot resume {path}: K_train differs from the checkpointed run")
    return st


class _KernelRun:
    """One call of kernel_flow: the per-problem state (scalars in Python lists, tensors (E, n)), the records,
    the resume file and the loop."""

    def __init__(self, pb: _Problem, cfg: FlowConfig, stop_margin: bool, max_iterations: Optional[int],
                 checkpoint_every_steps: Optional[int], config: Dict[str, Any]):
        self.pb, self.cfg, self.rule, self.config = pb, cfg, cfg.rule, config
        self.stop_margin = stop_margin and cfg.loss != "mse"
        self.max_iterations, self.checkpoint_every_steps = max_iterations, checkpoint_every_steps
        self.device, self.dtype = pb.Y.device, pb.Y.dtype
        if cfg.resume is not None:
            self._resume(cfg.resume)
        else:
            self._fresh()
        # a problem whose loss rises over a window of accepted steps stops as "diverging" (restarted on resume)
        self.monitors = [DivergenceMonitor() for _ in range(pb.E)]
        self.start = time.perf_counter()

    def _fresh(self) -> None:
        pb, E = self.pb, self.pb.E
        zeros = torch.zeros(E, pb.n, dtype=self.dtype, device=self.device)
        # Initial gradient: g = Theta r(0) / n (a dt = 0 call of the op).
        dt0 = torch.zeros(E, dtype=self.dtype, device=self.device)
        active = torch.ones(E, dtype=torch.bool, device=self.device)
        self.F, self.r, self.g, self.c, st0 = pb.op.step(pb.Y, zeros, zeros, zeros, zeros, dt0, active, self.cfg.loss,
                                                         self.cfg.loss_beta, clock=0.0)
        self.gmax = [float(v) for v in st0[:, StepStats._fields.index("gp_max")].tolist()]
        self.dt, self.tt = [1.0] * E, [0.0] * E
        self.steps, self.attempts = [0] * E, [0] * E
        self.status = ["running"] * E
        self.history: List[List[Dict[str, Any]]] = [[] for _ in range(E)]
        self.next_record = [0] * E
        self.wall0, self.iters = 0.0, 0
        for e in range(E):
            self.record(e, "scheduled")
            self.next_record[e] = next_record(0, self.cfg.record_rate, self.cfg.record_spacing)
            if self.stop_margin and float((pb.Y[e] * self.F[e]).min()) >= 1.0:
                self.status[e] = "converged"

    def _resume(self, path: Any) -> None:
        st = _read_kernel_checkpoint(path, self.config)
        cfg = self.cfg
        self.F, self.r, self.g, self.c = (st[k].to(self.device) for k in ("F", "r", "g", "c"))
        self.dt, self.tt, self.gmax = list(st["dt"]), list(st["t"]), list(st["gmax"])
        self.steps, self.attempts = list(st["steps"]), list(st["attempts"])
        self.status, self.history, self.next_record = list(st["statuses"]), st["history"], list(st["next_record"])
        # Stops by limits are re-decided with this call's limits; converged / nonfinite / stalled are final.
        self.status = ["running" if s_ in RESUMABLE else s_ for s_ in self.status]
        for e, h in enumerate(self.history):  # drop the end-of-run record of the interrupted run (off schedule)
            if h and self.status[e] == "running" and h[-1]["step"] not in loglinspace(
                    h[-1]["step"], cfg.record_rate, cfg.record_spacing):
                h.pop()
        self.wall0, self.iters = st["wall"], st["iterations"]

    def wall(self) -> float:
        return self.wall0 + time.perf_counter() - self.start

    def record(self, e: int, event: str) -> None:
        """Append the record of problem e (step, t, dt, loss, err, nd, margin_min, norms, test_err, ...)."""
        pb, F, c, beta = self.pb, self.F, self.c, self.cfg.loss_beta
        u = (pb.Y[e] * F[e]).double()
        rec = {"event": event, "step": self.steps[e], "t": self.tt[e], "dt": self.dt[e],
               "loss": float(loss_value(self.cfg.loss, F[e].double(), pb.Y[e].double(), beta).mean()), "err": float((u <= 0).double().mean()),
               "nd": int((u < 1).sum()), "margin_min": float(u.min()), "F_norm": float(F[e].double().norm()),
               "c_norm": float(c[e].double().norm())}
        if pb.Kte is not None:
            Ft = -((pb.Kte[e] if pb.Kte.dim() == 3 else pb.Kte) @ c[e])
            rec["F_test_norm"] = float(Ft.double().norm())
            if pb.Yte is not None:
                ut = (pb.Yte[e] * Ft).double()
                rec["test_err"] = float((ut <= 0).double().mean())
                rec["test_loss"] = float(loss_value(self.cfg.loss, Ft.double(), pb.Yte[e].double(), beta).mean())
        self.history[e].append(rec)

    def save(self) -> None:
        if self.pb.op.rank != 0:                           # one writer when Theta is split across ranks
            return
        atomic_save({"kind": "kernel_flow", "F": self.F, "r": self.r, "g": self.g, "c": self.c, "dt": self.dt,
                     "t": self.tt, "gmax": self.gmax, "steps": self.steps, "attempts": self.attempts,
                     "statuses": self.status, "history": self.history, "next_record": self.next_record,
                     "config": self.config, "wall": self.wall(), "iterations": self.iters}, self.cfg.checkpoint)

    def running(self) -> List[int]:
        """Decide the stops before an attempt; returns the problems that attempt a step.  Attempts that fail on
        dout alone are decided here without reading Theta (dout = dt max|g|)."""
        cfg, out = self.cfg, []
        elapsed = self.pb.op.agreed_wall(self.wall())      # the same number on every rank
        max_dout_, shrink_ = self.rule.max_dout, self.rule.shrink
        for e in range(self.pb.E):
            if self.status[e] != "running":
                continue
            if cfg.max_steps is not None and self.steps[e] >= cfg.max_steps:
                self.status[e] = "max_steps"
            elif cfg.max_time is not None and self.tt[e] >= cfg.max_time:
                self.status[e] = "max_time"
            elif cfg.max_wall is not None and elapsed >= cfg.max_wall:
                self.status[e] = "max_wall"
            elif self.max_iterations is not None and self.iters >= self.max_iterations:
                self.status[e] = "max_iterations"
            elif not math.isfinite(self.gmax[e]):
                self.status[e] = "nonfinite"
            else:
                while self.dt[e] * self.gmax[e] >= max_dout_ and self.dt[e] >= 1e-300:
                    self.attempts[e] += 1
                    self.dt[e] /= shrink_
                if self.dt[e] < 1e-300:
                    self.status[e] = "stalled"
                else:
                    out.append(e)
        return out

    def attempt(self, running: List[int]) -> List[Optional[StepStats]]:
        """One pass over Theta for the running problems; the accepted ones become the state."""
        pb, E = self.pb, self.pb.E
        if len(running) == E:
            active = torch.ones(E, dtype=torch.bool, device=self.device)
        else:
            active = torch.zeros(E, dtype=torch.bool)
            active[running] = True
            active = active.to(self.device)
        dt_t = torch.tensor(self.dt, dtype=self.dtype, device=self.device)
        Fn, rn, gn, cn, stats = pb.op.step(pb.Y, self.F, self.g, self.r, self.c, dt_t, active, self.cfg.loss,
                                           self.cfg.loss_beta, clock=self.wall())
        rows = [StepStats(*s) for s in stats.tolist()]
        acc = [False] * E
        for e in running:
            s = rows[e]
            self.attempts[e] += 1
            if not all(math.isfinite(v) for v in s):
                self.status[e] = "nonfinite"
                continue
            ok, new_dt = self.rule.decide(dgrad_from_norms(s.g_sq, s.gp_sq, s.diff_sq), s.dout, self.dt[e])
            if ok:
                acc[e] = True
                self.tt[e] += self.dt[e]
                self.steps[e] += 1
                self.gmax[e] = s.gp_max
                if self.monitors[e].update(s.mean_loss):
                    self.status[e] = "diverging"
            self.dt[e] = new_dt
        nacc = sum(acc)
        if nacc == E:
            self.F, self.r, self.g, self.c = Fn, rn, gn, cn          # swap, no copy
        elif nacc:
            a = torch.tensor(acc, device=self.device)[:, None]
            self.F, self.r, self.g, self.c = (torch.where(a, x1, x0) for x1, x0 in
                                              ((Fn, self.F), (rn, self.r), (gn, self.g), (cn, self.c)))
        return [rows[e] if acc[e] else None for e in range(E)]

    def after(self, accepted: List[Optional[StepStats]], running: List[int]) -> None:
        """Records on the schedule and the margin stop of the problems that accepted a step."""
        for e in running:
            s = accepted[e]
            if s is None:
                continue
            margin_reached = self.stop_margin and s.margin_min >= 1.0
            if self.steps[e] >= self.next_record[e] or margin_reached:
                self.record(e, "converged" if margin_reached else "scheduled")
                while self.next_record[e] <= self.steps[e]:
                    self.next_record[e] = next_record(self.next_record[e], self.cfg.record_rate,
                                                      self.cfg.record_spacing)
            if margin_reached:
                self.status[e] = "converged"

    def loop(self) -> None:
        cfg = self.cfg
        total = cfg.max_steps if math.isfinite(cfg.max_steps) and cfg.max_steps != DEFAULT_MAX_STEPS else None
        bar = progress_bar(cfg.progress if self.pb.op.rank == 0 else False, desc="kernel_flow", unit="step", total=total, leave=False)
        last_save = self.start
        try:
            while True:
                running = self.running()
                if not running:
                    break
                accepted = self.attempt(running)
                self.after(accepted, running)
                self.iters += 1
                if bar is not None:
                    e0 = running[0]
                    bar.update(1 if accepted[e0] is not None else 0)
                    if self.iters % 20 == 0 and accepted[e0] is not None:
                        bar.set_postfix(t=f"{self.tt[e0]:.3g}", dt=f"{self.dt[e0]:.2g}",
                                        margin=f"{accepted[e0].margin_min:.3f}", running=len(running))
                if cfg.checkpoint is not None:
                    now = time.perf_counter()
                    every = self.checkpoint_every_steps
                    if (every is not None and self.iters % every == 0) or \
                            (every is None and now - last_save >= cfg.checkpoint_every):
                        self.save()
                        last_save = now
        finally:
            if bar is not None:
                bar.close()

    def result(self) -> KernelFlowResult:
        pb = self.pb
        for e in range(pb.E):  # final record (unless the last record is already the final state)
            if not self.history[e] or self.history[e][-1]["step"] != self.steps[e]:
                self.record(e, "final")
        if self.cfg.checkpoint is not None:
            self.save()
        F_test = None
        if pb.Kte is not None:
            F_test = -(torch.einsum("emn,en->em", pb.Kte, self.c) if pb.Kte.dim() == 3 else self.c @ pb.Kte.t())
        final = [{**h[-1], "status": s} for h, s in zip(self.history, self.status)]
        return KernelFlowResult(status=overall_status(self.status), statuses=list(self.status), F_train=self.F,
                                F_test=F_test, t=torch.tensor(self.tt, dtype=torch.float64),
                                steps=torch.tensor(self.steps), attempts=torch.tensor(self.attempts),
                                history=self.history, final=final, config=self.config, wall=self.wall(), c=self.c)


def kernel_flow(K_train: Union[torch.Tensor, PathLike, np.ndarray], y: torch.Tensor, *, K_test_train: Optional[torch.Tensor] = None,
                y_test: Optional[torch.Tensor] = None, loss: str = "softhinge", loss_beta: float = 20.0,
                max_dgrad: float = 1e-4, max_dout: float = 0.1, grow: float = 1.1, shrink: float = 10.0,
                grow_fraction: float = 0.5, record_rate: float = 0.01, record_spacing: int = 100,
                max_time: Optional[float] = None, max_steps: Optional[int] = None, max_wall: Optional[float] = None,
                checkpoint: Optional[PathLike] = None, checkpoint_every: float = 600.0,
                resume: Optional[PathLike] = None, progress: Optional[bool] = None, stop_margin: bool = True,
                max_iterations: Optional[int] = None, packed: bool = False, block: Optional[int] = None,
                checkpoint_every_steps: Optional[int] = None, validate: bool = True,
                **renamed: Any) -> KernelFlowResult:
    """Integrate dF/dt = -(1/n) Theta (l'(y o F) o y) from F = 0 with the trainer's adaptive step.

    Args:
        K_train: Theta on the training points, (n, n) or (E, n, n); symmetric (only its upper triangle is read).
            Or Theta (n, n) on disk: a ``.npy`` path (as written by ``empirical_ntk(..., out=PATH)``) or a numpy
            array / memmap, read by blocks of ``block`` rows (default about 32 MiB) at every attempt: memory
            O(block n + E n), never O(n^2).  Under an initialised torch.distributed process group the call is
            collective: each rank reads only its rows [r n / W, (r + 1) n / W), one all-reduce per attempt
            combines the product, every rank gets the same numbers and returns the same result (rank 0 alone
            writes the checkpoint and shows the bar; max_wall uses rank 0's clock).  docs/distributed.md.
        y: labels +-1, (n,) or (E, n).  With K (n, n) and y (E, n): E label vectors share one Theta; with
            K (E, n, n) and y (n,): one label vector for E kernels.
        K_test_train: Theta_test,train, (m, n) or (E, m, n); y_test: (m,) or (E, m).  Test outputs
            F_test = -Theta_test,train c are evaluated only at records (cost 2 m n each).
        Shared with train (:class:`ntk_fast.dynamics.config.FlowConfig`): loss ("softhinge" with beta_l =
            loss_beta, "qhinge", or "mse": square loss, no margin stop, give max_time / max_steps), the step
            rule (max_dgrad, max_dout, grow, shrink, grow_fraction), the record schedule (record_rate,
            record_spacing: history at the accepted steps of ntk_fast.dynamics.observables.next_record, at the
            margin and at the end), the limits max_time / max_steps / max_wall (flow time, accepted steps,
            seconds; None = no limit), checkpoint (the resume file, written atomically every
            ``checkpoint_every`` seconds, or every ``checkpoint_every_steps`` passes over Theta, and at the end),
            resume (bit-for-bit: the same inputs and thread count give the same trajectory as an uninterrupted
            run), progress (tqdm; None: only when stderr is a terminal).
        stop_margin: stop a problem once y_i F_i >= 1 for all i.  max_iterations: passes over Theta (all
            problems stop together, so a run resumed from there continues bit for bit).
        packed: store Theta as the tile-packed upper triangle (half the memory of the solver's copy; the
            caller may then free K_train); block: tile edge (default 256 on CPUs; the CUDA kernel uses 64), or
            rows per read of an on-disk K_train.
        validate: check K (finite, symmetric, non-negative diagonal, no eigenvalue below -eps ||K|| by a few
            Lanczos iterations: ntk_fast.guards.check_gram) and the labels (+-1 for the margin losses).
        Default step budget: max_steps=None means ntk_fast.guards.DEFAULT_MAX_STEPS = 1_000_000 accepted steps
        per problem (status "max_steps"; math.inf lifts it, given max_time or max_wall).  A problem whose loss
        rises over 50 consecutive accepted steps stops as "diverging" (ntk_fast.guards.DivergenceMonitor: with a PSD kernel the flow never
        raises the loss).
        Old names beta / checkpoint_step / checkpoint_rate (now loss_beta / record_spacing / record_rate) warn and
        still work.
    Returns a :class:`KernelFlowResult` (tensors (E, n) also for one problem).
    Cost per attempt: one read of the upper half of Theta (per distinct kernel) and 2 E n^2 flops; memory: the
    kernel(s) plus O(E n).
    """
    if loss not in LOSSES:
        raise ValueError(f"kernel_flow: loss must be one of {LOSSES}, got {loss!r}")
    shared = dict(loss=loss, loss_beta=loss_beta, max_dgrad=max_dgrad, max_dout=max_dout, grow=grow, shrink=shrink,
                  grow_fraction=grow_fraction, record_rate=record_rate, record_spacing=record_spacing,
                  max_time=max_time, max_steps=DEFAULT_MAX_STEPS if max_steps is None else max_steps,
                  max_wall=max_wall, checkpoint=checkpoint,
                  checkpoint_every=float(checkpoint_every), resume=resume, progress=progress)
    cfg = flow_config("kernel_flow", shared, renamed, ("beta", "checkpoint_step", "checkpoint_rate"))
    pb = _prepare(K_train, y, K_test_train, y_test, packed, block, validate, loss)
    config = {"n": pb.n, "E": pb.E, "loss": loss, "loss_beta": cfg.loss_beta, "max_dgrad": max_dgrad,
              "max_dout": max_dout, "grow": grow, "shrink": shrink, "grow_fraction": grow_fraction,
              "stop_margin": stop_margin, "max_steps": cfg.max_steps, "max_time": cfg.max_time, "max_wall": cfg.max_wall,
              "record_rate": cfg.record_rate, "record_spacing": cfg.record_spacing, "packed": packed,
              "block": pb.block, "dtype": str(pb.Y.dtype), "shared_kernel": pb.EK == 1 and pb.E > 1,
              "fingerprint": fingerprint(K_train) if isinstance(K_train, torch.Tensor) else pb.op.fingerprint()}
    run = _KernelRun(pb, cfg, stop_margin, max_iterations, checkpoint_every_steps, config)
    run.loop()
    return run.result()


# -------------------------------------------------------------------------------------------- closed forms
@dataclass
class KernelRegression:
    """coef (n,) / (E, n) with (K + (ridge + jitter) I) coef = y; F_train = K coef; F_test = K_test coef.

    status: "solved" or "unsolved" (ntk_fast.guards.solve: relative residual above the dtype's threshold);
    residual, condition: see ntk_fast.guards.solve.SolveReport."""
    coef: torch.Tensor
    F_train: torch.Tensor
    F_test: Optional[torch.Tensor]
    jitter: float
    residual: float = 0.0
    condition: float = 1.0
    status: str = "solved"


def _regression_in_core(K: Any, y: Any, K_test: Any) -> torch.Tensor:
    """An on-disk K (``.npy`` path or numpy memmap) read into memory for kernel_regression, when the copy and
    the factorisation fit (ntk_fast.guards.memory); MemoryBudgetError otherwise."""
    from ntk_fast.distributed.flow import open_theta
    arr = open_theta(K, "K")
    n = arr.shape[0]
    E = y.numel() // max(n, 1) if isinstance(y, torch.Tensor) else 1
    m = K_test.shape[0] if isinstance(K_test, torch.Tensor) and K_test.dim() == 2 else 0
    require_memory(float(arr.itemsize) * n * n + kernel_regression_bytes(n, E, m, arr.itemsize),
                   f"kernel_regression: the in-core copy of the on-disk K (n = {n}) and its Cholesky factorisation",
                   "cpu", "An out-of-core or distributed Cholesky is not implemented: use kernel_flow on the file "
                   "(it reads K by row blocks, any n, and splits it across torch.distributed ranks) or fewer points.")
    return torch.from_numpy(np.array(arr))


def kernel_regression(K: Union[torch.Tensor, PathLike, np.ndarray], y: torch.Tensor, ridge: float = 0.0,
                      K_test: Optional[torch.Tensor] = None, max_jitter: float = 1e-6,
                      on_unsolved: str = "raise") -> KernelRegression:
    """Kernel (ridge) regression: solve (K + ridge I) coef = y by Cholesky, predict K_test coef.

    K: (n, n) symmetric positive (semi-)definite; y: (n,) or (E, n) (several right-hand sides); K_test: (m, n).
    K may live on disk (a ``.npy`` path or numpy memmap, e.g. from ``empirical_ntk(..., out=PATH)``): it is read
    into memory when the copy and the factorisation fit (about 4 n^2 numbers in all, checked against the
    available memory: ntk_fast.guards.memory), else MemoryBudgetError (no out-of-core Cholesky; kernel_flow
    reads an on-disk K by row blocks at any n).
    When the Cholesky factorisation fails, a jitter eps = 1e-12 (float32: 1e-7) * mean(diag K) is added and
    multiplied by 10 until it succeeds or exceeds max_jitter * mean(diag K): then ValueError (K is not
    positive definite).  Cost: n^3 / 3 + 2 n^2 E (+ 2 m n E) flops.

    K is checked as a Gram matrix (ntk_fast.guards.check_gram: non-negative diagonal, no eigenvalue below
    -eps ||K||).  The result reports the jitter, a condition estimate and the relative training residual
    ||(K + ridge I) coef - y|| / ||y||; above 1e-3 (float32: 1e-2) the system was not solved (e.g. a singular
    K with y outside its range): ValueError, or status="unsolved" in the result when on_unsolved="status".
    """
    if on_unsolved not in ("raise", "status"):
        raise ValueError(f"kernel_regression: on_unsolved must be 'raise' or 'status', got {on_unsolved!r}")
    if not isinstance(K, torch.Tensor) and _on_disk(K):
        K = _regression_in_core(K, y, K_test)
    check_kernel(K, "K", batch_ok=False)
    check_gram(K, "K", symmetric_checked=True)
    n = K.shape[0]
    check_labels(y, "y", n, pm1=False)
    if ridge < 0 or not math.isfinite(ridge):
        raise ValueError(f"kernel_regression: ridge must be a finite number >= 0, got {ridge}")
    if K_test is not None:
        if not isinstance(K_test, torch.Tensor) or K_test.dim() != 2 or K_test.shape[1] != n:
            raise ValueError(f"kernel_regression: K_test must be (m, {n}), got "
                             f"{tuple(K_test.shape) if isinstance(K_test, torch.Tensor) else K_test}")
        if not all_finite(K_test):
            raise ValueError("kernel_regression: K_test has NaN or infinite entries")
    require_memory(kernel_regression_bytes(n, y.numel() // max(n, 1), 0 if K_test is None else K_test.shape[0],
                                           K.element_size()), f"kernel_regression: the Cholesky factorisation (n = {n})",
                   K.device, "Use kernel_flow (no factorisation; packed=True halves its copy of K) or fewer points.")
    scale = float(K.diagonal().abs().mean()) or 1.0
    eye = torch.eye(n, dtype=K.dtype, device=K.device)
    jitter = 0.0
    eps = (1e-7 if K.dtype == torch.float32 else 1e-12) * scale
    while True:
        A = K + (ridge + jitter) * eye
        Lc, info = torch.linalg.cholesky_ex(A)
        if int(info) == 0:
            break
        jitter = eps if jitter == 0.0 else jitter * 10.0
        if jitter > max_jitter * scale:
            raise ValueError(f"kernel_regression: K + {ridge:g} I is not positive definite (Cholesky fails even "
                             f"with a jitter of {jitter / 10:.3g} = {jitter / 10 / scale:.1g} mean(diag K)); use "
                             "ridge > 0 or check the kernel")
    if jitter > 0:
        warnings.warn(f"kernel_regression: added a jitter of {jitter:.3g} to the diagonal to factorise K",
                      RuntimeWarning, stacklevel=2)
    Yc = y.to(K.dtype).reshape(-1, n).t()
    coef = torch.cholesky_solve(Yc, Lc).t()
    F_train = coef @ K  # K symmetric
    F_test = coef @ K_test.t() if K_test is not None else None
    rep = solve_report(K, Yc.t(), coef, F_train, ridge, jitter, Lc)
    if rep.status != "solved" and on_unsolved == "raise":
        raise ValueError(rep.message())
    if y.dim() == 1:
        coef, F_train = coef[0], F_train[0]
        F_test = F_test[0] if F_test is not None else None
    return KernelRegression(coef=coef, F_train=F_train, F_test=F_test, jitter=jitter, residual=rep.residual,
                            condition=rep.condition, status=rep.status)


class MSEFlow:
    """The square-loss gradient flow dF/dt = -(1/n) Theta (F - y), F(0) = 0, solved exactly.

    With Theta = V diag(lam) V^T (one eigendecomposition, n^3 flops):
        c(t)       = V diag(phi_t(lam)) V^T y,     phi_t(lam) = (1 - exp(-lam t / n)) / lam   (-> t / n at lam = 0)
        F(t)       = Theta c(t) = V diag(1 - exp(-lam t / n)) V^T y
        F_test(t)  = Theta_test,train c(t)
    (Here c is the negative of kernel_flow's c: kernel_flow accumulates int (1/n) l' dt and F = -Theta c.)
    Each time costs 4 n^2 E (+ 2 m n E) flops.
    """

    def __init__(self, K: torch.Tensor, y: torch.Tensor, K_test: Optional[torch.Tensor] = None):
        check_kernel(K, "K", batch_ok=False)
        check_gram(K, "K", symmetric_checked=True)   # negative eigenvalues are clamped below: refuse real ones
        n = K.shape[0]
        check_labels(y, "y", n, pm1=False)
        if K_test is not None and (K_test.dim() != 2 or K_test.shape[1] != n):
            raise ValueError(f"mse_flow: K_test must be (m, {n}), got {tuple(K_test.shape)}")
        self.n, self.K_test, self.single = n, K_test, y.dim() == 1
        lam, V = torch.linalg.eigh(K)
        self.lam = lam.clamp_min(0.0)   # a PSD kernel; round-off negatives count as 0
        self.V = V
        self.Vty = V.t() @ y.to(K.dtype).reshape(-1, n).t()  # (n, E)

    def coef(self, t: float) -> torch.Tensor:
        x = self.lam * (t / self.n)
        phi = torch.where(x > 1e-12, -torch.expm1(-x) / self.lam.clamp_min(1e-300),
                          torch.full_like(x, t / self.n) * (1 - x / 2))
        c = (self.V @ (phi[:, None] * self.Vty)).t()
        return c[0] if self.single else c

    def __call__(self, t: float):
        """(F_train(t), F_test(t) or None)."""
        x = self.lam * (t / self.n)
        F = (self.V @ (-torch.expm1(-x)[:, None] * self.Vty)).t()
        Ft = self.coef(t) @ self.K_test.t() if self.K_test is not None else None
        return (F[0] if self.single else F), Ft


def mse_flow(K: torch.Tensor, y: torch.Tensor, K_test: Optional[torch.Tensor] = None) -> MSEFlow:
    """Exact solution of the square-loss kernel gradient flow (see MSEFlow); call the result at any t."""
    return MSEFlow(K, y, K_test)


# ------------------------------------------------------------------------------------------ network bridge
def frozen_kernel_run(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, x_test: Optional[torch.Tensor] = None,
                      y_test: Optional[torch.Tensor] = None, **kwargs) -> KernelFlowResult:
    """The paper's frozen-kernel run: Theta at the net's current weights, then kernel_flow.

    Theta_train = NTK Gram of f on x (n, n) and Theta_test,train on (x_test, x) (m, n), both by
    ntk_fast.empirical_ntk (structured Gram op for FC nets).  Pass the net at initialisation for the
    init-kernel run, a trained net for the final-kernel run.  kwargs go to kernel_flow.
    Cost: the Gram (2 n^2 sum_l (fan_in + fan_out) / 2 flops, + 2 m n sum_l (...)) plus the flow.
    """
    from ntk_fast.ntk.empirical import empirical_ntk
    with torch.no_grad():
        K = empirical_ntk(net, x)
        Kte = empirical_ntk(net, x_test, x) if x_test is not None else None
    res = kernel_flow(K, y, K_test_train=Kte, y_test=y_test, **kwargs)
    res.config["kernel"] = {"train_diag_mean": float(K.diagonal().mean()), "train_norm": float(K.norm())}
    return res
