"""Gradient-flow trainer of the alpha-scaled FC net (the paper's training procedure), fast and reusable.

Dynamics (article notation; docs/design.md section 5)::

    F(x)  = alpha (f(x; w) - f(x; w0))
    L(w)  = 1/(alpha^2 n) sum_i l(y_i F(x_i))          l = soft hinge softplus(beta_l (1-u))/beta_l, or 0.5 relu(1-u)^2
    dw/dt = -grad L(w)                                  (tau = 0)
    dw/dt = v,  tau dv/dt = -v - grad L                 (tau > 0, "continuous momentum")

discretised with the reference code's adaptive step (:mod:`ntk_fast.dynamics.steprule`): from (w, g = grad L(w)) a trial
w' = w - dt g is made, g' = grad L(w') computed, and the trial is accepted iff
dgrad = |g - g'|^2/(|g||g'|) < max_dgrad and dout = max_i |F'(x_i) - F(x_i)| < max_dout; then dt *= 1.1 when both
are under half their bounds.  A rejected trial is dropped and dt /= 10.  One forward and one backward pass per
attempt: the trial's (F', g') become the state when accepted.  The run stops when y_i F(x_i) >= 1 for every
training point ("converged"), or at t >= max_time, after max_steps accepted steps, after max_wall seconds,
or when no finite trial can be made ("nonfinite").

Mapping to the reference code (feature_lazy): its last layer is over h and its loss prefactor 1/alpha, so
alpha_code = sqrt(h) alpha and t_code / h = t / (sqrt(h) alpha).

Implementation (cost per attempt: one forward, 2 n P flops, and one backward, ~4 n P flops, as BLAS matmuls,
plus three memory passes):
  * the weights of K nets live in a flat (K, P) buffer with per-layer (K, out, in) views; there are two such
    buffers (base and trial) for the weights, the gradients and the velocity;
  * ``ntk_fast::flow_step`` writes the trial weights into the trial buffer in one pass; the forward pass and the
    backward pass (seeded by the per-point vector r = dL/df of ``ntk_fast::flow_loss``) write the trial gradient
    straight into the trial gradient buffer (matmul out=); ``ntk_fast::flow_grad_stats`` gives |g'|^2, |g - g'|^2;
  * each hidden softplus layer is one ``ntk_fast::softplus_act`` pass over the matmul output: a = sigma(z)/sqrt(h)
    in place and s = sigma'(z)/sqrt(h), one exp and one log1p per element, no overflow for large z;
  * accepting swaps the roles of the two buffers, rejecting does nothing (no copies of the state); in an
    ensemble where some nets accept and others reject, only the minority's rows are copied;
  * an ensemble of K nets (same architecture, own init) is trained with batched matmuls; every net has its own
    dt, accept/reject, clock, checkpoints and stop; a stopped net is frozen (dt = 0);
  * on CUDA the attempt (step, forward, loss, backward, statistics) issues no host synchronisation and is
    captured in two CUDA graphs (one per buffer parity); the only sync per attempt is reading the small
    (K, 5) report for the accept/reject decision.  (That path is written but was not run in development:
    no GPU was available.)
"""
from __future__ import annotations

import copy
import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ntk_fast.ops import flow as ops
from ntk_fast.dynamics import observables as obs
from ntk_fast.models.fc import FCNet
from ntk_fast.dynamics.losses import LOSSES, check_targets, is_margin, loss_value
from ntk_fast.dynamics.results import RESUMABLE as _RESUMABLE, atomic_save, atomic_write_json, load_checkpoint, overall_status, stem_of
from ntk_fast.dynamics.steprule import StepRule, dgrad_from_norms

STATUSES = ("running", "converged", "max_time", "max_steps", "max_wall", "nonfinite", "stalled")  # see ntk_fast.dynamics.results
_CKPT_VERSION = 1


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


# ----------------------------------------------------------------------------------------------- result
@dataclass
class FlowResult:
    """Outcome of :func:`train`.

    status: "converged", "max_time", "max_steps", "max_wall", "nonfinite" or "stalled" (for an ensemble:
    "converged" when every net converged, else the first other status in the order nonfinite, stalled,
    max_wall, max_steps, max_time: ntk_fast.dynamics.results.overall_status); statuses: one per net.  history: checkpoint records (dicts with a "net"
    index).  nets: the trained nets (net: the first).  final: per-net summary dicts.  ensemble: ensemble
    observables of the test outputs (K > 1 with a test set).  outputs: F on the train (and test) set, (K, n).
    ensemble_history: (K > 1 with a test set) one record per checkpoint step s of the shared schedule, made once
    every net has passed s or stopped: the ensemble observables (var, ens_err, mean_err, rms_mean_F) of the
    nets' test outputs at step s (a net stopped earlier contributes its final output), with t_mean, t_min and
    t_max over the nets at that step and the number of nets already stopped.
    """
    status: str
    statuses: List[str]
    history: List[Dict[str, Any]]
    nets: List[FCNet]
    final: List[Dict[str, Any]]
    ensemble: Optional[Dict[str, float]] = None
    outputs: Dict[str, torch.Tensor] = field(default_factory=dict)
    config: Dict[str, Any] = field(default_factory=dict)
    ensemble_history: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def net(self) -> FCNet:
        return self.nets[0]

    def history_of(self, k: int = 0) -> List[Dict[str, Any]]:
        return [r for r in self.history if r["net"] == k]

    def summary(self) -> Dict[str, Any]:
        return {"status": self.status, "statuses": self.statuses, "final": self.final, "ensemble": self.ensemble,
                "config": self.config, "ensemble_history": self.ensemble_history}

    def save(self, path: str) -> None:
        """Write ``<path>.pt`` (nets, outputs, history) and ``<path>.json`` (summary and history), atomically."""
        stem = stem_of(path)
        a = self.nets[0]
        arch = dict(d=a.d, h=a.h, L=a.L, activation=a.activation, beta=a.beta)
        atomic_save({"summary": self.summary(), "history": self.history, "arch": arch,
                      "dtype": str(a.weights[0].dtype),
                      "weights": [[w.detach().cpu() for w in m.weights] for m in self.nets],
                      "outputs": {k: v.cpu() for k, v in self.outputs.items()}}, stem + ".pt")
        atomic_write_json({**self.summary(), "history": self.history}, stem + ".json")

    @classmethod
    def load(cls, path: str) -> "FlowResult":
        """Read what :meth:`save` wrote (nets on the CPU)."""
        blob = load_checkpoint(stem_of(path) + ".pt", "FlowResult.load", ("arch", "summary", "weights", "history"))
        arch, s = blob["arch"], blob["summary"]
        nets = []
        for ws in blob["weights"]:
            m = FCNet(arch["d"], arch["h"], arch["L"], activation=arch["activation"], beta=arch["beta"],
                      dtype=ws[0].dtype, device="meta")
            m = m.to_empty(device="cpu")
            with torch.no_grad():
                for p, w in zip(m.weights, ws):
                    p.copy_(w)
            nets.append(m)
        return cls(s["status"], s["statuses"], blob["history"], nets, s["final"], s["ensemble"], blob["outputs"],
                   s["config"], s.get("ensemble_history", []))


# ----------------------------------------------------------------------------------------------- engine
class _Engine:
    """Buffers and one attempt of the step rule for K nets (see the module docstring)."""

    def __init__(self, nets: List[FCNet], x: torch.Tensor, y: torch.Tensor, alpha: float, loss: str,
                 loss_beta: float, tau: float, use_graph: bool):
        a = nets[0]
        self.K, self.d, self.h, self.L = len(nets), a.d, a.h, a.L
        self.sigma, self.dsigma = a.sigma, a.dsigma
        self.activation, self.act_beta, self.act_c = a.activation, a.beta, a.act_c
        self.alpha, self.loss, self.loss_beta, self.tau = alpha, loss, loss_beta, tau
        w0 = a.weights[0]
        self.dtype, self.device = w0.dtype, w0.device
        self.shapes = [tuple(p.shape) for p in a.weights]
        self.sizes = [o * i for o, i in self.shapes]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).tolist()
        self.P = int(self.offsets[-1])
        K, P, n = self.K, self.P, x.shape[0]
        self.n = n
        self.x, self.y = x, y
        self.a0 = x / math.sqrt(self.d)
        self.w = torch.empty(2, K, P, dtype=self.dtype, device=self.device)
        self.g = torch.zeros(2, K, P, dtype=self.dtype, device=self.device)
        self.v = torch.zeros(2, K, P, dtype=self.dtype, device=self.device) if tau > 0 else None
        self.F = torch.zeros(2, K, n, dtype=self.dtype, device=self.device)
        # per attempt: |g'|^2, |g - g'|^2, dout, loss, nd, mean F^2 (read by the host in one transfer)
        self.report = torch.zeros(2, K, 6, dtype=torch.float64, device=self.device)
        self.dt = torch.zeros(K, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            for k, m in enumerate(nets):
                self.w[0, k].copy_(torch.cat([p.detach().reshape(-1) for p in m.weights]))
        self.w0 = self.w[0].clone()
        self.views = [self._layer_views(self.w[p], squeeze=True) for p in (0, 1)]
        self.gviews = [self._layer_views(self.g[p], squeeze=True) for p in (0, 1)]
        self.base = 0
        self.f0 = self.forward(self.views[0], self.a0)[0]            # (K, n): F = alpha (f - f0) = 0 at t = 0
        self.use_graph = use_graph and self.device.type == "cuda"
        self.graphs: Dict[int, Any] = {}
        self._dt_host = torch.zeros(K, dtype=self.dtype, pin_memory=self.use_graph)

    def _layer_views(self, flat: torch.Tensor, squeeze: bool = False) -> List[torch.Tensor]:
        """Per-layer (K, out, in) views of a flat (K, P) buffer; (out, in) with squeeze=True and K = 1
        (plain mm instead of bmm)."""
        vs = [flat[:, o:o + s].view(flat.shape[0], *sh) for o, s, sh in zip(self.offsets[:-1], self.sizes, self.shapes)]
        return [v[0] for v in vs] if squeeze and flat.shape[0] == 1 else vs

    def net_weights(self, k: int, parity: Optional[int] = None) -> List[torch.Tensor]:
        p = self.base if parity is None else parity
        return [v[k] for v in self._layer_views(self.w[p])]

    # forward and backward of the batched nets: Ws[l] is (K, out, in), a0 is (n, d)
    def _act(self, z: torch.Tensor, keep: bool):
        """a = sigma(z)/sqrt(h) and (keep) s = sigma'(z)/sqrt(h), with the constants folded in place."""
        scale = self.act_c / math.sqrt(self.h)
        if self.activation == "softplus":
            a = z.contiguous()                                          # the matmul's fresh output: reused in place
            s = torch.empty_like(a) if keep else None
            ops.softplus_act(a, s, self.act_beta, scale)
        else:
            a = self.sigma(z) / math.sqrt(self.h)
            s = self.dsigma(z) / math.sqrt(self.h) if keep else None
        return a, s

    # forward and backward of the batched nets: Ws[l] is (K, out, in) (2-D (out, in) when K = 1), a0 is (n, d)
    def forward(self, Ws: Sequence[torch.Tensor], a0: torch.Tensor, keep: bool = False):
        """f (K, n) of the nets; with keep=True also the layer inputs a(l) and sigma'(z(l))/sqrt(h) for backward.
        Cost: 2 n (d h + (L-1) h^2 + h) flops per net (matmuls) plus 2 elementwise passes per hidden layer."""
        acts, ds = [a0], []
        a = a0
        for l in range(self.L):
            z = torch.matmul(a, Ws[l].transpose(-1, -2))                # (K, n, h)
            a, s = self._act(z, keep)
            if keep:
                ds.append(s)
            acts.append(a)
        f = torch.matmul(a, Ws[self.L].transpose(-1, -2))[..., 0]       # (K, n)
        return (f if f.dim() == 2 else f.unsqueeze(0)), acts, ds

    def backward(self, Ws, G, acts, ds, r: torch.Tensor) -> None:
        """G[l] <- dL/dW(l) = delta(l+1)^T a(l), delta(L+1) = r = dL/df, delta(l) = (delta(l+1) W(l)) o sigma'/sqrt(h).
        Cost: 2 n (d h + (L-1) h^2 + h) flops for the gradients plus 2 n ((L-1) h^2 + h) for the deltas."""
        delta = (r if Ws[0].dim() == 3 else r[0]).unsqueeze(-1)         # (K, n, 1)
        for l in range(self.L, -1, -1):
            torch.matmul(delta.transpose(-1, -2), acts[l], out=G[l])
            if l > 0:
                delta = torch.matmul(delta, Ws[l]).mul_(ds[l - 1])

    def _attempt_ops(self, pb: int, pt: int) -> None:
        """Trial from buffers pb into buffers pt; fills report[pt].  No host synchronisation."""
        ops.flow_step(self.w[pb], self.g[pb], self.dt, self.tau, None if self.v is None else self.v[pb],
                      self.w[pt], None if self.v is None else self.v[pt])
        Ws = self.views[pt]
        f, acts, ds = self.forward(Ws, self.a0, keep=True)
        F, r, loss, nd, dout = ops.flow_loss(f, self.f0, self.y, self.F[pb], self.alpha, self.loss_beta, self.loss)
        self.backward(Ws, self.gviews[pt], acts, ds, r)
        st = ops.flow_grad_stats(self.g[pb], self.g[pt])
        self.F[pt].copy_(F)
        rep = self.report[pt]
        rep[:, 0:2].copy_(st)
        rep[:, 2].copy_(dout)
        rep[:, 3].copy_(loss)
        rep[:, 4].copy_(nd)
        rep[:, 5].copy_(F.double().pow(2).mean(1))

    def init_state(self) -> np.ndarray:
        """Gradient, loss and |g|^2 at the initial weights (base buffers); returns the (K, 6) report."""
        pb = self.base
        f, acts, ds = self.forward(self.views[pb], self.a0, keep=True)
        F, r, loss, nd, dout = ops.flow_loss(f, self.f0, self.y, self.F[pb], self.alpha, self.loss_beta, self.loss)
        self.backward(self.views[pb], self.gviews[pb], acts, ds, r)
        self.F[pb].copy_(F)
        st = ops.flow_grad_stats(self.g[pb], self.g[pb])
        rep = torch.stack([st[:, 0], st[:, 1], dout.double(), loss.double(), nd.double(),
                           F.double().pow(2).mean(1)], 1)
        return rep.cpu().numpy()

    def attempt(self, dts: np.ndarray) -> np.ndarray:
        """One trial step with per-net dt (0 freezes a net); returns the (K, 6) report on the host."""
        pb, pt = self.base, 1 - self.base
        if self.use_graph:
            self._dt_host.copy_(torch.from_numpy(dts))
            self.dt.copy_(self._dt_host, non_blocking=True)
            if pt not in self.graphs:
                self._capture()
            self.graphs[pt].replay()
        else:
            self.dt.copy_(torch.from_numpy(dts))
            self._attempt_ops(pb, pt)
        return self.report[pt].cpu().numpy()      # the one host synchronisation of an attempt

    def _capture(self) -> None:
        """Capture the attempt for both buffer parities (CUDA only).  Warm-up runs only the current parity,
        which writes into the trial buffers (scratch at this point); capturing does not execute."""
        pb, pt = self.base, 1 - self.base
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            self._attempt_ops(pb, pt)
        torch.cuda.current_stream().wait_stream(s)
        pool = None
        for p_t in (pt, pb):
            gr = torch.cuda.CUDAGraph()
            with torch.cuda.graph(gr, pool=pool):
                self._attempt_ops(1 - p_t, p_t)
            pool = gr.pool()
            self.graphs[p_t] = gr

    def commit(self, accepted: np.ndarray, active: np.ndarray) -> None:
        """Make the accepted trials the state.  All (active) accept: swap parity; none: keep; mixed: copy the
        minority's rows so that every net's state sits in one parity."""
        pb, pt = self.base, 1 - self.base
        acc = accepted & active
        rej = (~accepted) & active
        if not acc.any():
            return
        if acc.sum() >= rej.sum():
            if rej.any():
                idx = torch.as_tensor(np.nonzero(rej)[0], device=self.device)
                for buf in (self.w, self.g, self.v, self.F, self.report):
                    if buf is not None:
                        buf[pt, idx] = buf[pb, idx]
            self.base = pt
        else:
            idx = torch.as_tensor(np.nonzero(acc)[0], device=self.device)
            for buf in (self.w, self.g, self.v, self.F, self.report):
                if buf is not None:
                    buf[pb, idx] = buf[pt, idx]

    # state for checkpoints (base parity only)
    def state(self) -> Dict[str, torch.Tensor]:
        b = self.base
        st = {"w": self.w[b].clone(), "g": self.g[b].clone(), "F": self.F[b].clone(), "w0": self.w0.clone(),
              "f0": self.f0.clone()}
        if self.v is not None:
            st["v"] = self.v[b].clone()
        return {k: t.cpu() for k, t in st.items()}

    def load_state(self, st: Dict[str, torch.Tensor]) -> None:
        self.base = 0
        self.w[0].copy_(st["w"])
        self.g[0].copy_(st["g"])
        self.F[0].copy_(st["F"])
        self.w0.copy_(st["w0"])
        self.f0 = st["f0"].to(self.device).clone()
        if self.v is not None:
            self.v[0].copy_(st["v"])
        self.graphs = {}


class _EnsembleTrack:
    """Ensemble observables along the run.  Nets keep their own clocks, so records are keyed by the shared
    checkpoint steps: the test outputs of each net at checkpoint step s wait (on the device) until every net
    has passed s or stopped; a stopped net contributes its last output.  Then one record is made (flush)."""

    def __init__(self, K: int):
        self.K = K
        self.pending: Dict[int, Dict[int, Tuple[float, torch.Tensor]]] = {}
        self.last: Dict[int, Tuple[float, torch.Tensor]] = {}   # latest output of each net
        self.last_step: Dict[int, int] = {}
        self.stopped: set = set()
        self.records: List[Dict[str, Any]] = []

    def _record(self, event: str, step: int, entries, y_test, wall: float, stopped: int) -> None:
        ts = [t for t, _ in entries]
        st = obs.ensemble_stats(torch.stack([F for _, F in entries]), y_test)
        self.records.append(dict(event=event, step=step, t_mean=float(np.mean(ts)), t_min=min(ts), t_max=max(ts),
                                 nets_stopped=stopped, wall=wall, **st))

    def add(self, k: int, step: int, t: float, Ft: torch.Tensor, scheduled: bool) -> None:
        """Output of net k at its step ``step``; ``scheduled``: a step of the shared checkpoint schedule."""
        self.last[k] = (t, Ft.detach().clone())
        self.last_step[k] = step
        if scheduled and (not self.records or step > self.records[-1]["step"]):
            self.pending.setdefault(step, {})[k] = self.last[k]

    def stop(self, k: int) -> None:
        self.stopped.add(k)

    def flush(self, y_test: torch.Tensor, wall: float, at_end: bool = False) -> None:
        """Make the records of the pending steps that every net has passed (all of them at the end, where every
        net has stopped), then at the end one "final" record of the nets' last outputs."""
        for s in sorted(self.pending):
            got = self.pending[s]
            if any(k not in got and (k not in self.stopped and not at_end or k not in self.last)
                   for k in range(self.K)):
                break
            entries = [got.get(k, self.last.get(k)) for k in range(self.K)]
            self._record("checkpoint", s, entries, y_test, wall, sum(k not in got for k in range(self.K)))
            del self.pending[s]
        if at_end and len(self.last) == self.K:
            self._record("final", max(self.last_step.values()), [self.last[k] for k in range(self.K)], y_test, wall,
                         self.K)

    def state(self) -> Dict[str, Any]:
        cpu = lambda e: (e[0], e[1].cpu())  # noqa: E731
        return {"K": self.K, "pending": {s: {k: cpu(e) for k, e in d.items()} for s, d in self.pending.items()},
                "last": {k: cpu(e) for k, e in self.last.items()}, "last_step": dict(self.last_step),
                "stopped": sorted(self.stopped), "records": list(self.records)}

    @classmethod
    def from_state(cls, st: Optional[Dict[str, Any]], K: int, device) -> "_EnsembleTrack":
        """The tracker of a checkpoint; a checkpoint written before ensemble records existed starts a new one."""
        tr = cls(K)
        if st is None:
            return tr
        dev = lambda e: (e[0], e[1].to(device))  # noqa: E731
        tr.pending = {s: {k: dev(e) for k, e in d.items()} for s, d in st["pending"].items()}
        tr.last = {k: dev(e) for k, e in st["last"].items()}
        tr.last_step = dict(st["last_step"])
        tr.stopped = set(st["stopped"])
        tr.records = [r for r in st["records"] if r["event"] != "final"]
        return tr

    def resumed(self, running: Sequence[int]) -> None:
        """Nets that a resumed run trains on are no longer stopped."""
        self.stopped -= set(running)


# ----------------------------------------------------------------------------------------------- trainer
def train(net: Union[FCNet, Sequence[FCNet]], x: torch.Tensor, y: torch.Tensor, alpha: float, *,
          x_test: Optional[torch.Tensor] = None, y_test: Optional[torch.Tensor] = None,
          loss: str = "softhinge", loss_beta: float = 20.0, max_dgrad: float = 1e-4, max_dout: float = 0.1,
          tau: float = 0.0, max_time: float = math.inf, max_wall: float = math.inf, max_steps: Optional[int] = None,
          kernel_every: int = 0, kernel_points: Union[int, torch.Tensor, None] = 256,
          checkpoint: Optional[str] = None, checkpoint_every: float = 600.0, resume: Optional[str] = None,
          progress: bool = True, t1_fraction: float = 0.5, grow_factor: float = 1.0,
          checkpoint_rate: float = 0.01, checkpoint_spacing: int = 100, max_rejections: int = 40,
          use_cuda_graph: bool = True) -> FlowResult:
    """Train ``net`` (an FCNet, or a list of K FCNets: an ensemble) by the paper's adaptive gradient flow.

    Args (article notation, see the module docstring):
        x (n, d), y (n,) in {-1, +1}: training set.  alpha > 0: the output scale of F = alpha (f - f0).
        x_test, y_test: optional test set, evaluated at checkpoints and at the end.
        loss: "softhinge" (beta_l = loss_beta, default 20) or "qhinge".
        max_dgrad, max_dout: the step-rule bounds.  tau: momentum time (0: plain gradient flow).
        max_time: stop a net at t >= max_time; max_steps: after that many accepted steps (per net);
        max_wall: seconds of this call.
        kernel_every: compute the kernel change |Theta_t - Theta_0|_F / |Theta_0|_F every that many checkpoints
            (0: only at the end); kernel_points: an int m (first m test points, or train points without a test
            set; 0 disables) or a (m, d) tensor of points.
        checkpoint: path of a resumable checkpoint, written atomically every ``checkpoint_every`` seconds and at
            the end; resume: path of a checkpoint to continue from (bit-for-bit the same run; the nets passed are
            used for their architecture only).
        progress: tqdm progress bar.  t1_fraction: t1 is the first t with mean l <= t1_fraction * (mean l at
            t = 0) (the paper's t1 for 0.5).  grow_factor: t_grow is the first t with rms(f - f0) >=
            grow_factor * rms(f0) on the training set.  checkpoint_rate, checkpoint_spacing: the log-linear
            checkpoint sequence (:func:`ntk_fast.dynamics.observables.next_checkpoint`).  max_rejections: consecutive
            rejections (dt divided by 10 each) after which a net stops as "nonfinite" or "stalled".
    Returns a :class:`FlowResult`.
    Cost per attempt: one forward and one backward pass, ~6 n P flops for P = d h + (L-1) h^2 + h weights per net.
    """
    nets = _check_nets(net)
    a = nets[0]
    like = a.weights[0]
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"train: alpha must be a number, got {alpha!r}") from None
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"train: alpha must be a positive finite number, got {alpha}")
    if loss not in LOSSES:
        raise ValueError(f"train: loss must be one of {LOSSES}, got {loss!r}")
    if not (tau >= 0 and math.isfinite(tau)):
        raise ValueError(f"train: tau must be a finite number >= 0, got {tau}")
    if max_steps is not None and max_steps < 0:
        raise ValueError(f"train: max_steps must be >= 0, got {max_steps}")
    rule = StepRule(max_dgrad=max_dgrad, max_dout=max_dout)
    x, y = _check_data(x, y, a.d, like, "x", "y", loss)
    if (x_test is None) != (y_test is None):
        raise ValueError("train: give both x_test and y_test, or neither")
    if x_test is not None:
        x_test, y_test = _check_data(x_test, y_test, a.d, like, "x_test", "y_test", loss)
    with torch.no_grad():
        return _run(nets, x, y, alpha, x_test, y_test, loss, float(loss_beta), rule, float(tau), float(max_time),
                    float(max_wall), max_steps, int(kernel_every), kernel_points, checkpoint, float(checkpoint_every),
                    resume, progress, float(t1_fraction), float(grow_factor), float(checkpoint_rate),
                    int(checkpoint_spacing), int(max_rejections), use_cuda_graph)


def _run(nets, x, y, alpha, x_test, y_test, loss, loss_beta, rule, tau, max_time, max_wall, max_steps,
         kernel_every, kernel_points, checkpoint, checkpoint_every, resume, progress, t1_fraction, grow_factor,
         ckpt_rate, ckpt_spacing, max_rejections, use_graph) -> FlowResult:
    wall0 = time.perf_counter()
    eng = _Engine(nets, x, y, alpha, loss, loss_beta, tau, use_graph)
    K = eng.K
    config = dict(alpha=alpha, loss=loss, loss_beta=loss_beta, max_dgrad=rule.max_dgrad, max_dout=rule.max_dout,
                  tau=tau, K=K, n=eng.n, d=eng.d, h=eng.h, L=eng.L, P=eng.P, dtype=str(eng.dtype),
                  alpha_code=alpha * math.sqrt(eng.h), data=_digest(x, y))
    # per-net host state
    S: Dict[str, Any]
    if resume is not None:
        blob = load_checkpoint(resume, "train(resume=...)", ("version", "config", "engine", "host", "history"))
        if blob.get("version") != _CKPT_VERSION:
            raise ValueError(f"train: {resume} is not a flow checkpoint of version {_CKPT_VERSION}")
        for key in ("alpha", "loss", "loss_beta", "tau", "K", "n", "d", "h", "L", "P", "dtype", "data"):
            if blob["config"][key] != config[key]:
                raise ValueError(f"train: resume={resume} was written with {key}={blob['config'][key]!r}, "
                                 f"but this call has {key}={config[key]!r}")
        eng.load_state(blob["engine"])
        S = blob["host"]
        history: List[Dict[str, Any]] = [r for r in blob["history"] if r["event"] != "final"]
        ens_track = _EnsembleTrack.from_state(blob.get("ensemble"), K, eng.device)
        for k in range(K):
            if S["status"][k] in _RESUMABLE:
                S["status"][k] = "running"
        ens_track.resumed([k for k in range(K) if S["status"][k] == "running"])
        wall_before = blob["wall"]
    else:
        rep = eng.init_state()
        S = dict(t=[0.0] * K, dt=[1.0] * K, step=[0] * K, attempts=[0] * K, rejections=[0] * K,
                 gsq=rep[:, 0].tolist(), loss=rep[:, 3].tolist(), nd=rep[:, 4].astype(int).tolist(),
                 msq=rep[:, 5].tolist(),
                 l0=(rep[:, 3] * alpha * alpha).tolist(), next_ckpt=[0] * K, n_ckpt=[0] * K,
                 last_dt=[0.0] * K, last_dgrad=[0.0] * K, last_dout=[0.0] * K,
                 t1=[math.nan] * K, t_grow=[math.nan] * K, status=["running"] * K)
        for k in range(K):
            if not (np.isfinite(rep[k, 3]) and np.isfinite(rep[k, 0])):
                S["status"][k] = "nonfinite"
        history = []
        wall_before = 0.0

    # kernel-change subset and Theta_0 per net
    xk = None
    if isinstance(kernel_points, torch.Tensor):
        if kernel_points.dim() != 2 or kernel_points.shape[1] != eng.d or not torch.isfinite(kernel_points).all():
            raise ValueError(f"train: kernel_points must be a finite (m, {eng.d}) tensor, "
                             f"got shape {tuple(kernel_points.shape)}")
        xk = kernel_points.to(dtype=x.dtype, device=x.device).contiguous()
    elif kernel_points:
        src = x_test if x_test is not None else x
        xk = src[:int(kernel_points)]
    theta0 = None
    if xk is not None:
        w0v = eng._layer_views(eng.w0)
        theta0 = [obs.gram_from_features(*obs.fc_features([v[k] for v in w0v], xk, eng.sigma, eng.dsigma))
                  for k in range(K)]
    if resume is None:
        ens_track = _EnsembleTrack(K)
    rms_f0 = obs.rms(eng.f0).cpu().numpy()
    f0_test = eng.forward(eng._layer_views(eng.w0, squeeze=True), x_test / math.sqrt(eng.d))[0] if x_test is not None else None

    def kernel_change(k: int) -> float:
        th = obs.gram_from_features(*obs.fc_features(eng.net_weights(k), xk, eng.sigma, eng.dsigma))
        return obs.kernel_change(th, theta0[k])

    def record(k: int, event: str, scheduled: bool = False) -> None:
        k = int(k)
        b = eng.base
        F = eng.F[b, k]
        Ws = eng.net_weights(k)
        W0 = [v[k] for v in eng._layer_views(eng.w0)]
        dw = [float(torch.linalg.norm((w - w0).double())) for w, w0 in zip(Ws, W0)]
        rec = dict(net=k, event=event, step=S["step"][k], attempts=S["attempts"][k], t=S["t"][k],
                   t_code_over_h=S["t"][k] / (math.sqrt(eng.h) * alpha), dt=S["last_dt"][k], next_dt=S["dt"][k],
                   dgrad=S["last_dgrad"][k], dout=S["last_dout"][k], wall=wall_before + time.perf_counter() - wall0,
                   train_loss=S["loss"][k], train_mean_l=S["loss"][k] * alpha * alpha,
                   train_err=float(obs.error(F, y)), train_nd=S["nd"][k], train_rms_F=float(obs.rms(F)),
                   grad_norm=math.sqrt(S["gsq"][k]), dw=dw, dw_total=math.sqrt(sum(v * v for v in dw)),
                   w0_norm=float(torch.linalg.norm(eng.w0[k].double())))
        if x_test is not None:
            Ft = alpha * (eng.forward(Ws if K > 1 else eng.views[b], x_test / math.sqrt(eng.d))[0][0] - f0_test[k])
            rec.update(test_loss=float(loss_value(loss, Ft.double(), y_test.double(), loss_beta).mean()) / alpha ** 2,
                       test_err=float(obs.error(Ft, y_test)), test_nd=int(obs.under_margin(Ft, y_test)),
                       test_rms_F=float(obs.rms(Ft)))
            if K > 1:
                ens_track.add(k, S["step"][k], S["t"][k], Ft, scheduled)
        want_kernel = event in ("final",) or (kernel_every > 0 and S["n_ckpt"][k] % kernel_every == 0)
        if theta0 is not None and want_kernel:
            rec["kernel_change"] = kernel_change(k)
        history.append(rec)

    def save_ckpt() -> None:
        if checkpoint is None:
            return
        blob = dict(version=_CKPT_VERSION, config=config, engine=eng.state(), host=copy.deepcopy(S),
                    history=list(history), wall=wall_before + time.perf_counter() - wall0,
                    ensemble=ens_track.state())
        atomic_save(blob, checkpoint)

    # initial checkpoint record (step 0)
    if resume is None:
        for k in range(K):
            if S["status"][k] == "running":
                record(k, "checkpoint", scheduled=True)
                S["n_ckpt"][k] += 1
                S["next_ckpt"][k] = obs.next_checkpoint(0, ckpt_rate, ckpt_spacing)
                if is_margin(loss) and S["nd"][k] == 0:
                    S["status"][k] = "converged"

    def limit_status(k: int) -> Optional[str]:
        if S["t"][k] >= max_time:
            return "max_time"
        if max_steps is not None and S["step"][k] >= max_steps:
            return "max_steps"
        return None

    for k in range(K):
        if S["status"][k] == "running" and limit_status(k):
            S["status"][k] = limit_status(k)

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(desc=f"flow K={K} alpha={alpha:g}", unit="step", dynamic_ncols=True)
    last_save = last_bar = time.perf_counter()
    try:
        while True:
            active = np.array([s == "running" for s in S["status"]])
            if not active.any():
                break
            if time.perf_counter() - wall0 >= max_wall:
                for k in np.nonzero(active)[0]:
                    S["status"][k] = "max_wall"
                break
            dts = np.where(active, np.array(S["dt"]), 0.0)
            rep = eng.attempt(dts)
            accepted = np.zeros(K, dtype=bool)
            for k in np.nonzero(active)[0]:
                gpsq, diffsq, dout, lossv, nd, msq = rep[k]
                dgrad = dgrad_from_norms(S["gsq"][k], gpsq, diffsq) if np.isfinite(gpsq + diffsq) else math.nan
                S["attempts"][k] += 1
                ok, new_dt = rule.decide(dgrad, dout, S["dt"][k])
                if ok:
                    accepted[k] = True
                    S["t"][k] += S["dt"][k]
                    S["step"][k] += 1
                    S["last_dt"][k], S["last_dgrad"][k], S["last_dout"][k] = S["dt"][k], dgrad, float(dout)
                    S["gsq"][k], S["loss"][k], S["nd"][k] = float(gpsq), float(lossv), int(nd)
                    S["msq"][k] = float(msq)
                    S["rejections"][k] = 0
                else:
                    S["rejections"][k] += 1
                S["dt"][k] = new_dt
                if not ok and S["rejections"][k] >= max_rejections:
                    finite = np.isfinite(rep[k]).all()
                    S["status"][k] = "stalled" if finite else "nonfinite"
                    ens_track.stop(k)
            eng.commit(accepted, active)
            for k in np.nonzero(accepted)[0]:
                t = S["t"][k]
                if math.isnan(S["t1"][k]) and S["loss"][k] * alpha * alpha <= t1_fraction * S["l0"][k]:
                    S["t1"][k] = t
                if math.isnan(S["t_grow"][k]):
                    rf = math.sqrt(S["msq"][k]) / alpha
                    if rf >= grow_factor * rms_f0[k]:
                        S["t_grow"][k] = t
                stop = "converged" if (is_margin(loss) and S["nd"][k] == 0) else limit_status(k)
                if S["step"][k] >= S["next_ckpt"][k] or stop is not None:
                    on_schedule = S["step"][k] >= S["next_ckpt"][k]
                    if on_schedule:
                        S["next_ckpt"][k] = obs.next_checkpoint(S["step"][k], ckpt_rate, ckpt_spacing)
                    record(k, "converged" if stop == "converged" else "checkpoint", scheduled=on_schedule)
                    S["n_ckpt"][k] += 1
                if stop is not None:
                    S["status"][k] = stop
                    ens_track.stop(k)
            if K > 1 and x_test is not None:
                ens_track.flush(y_test, wall_before + time.perf_counter() - wall0)
            now = time.perf_counter()
            if bar is not None:
                bar.update(int(accepted[0]) if K == 1 else int(accepted.sum()))
                if now - last_bar > 0.5:
                    k0 = int(np.argmax(active)) if active.any() else 0
                    bar.set_postfix(t=f"{S['t'][k0]:.3g}", dt=f"{S['dt'][k0]:.2g}", nd=S["nd"][k0],
                                    loss=f"{S['loss'][k0] * alpha * alpha:.3g}", running=int(active.sum()))
                    last_bar = now
            if checkpoint is not None and now - last_save >= checkpoint_every:
                save_ckpt()
                last_save = now
    finally:
        if bar is not None:
            bar.close()

    for k in range(K):
        record(k, "final")
    if K > 1 and x_test is not None:
        ens_track.flush(y_test, wall_before + time.perf_counter() - wall0, at_end=True)
    save_ckpt()
    # outputs and final summaries
    outputs = {"train": eng.F[eng.base].clone(), "f0_train": eng.f0.clone()}
    Ft = None
    if x_test is not None:
        ft = eng.forward(eng.views[eng.base], x_test / math.sqrt(eng.d))[0]
        Ft = alpha * (ft - f0_test)
        outputs.update(test=Ft, f0_test=f0_test)
    finals = []
    for k in range(K):
        last = [r for r in history if r["net"] == k][-1]
        fin = {kk: v for kk, v in last.items() if kk not in ("event",)}
        fin.update(status=S["status"][k], t1=S["t1"][k], t_grow=S["t_grow"][k], t1_over_h_code=S["t1"][k] /
                   (math.sqrt(eng.h) * alpha), weight_change=math.sqrt(eng.h) * last["dw_total"] / last["w0_norm"])
        finals.append(fin)
    ens = obs.ensemble_stats(Ft, y_test) if (Ft is not None and K > 1) else None
    out_nets = []
    for k, m in enumerate(nets):
        mk = copy.deepcopy(m)
        for p, w in zip(mk.weights, eng.net_weights(k)):
            p.data.copy_(w)
        out_nets.append(mk)
    statuses = list(S["status"])
    return FlowResult(overall_status(statuses), statuses, history, out_nets, finals, ens, outputs, config,
                      list(ens_track.records))

