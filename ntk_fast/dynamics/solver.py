"""Frozen-kernel solver: kernel gradient flow with the trainer's loss and step rule, and closed forms.

Dynamics (article notation, docs/design.md section 5).  For the model linearised at weights w*, with Theta the NTK
Gram of f at w* on the n training points, the outputs obey (no alpha appears)::

    dF/dt = -(1/n) Theta (l'(y o F) o y),          F(0) = 0,
    stop when y_i F_i >= 1 for all i (margin losses).

Writing r(F) = l'(y o F) o y and c(t) = int_0^t (1/n) r(F(s)) ds, F(t) = -Theta c(t), so the outputs on any
other points are F_test(t) = -Theta_test,train c(t): the solver accumulates c and never touches the test
kernel between checkpoints (the reference code instead solved lstsq(Theta, F_train) at the end).

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

import dataclasses

import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from ntk_fast.ops.gram import all_finite
from ntk_fast.ops.kernel_flow import kernel_flow_step
from ntk_fast.dynamics.losses import LOSSES, is_margin, loss_value
from ntk_fast.dynamics.observables import loglinspace, next_checkpoint
from ntk_fast.ops.packed import PACKED_TILE, pack_symmetric
from ntk_fast.dynamics.results import RESUMABLE, atomic_save, atomic_write_json, load_checkpoint, overall_status, stem_of
from ntk_fast.dynamics.steprule import StepRule, dgrad_from_norms

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


# -------------------------------------------------------------------------------------------------- result
@dataclass
class KernelFlowResult:
    """Outcome of kernel_flow for E problems (tensors have a leading E axis; ``single`` squeezes it).

    F_train (E, n), F_test (E, m) or None, c (E, n) with F_train = -Theta c, t / steps / attempts (E,).
    status: the overall status (ntk_fast.dynamics.results.overall_status: "converged" when every problem reached the
    margin); statuses: one per problem, in the vocabulary of ntk_fast.dynamics.results ("converged", "max_time",
    "max_steps", "max_wall", "max_iterations", "nonfinite", "stalled" = dt underflow).
    history: per problem, a list of checkpoint dicts (step, t, dt, loss, err, nd, margin_min, test_err, ...),
    config: the arguments (JSON-safe), wall: seconds spent.
    """
    F_train: torch.Tensor
    F_test: Optional[torch.Tensor]
    c: torch.Tensor
    t: torch.Tensor
    steps: torch.Tensor
    attempts: torch.Tensor
    status: str
    statuses: List[str]
    history: List[List[Dict[str, float]]]
    config: Dict[str, Any] = field(default_factory=dict)
    wall: float = 0.0
    single: bool = False

    def outputs(self, which: str = "train") -> Optional[torch.Tensor]:
        """F_train / F_test, squeezed to (n,) / (m,) when the input was a single problem."""
        F = self.F_train if which == "train" else self.F_test
        if F is None:
            return None
        return F[0] if self.single else F

    def summary(self) -> Dict[str, Any]:
        """JSON-safe summary: status, statuses, final t/steps and the last checkpoint of every problem."""
        return {"status": self.status, "statuses": self.statuses, "t": self.t.tolist(), "steps": self.steps.tolist(),
                "attempts": self.attempts.tolist(), "wall": self.wall, "config": self.config,
                "final": [h[-1] if h else {} for h in self.history]}

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write ``<path>.pt`` (all tensors) and ``<path>.json`` (summary and history), atomically (a trailing
        .pt of ``path`` is dropped first: the same layout as FlowResult.save)."""
        stem = stem_of(path)
        atomic_save({k: getattr(self, k) for k in self.__dataclass_fields__}, stem + ".pt")
        atomic_write_json({**self.summary(), "history": self.history}, stem + ".json")

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "KernelFlowResult":
        """Read what :meth:`save` wrote."""
        fields = cls.__dataclass_fields__
        required = [k for k, f in fields.items()
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        blob = load_checkpoint(stem_of(path) + ".pt", "KernelFlowResult.load", required)
        return cls(**{k: v for k, v in blob.items() if k in fields})


# ------------------------------------------------------------------------------------------------- solver
def _fingerprint(K: torch.Tensor) -> List[float]:
    """Cheap identity check of a kernel for resume: shape-independent sums of a few rows."""
    Kb = K if K.dim() == 3 else K.unsqueeze(0)
    n = Kb.shape[-1]
    rows = sorted({0, n // 2, n - 1})
    return [float(Kb[:, i].double().sum()) for i in rows]


def kernel_flow(K_train: torch.Tensor, y: torch.Tensor, *, K_test_train: Optional[torch.Tensor] = None,
                y_test: Optional[torch.Tensor] = None, loss: str = "softhinge", beta: float = 20.0,
                max_dgrad: float = 1e-4, max_dout: float = 0.1, grow: float = 1.1, shrink: float = 10.0,
                grow_fraction: float = 0.5, stop_margin: bool = True, max_steps: Optional[int] = None,
                max_time: Optional[float] = None, max_wall: Optional[float] = None,
                max_iterations: Optional[int] = None,
                checkpoint_rate: float = 0.01, checkpoint_step: int = 100, packed: bool = False, block: Optional[int] = None,
                checkpoint: Optional[Union[str, os.PathLike]] = None, checkpoint_every: float = 60.0,
                checkpoint_every_steps: Optional[int] = None, resume: Optional[Union[str, os.PathLike]] = None,
                progress: bool = True, validate: bool = True) -> KernelFlowResult:
    """Integrate dF/dt = -(1/n) Theta (l'(y o F) o y) from F = 0 with the trainer's adaptive step.

    Args:
        K_train: Theta on the training points, (n, n) or (E, n, n); symmetric (only its upper triangle is read).
        y: labels +-1, (n,) or (E, n).  With K (n, n) and y (E, n): E label vectors share one Theta; with
            K (E, n, n) and y (n,): one label vector for E kernels.
        K_test_train: Theta_test,train, (m, n) or (E, m, n); y_test: (m,) or (E, m).  Test outputs
            F_test = -Theta_test,train c are evaluated only at checkpoints (cost 2 m n each).
        loss: "softhinge" (beta = 20), "qhinge", or "mse" (square loss, no margin stop: give max_time/max_steps).
        max_dgrad, max_dout, grow, shrink, grow_fraction: the step rule (ntk_fast.dynamics.steprule.StepRule).
        stop_margin: stop a problem once y_i F_i >= 1 for all i.  max_steps / max_time / max_wall: other stops
            (accepted steps, flow time, seconds); max_iterations: passes over Theta (all problems stop together,
            so a run resumed from there continues bit for bit).
        checkpoint_rate, checkpoint_step: history at the accepted steps of the trainer's log-linear schedule
            (ntk_fast.dynamics.observables.next_checkpoint(s, rate, step)), at the margin and at the end.
        packed: store Theta as the tile-packed upper triangle (half the memory of the solver's copy; the
            caller may then free K_train; the layout's tile is ops.packed.PACKED_TILE on every device);
            block: compute tile edge of full storage (default 256 on CPUs; the CUDA kernel uses 64).
        checkpoint: file for atomic solver checkpoints, written every ``checkpoint_every`` seconds (or every
            ``checkpoint_every_steps`` loop iterations) and at the end; resume: such a file to continue from
            (bit-for-bit: the same inputs and thread count give the same trajectory as an uninterrupted run).
        progress: tqdm bar.  validate: check K (finite, symmetric) and labels (+-1).

    Cost per attempt: one read of the upper half of Theta (per distinct kernel) and 2 E n^2 flops; memory: the
    kernel(s) plus O(E n).
    """
    if loss not in LOSSES:
        raise ValueError(f"kernel_flow: loss must be one of {LOSSES}, got {loss!r}")
    rule = StepRule(max_dgrad=max_dgrad, max_dout=max_dout, grow=grow, shrink=shrink, grow_fraction=grow_fraction)
    if not isinstance(K_train, torch.Tensor) or K_train.dim() not in (2, 3):
        raise ValueError("kernel_flow: K_train must be a tensor (n, n) or (E, n, n), got "
                         f"{tuple(K_train.shape) if isinstance(K_train, torch.Tensor) else type(K_train).__name__}")
    n = K_train.shape[-1]
    if validate:
        check_kernel(K_train, "K_train")
        check_labels(y, "y", n, pm1=is_margin(loss))
    elif y.shape[-1] != n:
        raise ValueError(f"kernel_flow: y has {y.shape[-1]} entries but K_train is {n} x {n}")
    dtype, device = K_train.dtype, K_train.device
    EK = K_train.shape[0] if K_train.dim() == 3 else 1
    Ey = y.shape[0] if y.dim() == 2 else 1
    if EK > 1 and Ey > 1 and EK != Ey:
        raise ValueError(f"kernel_flow: K_train holds {EK} kernels but y holds {Ey} label vectors")
    E = max(EK, Ey)
    single = K_train.dim() == 2 and y.dim() == 1
    Y = y.to(dtype=dtype, device=device).reshape(-1, n).expand(E, n).contiguous()
    Kte = None
    Yte = None
    if K_test_train is not None:
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
        if y_test is not None:
            if validate:
                check_labels(y_test, "y_test", m, pm1=is_margin(loss))
            elif y_test.shape[-1] != m:
                raise ValueError(f"kernel_flow: y_test has {y_test.shape[-1]} entries, K_test_train has {m} rows")
            Yte = y_test.to(dtype=dtype, device=device).reshape(-1, m).expand(E, m)
            if y_test.dim() == 2 and y_test.shape[0] not in (1, E):
                raise ValueError(f"kernel_flow: y_test holds {y_test.shape[0]} label vectors, expected {E}")
    elif y_test is not None:
        raise ValueError("kernel_flow: y_test needs K_test_train")

    theta = K_train.contiguous()
    if device.type == "cuda":
        if block not in (None, 64):
            raise ValueError(f"kernel_flow: the CUDA kernel uses 64 x 64 tiles, got block={block}")
        block = 64
    elif block is None:
        block = 256
    packed_block = 0
    if packed:   # one device-independent layout (ntk_fast/ops/packed.py); block is the compute tile of full storage
        theta = pack_symmetric(theta, PACKED_TILE)
        packed_block = PACKED_TILE
    step_block = 0 if (packed or device.type == "cuda") else block

    config = {"n": n, "E": E, "loss": loss, "beta": beta, "max_dgrad": max_dgrad, "max_dout": max_dout,
              "grow": grow, "shrink": shrink, "grow_fraction": grow_fraction, "stop_margin": stop_margin,
              "max_steps": max_steps, "max_time": max_time, "max_wall": max_wall,
              "checkpoint_rate": checkpoint_rate, "checkpoint_step": checkpoint_step, "packed": packed,
              "block": block, "dtype": str(dtype), "shared_kernel": EK == 1 and E > 1,
              "fingerprint": _fingerprint(K_train)}

    zeros = torch.zeros(E, n, dtype=dtype, device=device)
    # Scalars per problem live in Python lists (cheap per-attempt bookkeeping); tensors only in results.
    if resume is not None:
        st = load_checkpoint(resume, "kernel_flow(resume=...)", ("F", "r", "g", "c", "dt", "t", "config", "history"))
        for key in ("n", "E", "loss", "beta", "max_dgrad", "max_dout", "grow", "shrink", "grow_fraction", "dtype",
                    "packed", "block"):
            if st["config"][key] != config[key]:
                raise ValueError(f"kernel_flow: cannot resume {resume}: {key} was {st['config'][key]!r}, "
                                 f"now {config[key]!r}")
        if any(abs(a - b) > 1e-9 * (1 + abs(a)) for a, b in zip(st["config"]["fingerprint"], config["fingerprint"])):
            raise ValueError(f"kernel_flow: cannot resume {resume}: K_train differs from the checkpointed run")
        F, r, g, c = (st[k].to(device) for k in ("F", "r", "g", "c"))
        dt, tt, gmax = list(st["dt"]), list(st["t"]), list(st["gmax"])
        steps, attempts = list(st["steps"]), list(st["attempts"])
        status, history, next_ck = list(st["statuses"]), st["history"], list(st["next_ck"])
        # Stops by limits are re-decided with this call's limits; converged / nonfinite / stalled are final.
        status = ["running" if s_ in RESUMABLE else s_ for s_ in status]
        for e in range(E):  # drop the end-of-run record of the interrupted run (not a schedule checkpoint)
            if history[e] and status[e] == "running" and history[e][-1]["step"] not in loglinspace(
                    history[e][-1]["step"], checkpoint_rate, checkpoint_step):
                history[e].pop()
        wall0, iters0 = st["wall"], st["iterations"]
    else:
        # Initial gradient: g = Theta r(0) / n (a dt = 0 call of the op).
        dt0 = torch.zeros(E, dtype=dtype, device=device)
        F, r, g, c, st0 = kernel_flow_step(theta, Y, zeros, zeros, zeros, zeros, dt0,
                                           torch.ones(E, dtype=torch.bool, device=device), loss, beta,
                                           packed_block, step_block)
        gmax = [float(v) for v in st0[:, 6].tolist()]
        dt, tt = [1.0] * E, [0.0] * E
        steps, attempts = [0] * E, [0] * E
        status = ["running"] * E
        history = [[] for _ in range(E)]
        next_ck = [0] * E
        wall0, iters0 = 0.0, 0

    def record(e: int) -> None:
        u = (Y[e] * F[e]).double()
        rec = {"step": steps[e], "t": tt[e], "dt": dt[e],
               "loss": float(loss_value(loss, F[e].double(), Y[e].double(), beta).mean()), "err": float((u <= 0).double().mean()),
               "nd": int((u < 1).sum()), "margin_min": float(u.min()), "F_norm": float(F[e].double().norm()),
               "c_norm": float(c[e].double().norm())}
        if Kte is not None:
            Ft = -((Kte[e] if Kte.dim() == 3 else Kte) @ c[e])
            rec["F_test_norm"] = float(Ft.double().norm())
            if Yte is not None:
                ut = (Yte[e] * Ft).double()
                rec["test_err"] = float((ut <= 0).double().mean())
                rec["test_loss"] = float(loss_value(loss, Ft.double(), Yte[e].double(), beta).mean())
        history[e].append(rec)

    if resume is None:
        for e in range(E):
            record(e)
            next_ck[e] = next_checkpoint(0, checkpoint_rate, checkpoint_step)
            if stop_margin and loss != "mse" and float((Y[e] * F[e]).min()) >= 1.0:
                status[e] = "converged"

    def save_state(path) -> None:
        atomic_save({"F": F, "r": r, "g": g, "c": c, "dt": dt, "t": tt, "gmax": gmax, "steps": steps,
                     "attempts": attempts, "statuses": status, "history": history, "next_ck": next_ck,
                     "config": config, "wall": wall0 + (time.perf_counter() - start), "iterations": iters}, path)

    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm
            bar = tqdm(desc="kernel_flow", unit="step", total=max_steps, leave=False)
        except ImportError:  # pragma: no cover
            bar = None
    start = time.perf_counter()
    last_save = start
    iters = iters0
    max_dout_, shrink_ = rule.max_dout, rule.shrink
    active_all = torch.ones(E, dtype=torch.bool, device=device)
    while True:
        elapsed = wall0 + time.perf_counter() - start
        running = []
        for e in range(E):
            if status[e] != "running":
                continue
            if max_steps is not None and steps[e] >= max_steps:
                status[e] = "max_steps"
            elif max_time is not None and tt[e] >= max_time:
                status[e] = "max_time"
            elif max_wall is not None and elapsed >= max_wall:
                status[e] = "max_wall"
            elif max_iterations is not None and iters >= max_iterations:
                status[e] = "max_iterations"
            elif not math.isfinite(gmax[e]):
                status[e] = "nonfinite"
            else:
                # Attempts that fail on dout alone are decided without reading Theta (dout = dt max|g|).
                while dt[e] * gmax[e] >= max_dout_ and dt[e] >= 1e-300:
                    attempts[e] += 1
                    dt[e] /= shrink_
                if dt[e] < 1e-300:
                    status[e] = "stalled"
                else:
                    running.append(e)
        if not running:
            break
        if len(running) == E:
            active = active_all
        else:
            active = torch.zeros(E, dtype=torch.bool)
            active[running] = True
            active = active.to(device)
        dt_t = torch.tensor(dt, dtype=dtype, device=device)
        Fn, rn, gn, cn, stats = kernel_flow_step(theta, Y, F, g, r, c, dt_t, active, loss, beta,
                                                 packed_block, step_block, check=False)
        stats = stats.tolist()
        acc = [False] * E
        for e in running:
            s = stats[e]
            attempts[e] += 1
            if not all(math.isfinite(v) for v in s):
                status[e] = "nonfinite"
                continue
            ok, new_dt = rule.decide(dgrad_from_norms(s[0], s[1], s[2]), s[3], dt[e])
            if ok:
                acc[e] = True
                tt[e] += dt[e]
                steps[e] += 1
                gmax[e] = s[6]
            dt[e] = new_dt
        nacc = sum(acc)
        if nacc == E:
            F, r, g, c = Fn, rn, gn, cn          # swap, no copy
        elif nacc:
            a = torch.tensor(acc, device=device)[:, None]
            F, r, g, c = (torch.where(a, x1, x0) for x1, x0 in ((Fn, F), (rn, r), (gn, g), (cn, c)))
        for e in running:
            if not acc[e]:
                continue
            margin_reached = stop_margin and loss != "mse" and stats[e][4] >= 1.0
            if steps[e] >= next_ck[e] or margin_reached:
                record(e)
                while next_ck[e] <= steps[e]:
                    next_ck[e] = next_checkpoint(next_ck[e], checkpoint_rate, checkpoint_step)
            if margin_reached:
                status[e] = "converged"
        iters += 1
        if bar is not None:
            e0 = running[0]
            bar.update(1 if acc[e0] else 0)
            if iters % 20 == 0:
                bar.set_postfix(t=f"{tt[e0]:.3g}", dt=f"{dt[e0]:.2g}", margin=f"{stats[e0][4]:.3f}",
                                running=len(running))
        if checkpoint is not None:
            now = time.perf_counter()
            due = (checkpoint_every_steps is not None and iters % checkpoint_every_steps == 0) or \
                  (checkpoint_every_steps is None and now - last_save >= checkpoint_every)
            if due:
                save_state(checkpoint)
                last_save = now
    if bar is not None:
        bar.close()
    for e in range(E):  # final record (unless the last checkpoint is already the final state)
        if not history[e] or history[e][-1]["step"] != steps[e]:
            record(e)
    if checkpoint is not None:
        save_state(checkpoint)
    F_test = None
    if Kte is not None:
        F_test = -(torch.einsum("emn,en->em", Kte, c) if Kte.dim() == 3 else c @ Kte.t())
    return KernelFlowResult(F_train=F, F_test=F_test, c=c, t=torch.tensor(tt, dtype=torch.float64),
                            steps=torch.tensor(steps), attempts=torch.tensor(attempts), status=overall_status(status),
                            statuses=list(status), history=history, config=config,
                            wall=wall0 + time.perf_counter() - start, single=single)


# -------------------------------------------------------------------------------------------- closed forms
@dataclass
class KernelRegression:
    """coef (n,) / (E, n) with (K + (ridge + jitter) I) coef = y; F_train = K coef; F_test = K_test coef."""
    coef: torch.Tensor
    F_train: torch.Tensor
    F_test: Optional[torch.Tensor]
    jitter: float


def kernel_regression(K: torch.Tensor, y: torch.Tensor, ridge: float = 0.0, K_test: Optional[torch.Tensor] = None,
                      max_jitter: float = 1e-6) -> KernelRegression:
    """Kernel (ridge) regression: solve (K + ridge I) coef = y by Cholesky, predict K_test coef.

    K: (n, n) symmetric positive (semi-)definite; y: (n,) or (E, n) (several right-hand sides); K_test: (m, n).
    When the Cholesky factorisation fails, a jitter eps = 1e-12 (float32: 1e-7) * mean(diag K) is added and
    multiplied by 10 until it succeeds or exceeds max_jitter * mean(diag K): then ValueError (K is not
    positive definite).  Cost: n^3 / 3 + 2 n^2 E (+ 2 m n E) flops.
    """
    check_kernel(K, "K", batch_ok=False)
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
    if y.dim() == 1:
        coef, F_train = coef[0], F_train[0]
        F_test = F_test[0] if F_test is not None else None
    return KernelRegression(coef=coef, F_train=F_train, F_test=F_test, jitter=jitter)


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
