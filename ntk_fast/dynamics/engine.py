"""The trainer's engine: buffers of K nets and one attempt of the adaptive step (no host bookkeeping).

Implementation (cost per attempt: one forward, 2 n P flops, and one backward, ~4 n P flops, as BLAS matmuls,
plus three memory passes):
  * the weights of K nets live in a flat (K, P) buffer with per-layer (K, out, in) views; there are two such
    buffers (base and trial) for the weights, the gradients and the velocity;
  * ``ntk_fast::flow_step`` writes the trial weights into the trial buffer in one pass; the forward pass and the
    backward pass (:func:`ntk_fast.models.fc.fc_forward` / :func:`~ntk_fast.models.fc.fc_backward`, seeded by
    the per-point vector r = dL/df of ``ntk_fast::flow_loss``) write the trial gradient straight into the trial
    gradient buffer (matmul out=); ``ntk_fast::flow_grad_stats`` gives |g'|^2, |g - g'|^2;
  * each hidden softplus layer is one ``ntk_fast::softplus_act`` pass over the matmul output
    (:func:`ntk_fast.models.fc.fc_activation` with fused=True);
  * accepting swaps the roles of the two buffers, rejecting does nothing (no copies of the state); in an
    ensemble where some nets accept and others reject, only the minority's rows are copied;
  * on CUDA the attempt (step, forward, loss, backward, statistics) issues no host synchronisation and is
    captured in two CUDA graphs (one per buffer parity); the only sync per attempt is reading the small
    (K, 6) report (:class:`AttemptStats` per row) for the accept/reject decision.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

import numpy as np
import torch

from ntk_fast.ops import flow as ops
from ntk_fast.models.fc import FCNet, fc_activation, fc_backward, fc_forward


class AttemptStats(NamedTuple):
    """One row of the engine's (K, 6) float64 report of an attempt (one net)."""
    gp_sq: float        # |g'|^2, the trial's squared gradient norm
    diff_sq: float      # |g - g'|^2
    dout: float         # max_i |F'(x_i) - F(x_i)|
    loss: float         # L(w') = 1/(alpha^2 n) sum_i l(y_i F'(x_i))
    n_under: float      # number of training points with y F' < 1
    mean_sq: float      # mean_i F'(x_i)^2


class FlowEngine:
    """Buffers and one attempt of the step rule for K nets sharing an architecture (see the module docstring)."""

    def __init__(self, nets: List[FCNet], x: torch.Tensor, y: torch.Tensor, alpha: float, loss: str,
                 loss_beta: float, tau: float, use_graph: bool):
        a = nets[0]
        self.K, self.d, self.h, self.L = len(nets), a.d, a.h, a.L
        self.act_plain = fc_activation(a.activation, a.beta, a.h)
        self.act = fc_activation(a.activation, a.beta, a.h, fused=True)
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
        self.report = torch.zeros(2, K, len(AttemptStats._fields), dtype=torch.float64, device=self.device)
        self.dt = torch.zeros(K, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            for k, m in enumerate(nets):
                self.w[0, k].copy_(torch.cat([p.detach().reshape(-1) for p in m.weights]))
        self.w0 = self.w[0].clone()
        self.views = [self.layer_views(self.w[p], squeeze=True) for p in (0, 1)]
        self.gviews = [self.layer_views(self.g[p], squeeze=True) for p in (0, 1)]
        self.base = 0
        self.f0 = self.forward(self.views[0], self.a0)               # (K, n): F = alpha (f - f0) = 0 at t = 0
        self.use_graph = use_graph and self.device.type == "cuda"
        self.graphs: Dict[int, Any] = {}
        self._dt_host = torch.zeros(K, dtype=self.dtype, pin_memory=self.use_graph)

    def layer_views(self, flat: torch.Tensor, squeeze: bool = False) -> List[torch.Tensor]:
        """Per-layer (K, out, in) views of a flat (K, P) buffer; (out, in) with squeeze=True and K = 1
        (plain mm instead of bmm)."""
        vs = [flat[:, o:o + s].view(flat.shape[0], *sh) for o, s, sh in zip(self.offsets[:-1], self.sizes, self.shapes)]
        return [v[0] for v in vs] if squeeze and flat.shape[0] == 1 else vs

    def net_weights(self, k: int, parity: Optional[int] = None) -> List[torch.Tensor]:
        """The (out, in) weights of net k in the base (or the given) buffer."""
        p = self.base if parity is None else parity
        return [v[k] for v in self.layer_views(self.w[p])]

    def initial_weights(self, k: int) -> List[torch.Tensor]:
        return [v[k] for v in self.layer_views(self.w0)]

    def forward(self, Ws: Sequence[torch.Tensor], a0: torch.Tensor, keep: bool = False, fused: bool = True):
        """f (K, n) of the nets (Ws: (K, out, in) or, for K = 1, (out, in)); with keep=True, (f, acts, ss) for
        :meth:`backward`."""
        out, acts, ss = fc_forward(Ws, a0, self.act if fused else self.act_plain, keep)
        f = out[..., 0]
        f = f if f.dim() == 2 else f.unsqueeze(0)
        return (f, acts, ss) if keep else f

    def backward(self, Ws, G, acts, ss, r: torch.Tensor) -> None:
        """G[l] <- dL/dW(l) with r = dL/df (K, n) (:func:`ntk_fast.models.fc.fc_backward`)."""
        fc_backward(Ws, acts, ss, r if Ws[0].dim() == 3 else r[0], G)

    def _attempt_ops(self, pb: int, pt: int) -> None:
        """Trial from buffers pb into buffers pt; fills report[pt].  No host synchronisation."""
        ops.flow_step(self.w[pb], self.g[pb], self.dt, self.tau, None if self.v is None else self.v[pb],
                      self.w[pt], None if self.v is None else self.v[pt])
        Ws = self.views[pt]
        f, acts, ss = self.forward(Ws, self.a0, keep=True)
        F, r, loss, nd, dout = ops.flow_loss(f, self.f0, self.y, self.F[pb], self.alpha, self.loss_beta, self.loss)
        self.backward(Ws, self.gviews[pt], acts, ss, r)
        st = ops.flow_grad_stats(self.g[pb], self.g[pt])
        self.F[pt].copy_(F)
        rep = self.report[pt]
        rep[:, 0:2].copy_(st)
        rep[:, 2].copy_(dout)
        rep[:, 3].copy_(loss)
        rep[:, 4].copy_(nd)
        rep[:, 5].copy_(F.double().pow(2).mean(1))

    def init_state(self) -> np.ndarray:
        """Gradient, loss and |g|^2 at the initial weights (base buffers); returns the (K, 6) report (gp_sq is
        |g|^2 of the initial state)."""
        pb = self.base
        f, acts, ss = self.forward(self.views[pb], self.a0, keep=True)
        F, r, loss, nd, dout = ops.flow_loss(f, self.f0, self.y, self.F[pb], self.alpha, self.loss_beta, self.loss)
        self.backward(self.views[pb], self.gviews[pb], acts, ss, r)
        self.F[pb].copy_(F)
        st = ops.flow_grad_stats(self.g[pb], self.g[pb])
        rep = torch.stack([st[:, 0], st[:, 1], dout.double(), loss.double(), nd.double(),
                           F.double().pow(2).mean(1)], 1)
        return rep.cpu().numpy()

    def attempt(self, dts: np.ndarray) -> np.ndarray:
        """One trial step with per-net dt (0 freezes a net); returns the (K, 6) report on the host."""
        pb, pt = self.base, 1 - self.base
        if self.use_graph:
            # Under the engine's device: replay launches on the current device's current stream, and the
            # nets may live on cuda:1 while cuda:0 is current.
            with torch.cuda.device(self.device):
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
        which writes into the trial buffers (scratch at this point); capturing does not execute.

        Everything is tied to the engine's device: the current device is set to it and the warm-up and
        capture streams are streams of it (``torch.cuda.graph``'s default capture stream is created once per
        process on whichever device was current then, so it is not used).  Otherwise, with the nets on
        cuda:1 (or after training on cuda:0), the ops, which guard to their tensors' device, would run
        eagerly during "capture" and overwrite the base buffers, and the graphs would be empty."""
        pb, pt = self.base, 1 - self.base
        dev = self.device
        with torch.cuda.device(dev):
            s = torch.cuda.Stream(dev)
            s.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(s):
                self._attempt_ops(pb, pt)
            torch.cuda.current_stream(dev).wait_stream(s)
            capture_stream = torch.cuda.Stream(dev)
            pool = None
            for p_t in (pt, pb):
                gr = torch.cuda.CUDAGraph()
                with torch.cuda.graph(gr, pool=pool, stream=capture_stream):
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

    def state(self) -> Dict[str, torch.Tensor]:
        """The tensors of a checkpoint (base parity only), on the CPU."""
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
