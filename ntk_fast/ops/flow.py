"""The gradient-flow ops ``ntk_fast::flow_step``, ``flow_grad_stats``, ``flow_loss``, ``softplus_act``:
checks, fakes, fallback to :mod:`ntk_fast.ops.reference` (per op, see :mod:`ntk_fast.ops._loader`).

Shapes: K nets stored row-wise in (K, P) buffers, n training points.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ntk_fast.dynamics.losses import check_loss
from ntk_fast.ops import reference as ref
from ntk_fast.ops._loader import register_fake, use_reference
from ntk_fast.ops.checks import check_float_2d, check_like
from ntk_fast.ops.selfcheck import native_on


@register_fake("flow_step")
def _flow_step_fake(w, g, v, dt, tau, w_out, v_out):
    return None


@register_fake("flow_grad_stats")
def _flow_grad_stats_fake(g, gp):
    return g.new_empty((g.shape[0], 2), dtype=torch.float64)


@register_fake("flow_loss")
def _flow_loss_fake(f, f0, y, F_prev, alpha, beta, loss):
    K = f.shape[0]
    return (torch.empty_like(f), torch.empty_like(f), f.new_empty((K,)), f.new_empty((K,), dtype=torch.long),
            f.new_empty((K,)))


@register_fake("softplus_act")
def _softplus_act_fake(z, s, beta, c):
    return None


def flow_step(w: torch.Tensor, g: torch.Tensor, dt: torch.Tensor, tau: float = 0.0,
              v: Optional[torch.Tensor] = None, w_out: Optional[torch.Tensor] = None,
              v_out: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Trial weights of K nets (w, g: (K, P); dt: (K,)), written into ``w_out`` (and ``v_out`` when tau > 0).

    tau == 0: w_out = w - dt g.  tau > 0: v_out = x v - (1-x) g, w_out = w + dt v_out, x = exp(-dt/tau).
    Returns (w_out, v_out).  One pass over the buffers; no host synchronisation.
    """
    op = "flow_step"
    check_float_2d(w, "w", op)
    check_like(g, "g", w, op)
    if not (tau >= 0.0):
        raise ValueError(f"{op}: tau must be >= 0, got {tau}")
    if not isinstance(dt, torch.Tensor) or dt.shape != (w.shape[0],) or dt.dtype != w.dtype or dt.device != w.device:
        raise ValueError(f"{op}: dt must be a {w.dtype} tensor of shape ({w.shape[0]},) on {w.device}")
    if w_out is None:
        w_out = torch.empty_like(w)
    check_like(w_out, "w_out", w, op)
    if tau > 0:
        if v is None:
            raise ValueError(f"{op}: tau > 0 needs the velocity v")
        check_like(v, "v", w, op)
        if v_out is None:
            v_out = torch.empty_like(w)
        check_like(v_out, "v_out", w, op)
    empty = w.new_empty((0,))
    if not native_on(op, w.device):
        use_reference(op)
        ref.flow_step(w, g, v, dt, tau, w_out, v_out)
    else:
        torch.ops.ntk_fast.flow_step(w, g, v if tau > 0 else empty, dt.contiguous(), float(tau), w_out,
                                     v_out if tau > 0 else empty)
    return w_out, v_out


def flow_grad_stats(g: torch.Tensor, gp: torch.Tensor) -> torch.Tensor:
    """(K, 2) float64 [|g'|^2, |g - g'|^2] per net, for g, g' of shape (K, P).  Bitwise reproducible."""
    op = "flow_grad_stats"
    check_float_2d(g, "g", op)
    check_like(gp, "gp", g, op)
    if not native_on(op, g.device):
        use_reference(op)
        return ref.flow_grad_stats(g, gp)
    return torch.ops.ntk_fast.flow_grad_stats(g, gp)


def flow_loss(f: torch.Tensor, f0: torch.Tensor, y: torch.Tensor, F_prev: torch.Tensor, alpha: float,
              beta: float = 20.0, loss: str = "softhinge"):
    """(F, r, loss, nd, dout) of K nets on n points; see :func:`ntk_fast.ops.reference.flow_loss`.

    y: labels in {-1, +1} for the margin losses, real targets for mse (checked by the callers).
    """
    op = "flow_loss"
    check_float_2d(f, "f", op)
    check_like(f0, "f0", f, op)
    check_like(F_prev, "F_prev", f, op)
    if not isinstance(y, torch.Tensor) or y.shape != (f.shape[1],) or y.dtype != f.dtype or y.device != f.device:
        raise ValueError(f"{op}: y must be a {f.dtype} tensor of shape ({f.shape[1]},) on {f.device}")
    if f.shape[1] == 0:
        raise ValueError(f"{op}: needs at least one point")
    if not alpha > 0:
        raise ValueError(f"{op}: alpha must be > 0, got {alpha}")
    check_loss(loss, op)
    if not native_on(op, f.device):
        use_reference(op)
        return ref.flow_loss(f, f0, y.contiguous(), F_prev, float(alpha), float(beta), loss)
    return torch.ops.ntk_fast.flow_loss(f, f0, y.contiguous(), F_prev, float(alpha), float(beta), loss)


def softplus_act(z: torch.Tensor, s: Optional[torch.Tensor], beta: float, c: float) -> None:
    """In place, with x = beta z:  z <- (c / beta) softplus(x),  s <- c sigmoid(x) when s is not None.

    The trainer's hidden-layer activation a = sigma(z)/sqrt(h) and s = sigma'(z)/sqrt(h) for
    sigma(z) = c0 softplus(beta z)/beta (c = c0/sqrt(h)) in one pass over z: one exp and one log1p per element,
    no overflow for large z.  z (and s): contiguous float32/float64 tensors of one shape, dtype and device.
    """
    op = "softplus_act"
    if not isinstance(z, torch.Tensor) or z.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{op}: z must be a float32 or float64 tensor")
    if not z.is_contiguous():
        raise ValueError(f"{op}: z must be contiguous")
    if not beta > 0:
        raise ValueError(f"{op}: beta must be > 0, got {beta}")
    if s is not None:
        check_like(s, "s", z, op)
    if not native_on(op, z.device):
        use_reference(op)
        ref.softplus_act(z, s, float(beta), float(c))
    else:
        torch.ops.ntk_fast.softplus_act(z, s if s is not None else z.new_empty((0,)), float(beta), float(c))
