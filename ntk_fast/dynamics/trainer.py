"""Gradient-flow trainer of the alpha-scaled FC net (the paper's training procedure), fast and reusable.

Dynamics (article notation; docs/training.md)::

    F(x)  = alpha (f(x; w) - f(x; w0))
    L(w)  = 1/(alpha^2 n) sum_i l(y_i F(x_i))          l = soft hinge softplus(beta_l (1-u))/beta_l, or 0.5 relu(1-u)^2
    dw/dt = -grad L(w)                                  (tau = 0)
    dw/dt = v,  tau dv/dt = -v - grad L                 (tau > 0, "continuous momentum")

discretised with the reference code's adaptive step (:mod:`ntk_fast.dynamics.steprule`): from (w, g = grad L(w)) a
trial w' = w - dt g is made, g' = grad L(w') computed, and the trial is accepted iff
dgrad = |g - g'|^2/(|g||g'|) < max_dgrad and dout = max_i |F'(x_i) - F(x_i)| < max_dout; then dt *= 1.1 when both
are under half their bounds.  A rejected trial is dropped and dt /= 10.  One forward and one backward pass per
attempt: the trial's (F', g') become the state when accepted.  The run stops when y_i F(x_i) >= 1 for every
training point ("converged"), or at t >= max_time, after max_steps accepted steps, after max_wall seconds,
or when no finite trial can be made ("nonfinite").

Mapping to the reference code (feature_lazy): its last layer is over h and its loss prefactor 1/alpha, so
alpha_code = sqrt(h) alpha and t_code / h = t / (sqrt(h) alpha).

Modules: the engine (buffers of the K nets, one attempt: :mod:`ntk_fast.dynamics.engine`), the per-net host state
and the resume file (:mod:`ntk_fast.dynamics.state`), the ensemble records (:mod:`ntk_fast.dynamics.ensemble`),
the shared keyword arguments (:mod:`ntk_fast.dynamics.config`) and this loop.  An ensemble of K nets (same
architecture, own init) is trained with batched matmuls; every net has its own dt, accept/reject, clock,
records and stop; a stopped net is frozen (dt = 0).
"""
from __future__ import annotations

import copy
import hashlib
import math
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from ntk_fast.dynamics import observables as obs
from ntk_fast.dynamics.config import FlowConfig, PathLike, check_alpha, flow_config, progress_bar
from ntk_fast.dynamics.engine import AttemptStats, FlowEngine
from ntk_fast.dynamics.ensemble import EnsembleTracker
from ntk_fast.dynamics.losses import LOSSES, check_targets, is_margin, loss_value
from ntk_fast.dynamics.results import RESUMABLE, FlowResult, atomic_save, overall_status
from ntk_fast.dynamics.state import NetState, checkpoint_blob, read_checkpoint
from ntk_fast.dynamics.steprule import dgrad_from_norms
from ntk_fast.guards import DEFAULT_MAX_STEPS, require_memory
from ntk_fast.guards.estimates import train_bytes
from ntk_fast.models.fc import FCNet, fc_features

__all__ = ["train", "FlowResult", "TrainOptions"]
_RESUME_KEYS = ("alpha", "loss", "loss_beta", "tau", "K", "n", "d", "h", "L", "P", "dtype", "data")

# ----------------------------------------------------------------------------------------------- checks
def _check_nets(net: Union[FCNet, Sequence[FCNet]]) -> List[FCNet]:
    nets = [net] if isinstance(net, FCNet) else list(net) if isinstance(net, (list, tuple)) else None
    if not nets or not all(isinstance(m, FCNet) for m in nets):
        raise ValueError(f"train: net must be an FCNet or a non-empty list of FCNets, got {type(net).__name__}")
    a = nets[0]
    for m in nets:
        if m.k != 1:
            raise ValueError(f"train: the trainer is for a scalar output (k = 1), got k = {m.k}")
        if m.biases is not None:
            raise ValueError("train: nets with biases are not supported by the trainer (use bias=False)")
        if (m.d, m.h, m.L, m.activation, m.beta) != (a.d, a.h, a.L, a.activation, a.beta):
            raise ValueError("train: all nets of an ensemble must share d, h, L, activation and beta")
        w = m.weights[0]
        if w.dtype != a.weights[0].dtype or w.device != a.weights[0].device:
            raise ValueError("train: all nets of an ensemble must share dtype and device")
        if w.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"train: weights must be float32 or float64, got {w.dtype}")
    return nets


def _fused_ok(net: Any) -> bool:
    """The fused path takes bias-free scalar FCNets; anything else is for the generic trainer."""
    nets = [net] if isinstance(net, FCNet) else list(net) if isinstance(net, (list, tuple)) else [net]
    return all(isinstance(m, FCNet) and m.k == 1 and m.biases is None for m in nets)


def _check_data(x: Any, y: Any, d: int, like: torch.Tensor, xname: str, yname: str, loss: str):
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != d:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"train: {xname} must be a tensor of shape (n, {d}), got {shape}")
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0]:
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"train: {yname} must be a tensor of shape ({x.shape[0]},) matching {xname}, got {shape}")
    if x.shape[0] == 0:
        raise ValueError(f"train: {xname} has no points")
    if not torch.isfinite(x).all():
        raise ValueError(f"train: {xname} contains NaN or infinite values")
    check_targets(y, loss, yname, "train")
    return (x.to(dtype=like.dtype, device=like.device).contiguous(),
            y.to(dtype=like.dtype, device=like.device).contiguous())


def _digest(*ts: torch.Tensor) -> str:
    h = hashlib.sha1()
    for t in ts:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()




@dataclass(frozen=True)
class TrainOptions:
    """The trainer's own keyword arguments (those it does not share with kernel_flow; see :func:`train`)."""
    tau: float = 0.0
    kernel_every: int = 0
    kernel_points: Union[int, torch.Tensor, None] = 256
    t1_fraction: float = 0.5
    grow_factor: float = 1.0
    max_rejections: int = 40
    use_cuda_graph: bool = True


# ------------------------------------------------------------------------------------------------ the loop
class _Training:
    """One call of :func:`train`: the engine, the per-net states, the records, the resume file and the loop."""

    def __init__(self, nets: List[FCNet], x, y, alpha: float, x_test, y_test, cfg: FlowConfig, opt: TrainOptions):
        self.wall0 = time.perf_counter()
        self.nets, self.x, self.y, self.alpha, self.x_test, self.y_test = nets, x, y, alpha, x_test, y_test
        self.cfg, self.opt, self.rule = cfg, opt, cfg.rule
        self.eng = eng = FlowEngine(nets, x, y, alpha, cfg.loss, cfg.loss_beta, opt.tau, opt.use_cuda_graph)
        self.K = K = eng.K
        self.config = dict(alpha=alpha, loss=cfg.loss, loss_beta=cfg.loss_beta, max_dgrad=cfg.max_dgrad,
                           max_dout=cfg.max_dout, grow=cfg.grow, shrink=cfg.shrink, grow_fraction=cfg.grow_fraction,
                           record_rate=cfg.record_rate, record_spacing=cfg.record_spacing, tau=opt.tau, K=K, n=eng.n,
                           d=eng.d, h=eng.h, L=eng.L, P=eng.P, dtype=str(eng.dtype),
                           alpha_code=alpha * math.sqrt(eng.h), data=_digest(x, y))
        self.code_time = math.sqrt(eng.h) * alpha                  # t_code / h = t / code_time
        if cfg.resume is not None:
            self._resume(cfg.resume)
        else:
            self._fresh()
        self.a0_test = x_test / math.sqrt(eng.d) if x_test is not None else None
        self.f0_test = eng.forward(eng.layer_views(eng.w0, squeeze=True), self.a0_test) if x_test is not None else None
        self.rms_f0 = obs.rms(eng.f0).cpu().numpy()
        self._kernel_setup(opt.kernel_points)

    def _fresh(self) -> None:
        rep = self.eng.init_state()
        a2 = self.alpha * self.alpha
        self.S = [NetState(g_sq=float(r[0]), loss=float(r[3]), n_under=int(r[4]), mean_sq=float(r[5]),
                           l0=float(r[3] * a2)) for r in rep]
        for k, s in enumerate(self.S):
            if not (np.isfinite(rep[k, 3]) and np.isfinite(rep[k, 0])):
                s.status = "nonfinite"
        self.history: List[List[Dict[str, Any]]] = [[] for _ in range(self.K)]
        self.tracker = EnsembleTracker(self.K)
        self.wall_before = 0.0

    def _resume(self, path: PathLike) -> None:
        ck = read_checkpoint(path)
        for key in _RESUME_KEYS:
            if ck["config"][key] != self.config[key]:
                raise ValueError(f"train: resume={path} was written with {key}={ck['config'][key]!r}, "
                                 f"but this call has {key}={self.config[key]!r}")
        self.eng.load_state(ck["engine"])
        self.S, self.history, self.wall_before = ck["nets"], ck["history"], ck["wall"]
        self.tracker = EnsembleTracker.from_state(ck["ensemble"], self.K, self.eng.device)
        for s in self.S:
            if s.status in RESUMABLE:
                s.status = "running"
        self.tracker.resumed([k for k, s in enumerate(self.S) if s.status == "running"])

    def _kernel_setup(self, kernel_points) -> None:
        """The points of the kernel change |Theta_t - Theta_0|_F / |Theta_0|_F and Theta_0 of every net."""
        eng = self.eng
        xk = obs.kernel_points_of(kernel_points, self.x, self.x_test)
        self.ak = xk / math.sqrt(eng.d) if xk is not None else None
        self.theta0 = None if xk is None else [self._theta(eng.initial_weights(k)) for k in range(self.K)]

    def _theta(self, Ws: List[torch.Tensor]) -> torch.Tensor:
        return obs.gram_from_features(*fc_features(Ws, self.ak, self.eng.act_plain))

    def wall(self) -> float:
        return self.wall_before + time.perf_counter() - self.wall0

    # ------------------------------------------------------------------------------------------ records
    def record(self, k: int, event: str, scheduled: bool = False) -> None:
        """Append the record of net k's state to history[k] (see docs/training.md for the fields)."""
        k, eng, s, a = int(k), self.eng, self.S[int(k)], self.alpha
        F = eng.F[eng.base, k]
        Ws = eng.net_weights(k)
        dw = [float(torch.linalg.norm((w - w0).double())) for w, w0 in zip(Ws, eng.initial_weights(k))]
        rec = dict(event=event, step=s.step, attempts=s.attempts, t=s.t, t_code_over_h=s.t / self.code_time,
                   dt=s.last_dt, next_dt=s.dt, dgrad=s.last_dgrad, dout=s.last_dout, wall=self.wall(),
                   train_loss=s.loss, train_mean_l=s.loss * a * a, train_err=float(obs.error(F, self.y)),
                   train_nd=s.n_under, train_rms_F=float(obs.rms(F)), grad_norm=math.sqrt(s.g_sq), dw=dw,
                   dw_total=math.sqrt(sum(v * v for v in dw)), w0_norm=float(torch.linalg.norm(eng.w0[k].double())))
        if self.x_test is not None:
            Ft = a * (eng.forward(Ws, self.a0_test)[0] - self.f0_test[k])
            y_test = self.y_test
            rec.update(test_loss=float(loss_value(self.cfg.loss, Ft.double(), y_test.double(),
                                                  self.cfg.loss_beta).mean()) / a ** 2,
                       test_err=float(obs.error(Ft, y_test)), test_nd=int(obs.under_margin(Ft, y_test)),
                       test_rms_F=float(obs.rms(Ft)))
            if self.K > 1:
                self.tracker.add(k, s.step, s.t, Ft, scheduled)
        every = self.opt.kernel_every
        if self.theta0 is not None and (event == "final" or (every > 0 and s.n_records % every == 0)):
            rec["kernel_change"] = obs.kernel_change(self._theta(eng.net_weights(k)), self.theta0[k])
        self.history[k].append(rec)

    def save_checkpoint(self) -> None:
        if self.cfg.checkpoint is None:
            return
        atomic_save(checkpoint_blob(self.config, self.eng.state(), self.S, self.history, self.tracker.state(),
                                    self.wall()), self.cfg.checkpoint)

    def limit_status(self, s: NetState) -> Optional[str]:
        if s.t >= self.cfg.time_limit:
            return "max_time"
        if self.cfg.max_steps is not None and s.step >= self.cfg.max_steps:
            return "max_steps"
        return None

    def first_records(self) -> None:
        """The step-0 record of every running net of a fresh run, and the stops decided before any step."""
        if self.cfg.resume is None:
            for k, s in enumerate(self.S):
                if s.status == "running":
                    self.record(k, "scheduled", scheduled=True)
                    s.n_records += 1
                    s.next_record = obs.next_record(0, self.cfg.record_rate, self.cfg.record_spacing)
                    if is_margin(self.cfg.loss) and s.n_under == 0:
                        s.status = "converged"
        for s in self.S:
            if s.status == "running" and self.limit_status(s):
                s.status = self.limit_status(s)

    # ------------------------------------------------------------------------------------------- steps
    def decide(self, rep: np.ndarray, active: np.ndarray) -> np.ndarray:
        """The step rule for every active net from the attempt's report; returns the accepted mask."""
        accepted = np.zeros(self.K, dtype=bool)
        for k in np.nonzero(active)[0]:
            s, st = self.S[k], AttemptStats(*rep[k])
            dgrad = dgrad_from_norms(s.g_sq, st.gp_sq, st.diff_sq) if np.isfinite(st.gp_sq + st.diff_sq) else math.nan
            s.attempts += 1
            ok, new_dt = self.rule.decide(dgrad, st.dout, s.dt)
            if ok:
                accepted[k] = True
                s.t += s.dt
                s.step += 1
                s.last_dt, s.last_dgrad, s.last_dout = s.dt, dgrad, float(st.dout)
                s.g_sq, s.loss, s.n_under, s.mean_sq = float(st.gp_sq), float(st.loss), int(st.n_under), float(st.mean_sq)
                s.rejections = 0
            else:
                s.rejections += 1
            s.dt = new_dt
            if not ok and s.rejections >= self.opt.max_rejections:
                s.status = "stalled" if np.isfinite(rep[k]).all() else "nonfinite"
                self.tracker.stop(k)
        return accepted

    def after_accept(self, k: int) -> None:
        """t1, t_grow, the record schedule and the stops of net k after an accepted step."""
        s, a2 = self.S[k], self.alpha * self.alpha
        if math.isnan(s.t1) and s.loss * a2 <= self.opt.t1_fraction * s.l0:
            s.t1 = s.t
        if math.isnan(s.t_grow) and math.sqrt(s.mean_sq) / self.alpha >= self.opt.grow_factor * self.rms_f0[k]:
            s.t_grow = s.t
        stop = "converged" if (is_margin(self.cfg.loss) and s.n_under == 0) else self.limit_status(s)
        on_schedule = s.step >= s.next_record
        if on_schedule or stop is not None:
            if on_schedule:
                s.next_record = obs.next_record(s.step, self.cfg.record_rate, self.cfg.record_spacing)
            event = "converged" if stop == "converged" else "scheduled" if on_schedule else "stopped"
            self.record(k, event, scheduled=on_schedule)
            s.n_records += 1
        if stop is not None:
            s.status = stop
            self.tracker.stop(k)

    def loop(self) -> None:
        """Attempts until every net has stopped (or max_wall); the resume file every checkpoint_every seconds."""
        K, cfg = self.K, self.cfg
        bar = progress_bar(cfg.progress, desc=f"flow K={K} alpha={self.alpha:g}", unit="step")
        last_save = last_bar = time.perf_counter()
        try:
            while True:
                active = np.array([s.status == "running" for s in self.S])
                if not active.any():
                    break
                if time.perf_counter() - self.wall0 >= cfg.wall_limit:
                    for k in np.nonzero(active)[0]:
                        self.S[k].status = "max_wall"
                    break
                rep = self.eng.attempt(np.where(active, np.array([s.dt for s in self.S]), 0.0))
                accepted = self.decide(rep, active)
                self.eng.commit(accepted, active)
                for k in np.nonzero(accepted)[0]:
                    self.after_accept(k)
                if K > 1 and self.x_test is not None:
                    self.tracker.flush(self.y_test, self.wall())
                now = time.perf_counter()
                if bar is not None:
                    bar.update(int(accepted[0]) if K == 1 else int(accepted.sum()))
                    if now - last_bar > 0.5:
                        s = self.S[int(np.argmax(active))]
                        bar.set_postfix(t=f"{s.t:.3g}", dt=f"{s.dt:.2g}", nd=s.n_under,
                                        loss=f"{s.loss * self.alpha ** 2:.3g}", running=int(active.sum()))
                        last_bar = now
                if cfg.checkpoint is not None and now - last_save >= cfg.checkpoint_every:
                    self.save_checkpoint()
                    last_save = now
        finally:
            if bar is not None:
                bar.close()

    # ------------------------------------------------------------------------------------------ result
    def result(self) -> FlowResult:
        eng, K = self.eng, self.K
        for k in range(K):
            self.record(k, "final")
        if K > 1 and self.x_test is not None:
            self.tracker.flush(self.y_test, self.wall(), at_end=True)
        self.save_checkpoint()
        Ft = None
        if self.x_test is not None:
            Ft = self.alpha * (eng.forward(eng.views[eng.base], self.a0_test) - self.f0_test)
        finals = []
        for k, s in enumerate(self.S):
            last = self.history[k][-1]
            fin = {kk: v for kk, v in last.items() if kk != "event"}
            fin.update(status=s.status, t1=s.t1, t_grow=s.t_grow, t1_code_over_h=s.t1 / self.code_time,
                       weight_change=math.sqrt(eng.h) * last["dw_total"] / last["w0_norm"])
            finals.append(fin)
        out_nets = []
        for k, m in enumerate(self.nets):
            mk = copy.deepcopy(m)
            for p, w in zip(mk.weights, eng.net_weights(k)):
                p.data.copy_(w)
            out_nets.append(mk)
        statuses = [s.status for s in self.S]
        return FlowResult(
            status=overall_status(statuses), statuses=statuses, F_train=eng.F[eng.base].clone(), F_test=Ft,
            t=torch.tensor([s.t for s in self.S], dtype=torch.float64), steps=torch.tensor([s.step for s in self.S]),
            attempts=torch.tensor([s.attempts for s in self.S]), history=self.history, final=finals,
            config=self.config, wall=self.wall(), nets=out_nets, f0_train=eng.f0.clone(), f0_test=self.f0_test,
            ensemble=obs.ensemble_stats(Ft, self.y_test) if (Ft is not None and K > 1) else None,
            ensemble_history=list(self.tracker.records))



# ----------------------------------------------------------------------------------------------- entry point
def train(net: Union[FCNet, Sequence[FCNet]], x: torch.Tensor, y: torch.Tensor, alpha: float, *,
          x_test: Optional[torch.Tensor] = None, y_test: Optional[torch.Tensor] = None,
          loss: str = "softhinge", loss_beta: float = 20.0, max_dgrad: float = 1e-4, max_dout: float = 0.1,
          grow: float = 1.1, shrink: float = 10.0, grow_fraction: float = 0.5,
          record_rate: float = 0.01, record_spacing: int = 100,
          max_time: Optional[float] = None, max_steps: Optional[int] = None, max_wall: Optional[float] = None,
          checkpoint: Optional[PathLike] = None, checkpoint_every: float = 600.0, resume: Optional[PathLike] = None,
          progress: Optional[bool] = None, tau: float = 0.0, kernel_every: int = 0,
          kernel_points: Union[int, torch.Tensor, None] = None, t1_fraction: float = 0.5, grow_factor: float = 1.0,
          max_rejections: int = 40, use_cuda_graph: bool = True, dynamics: str = "flow", **kw: Any) -> FlowResult:
    """Train ``net`` (an FCNet, or a list of K FCNets: an ensemble) by the paper's adaptive gradient flow.

    Any other module (or an FCNet with biases), ``dynamics="adam"|"sgd"``, or options of the generic trainer
    (``generic``) go to :func:`ntk_fast.dynamics.generic.train_any` (docs/training.md).

    Args (article notation, see the module docstring):
        x (n, d), y (n,) in {-1, +1}: training set.  alpha > 0: the output scale of F = alpha (f - f0).
        x_test, y_test: optional test set, evaluated at every record and at the end.
        Shared with kernel_flow (:class:`ntk_fast.dynamics.config.FlowConfig`): loss ("softhinge" with
            beta_l = loss_beta, or "qhinge"), the step rule (max_dgrad, max_dout, grow, shrink, grow_fraction),
            the record schedule (record_rate, record_spacing: :func:`ntk_fast.dynamics.observables.next_record`),
            the limits (max_time: flow time per net, max_steps: accepted steps per net (default 1e6, status
            "max_steps"; math.inf lifts it, given max_time or max_wall), max_wall: seconds of this
            call; None = no limit), the resume file (checkpoint: written atomically every ``checkpoint_every``
            seconds and at the end; resume: a checkpoint to continue from, bit-for-bit the same run, the nets
            passed are used for their architecture only) and progress (tqdm; None: only when stderr is a tty).
        tau: momentum time (0: plain gradient flow).
        kernel_every: compute the kernel change |Theta_t - Theta_0|_F / |Theta_0|_F every that many records
            (0: only at the end); kernel_points: an int m (first m test points, or train points without a test
            set; 0 disables) or a (m, d) tensor of points.  Default (None): 256 on the fused FC path (the Gram op on
            the net's layer features: m^2 sum_l (fan_in_l + fan_out_l) flops, ~0.1 GFLOP for h = 100), 0 (off)
            on the generic path, where each evaluation is a Jacobian of m points through the any-model NTK
            (about 3 m forward passes and m^2 P flops per model and record: 256 points of the paper's CNN with
            h = 32, P = 77.6k, are ~11 GFLOP); pass kernel_points=m to ask for it.
        t1_fraction: t1 is the first t with mean l <= t1_fraction * (mean l at t = 0) (the paper's t1 for 0.5).
        grow_factor: t_grow is the first t with rms(f - f0) >= grow_factor * rms(f0) on the training set.
        max_rejections: consecutive rejections (dt divided by 10 each) after which a net stops as "nonfinite" or
            "stalled".  use_cuda_graph: capture the attempt in CUDA graphs (CUDA only).
        Old names checkpoint_spacing / checkpoint_rate (now record_spacing / record_rate) warn and still work.
    Returns a :class:`FlowResult` (:mod:`ntk_fast.dynamics.results`).  Before allocating, the buffers are
    estimated (ntk_fast.guards.estimates.train_bytes): a MemoryBudgetError when they exceed the free memory.
    Cost per attempt: one forward and one backward pass, ~6 n P flops for P = d h + (L-1) h^2 + h weights per net.
    """
    renamed = {k: kw.pop(k) for k in ("checkpoint_spacing", "checkpoint_rate") if k in kw}
    if dynamics != "flow" or kw or not _fused_ok(net):
        from ntk_fast.dynamics.generic import train_any
        return train_any(net, x, y, alpha, dynamics=dynamics, x_test=x_test, y_test=y_test, loss=loss,
                         loss_beta=loss_beta, max_dgrad=max_dgrad, max_dout=max_dout, grow=grow, shrink=shrink,
                         grow_fraction=grow_fraction, record_rate=record_rate, record_spacing=record_spacing,
                         max_time=max_time, max_steps=max_steps, max_wall=max_wall, checkpoint=checkpoint,
                         checkpoint_every=checkpoint_every, resume=resume, progress=progress, tau=tau,
                         max_rejections=max_rejections, kernel_every=kernel_every,
                         kernel_points=0 if kernel_points is None else kernel_points, t1_fraction=t1_fraction,
                         **renamed, **kw)
    nets = _check_nets(net)
    a = nets[0]
    like = a.weights[0]
    alpha = check_alpha(alpha)
    if loss not in LOSSES:
        raise ValueError(f"train: loss must be one of {LOSSES}, got {loss!r}")
    if not (tau >= 0 and math.isfinite(tau)):
        raise ValueError(f"train: tau must be a finite number >= 0, got {tau}")
    shared = dict(loss=loss, loss_beta=loss_beta, max_dgrad=max_dgrad, max_dout=max_dout, grow=grow, shrink=shrink,
                  grow_fraction=grow_fraction, record_rate=record_rate, record_spacing=record_spacing,
                  max_time=max_time, max_steps=DEFAULT_MAX_STEPS if max_steps is None else max_steps,
                  max_wall=max_wall, checkpoint=checkpoint,
                  checkpoint_every=float(checkpoint_every), resume=resume, progress=progress)
    cfg = flow_config("train", shared, renamed, ("checkpoint_spacing", "checkpoint_rate"))
    opt = TrainOptions(tau=float(tau), kernel_every=int(kernel_every),
                       kernel_points=TrainOptions.kernel_points if kernel_points is None else kernel_points,
                       t1_fraction=float(t1_fraction), grow_factor=float(grow_factor),
                       max_rejections=int(max_rejections), use_cuda_graph=use_cuda_graph)
    x, y = _check_data(x, y, a.d, like, "x", "y", loss)
    if (x_test is None) != (y_test is None):
        raise ValueError("train: give both x_test and y_test, or neither")
    if x_test is not None:
        x_test, y_test = _check_data(x_test, y_test, a.d, like, "x_test", "y_test", loss)
    P = sum(w.numel() for w in a.weights)
    n_all = x.shape[0] + (0 if x_test is None else x_test.shape[0])
    require_memory(train_bytes(len(nets), P, n_all, a.h, a.L, float(tau), like.element_size()),
                   f"train: the buffers of {len(nets)} net(s) with {P} weights on {n_all} points", like.device,
                   "Train fewer nets at once (smaller ensemble), or on fewer points.")
    with torch.no_grad():
        run = _Training(nets, x, y, alpha, x_test, y_test, cfg, opt)
        run.first_records()
        run.loop()
        return run.result()
