"""Python entry points of the gradient-flow ops: input checks, fake (meta) kernels, reference fallback.

The only place that calls ``torch.ops.ntk_fast.flow_*``.  When the compiled extension is missing the
functions fall back to :mod:`ntk_fast.ops.reference_flow` with a one-time warning.
"""
from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch

from ntk_fast.ops import reference_flow as ref

try:  # loading the library runs the static op registrations
    from ntk_fast import _C
    _HAVE_EXT = hasattr(torch.ops.ntk_fast, "flow_step")
except ImportError:  # pragma: no cover - depends on the build
    _HAVE_EXT = False
# softplus_act came later than the other flow ops: a stale build without it uses the reference
_HAVE_ACT = _HAVE_EXT and hasattr(torch.ops.ntk_fast, "softplus_act")

_warned = False


def have_extension() -> bool:
    return _HAVE_EXT


def _fallback() -> bool:
    global _warned
    if _HAVE_EXT:
        return False
    if not _warned:
        warnings.warn("ntk_fast: compiled flow ops not found; using the slow pure-torch reference "
                      "(build with `python setup.py build_ext --inplace`)", RuntimeWarning, stacklevel=3)
        _warned = True
    return True


if _HAVE_EXT:
    @torch.library.register_fake("ntk_fast::flow_step")
    def _flow_step_fake(w, g, v, dt, tau, w_out, v_out):
        return None

    @torch.library.register_fake("ntk_fast::flow_grad_stats")
    def _flow_grad_stats_fake(g, gp):
        return g.new_empty((g.shape[0], 2), dtype=torch.float64)

    @torch.library.register_fake("ntk_fast::flow_loss")
    def _flow_loss_fake(f, f0, y, F_prev, alpha, beta, kind):
        K = f.shape[0]
        return (torch.empty_like(f), torch.empty_like(f), f.new_empty((K,)), f.new_empty((K,), dtype=torch.long),
                f.new_empty((K,)))

    if _HAVE_ACT:
        @torch.library.register_fake("ntk_fast::softplus_act")
        def _softplus_act_fake(z, s, beta, c):
            return None


def _check_2d(t: torch.Tensor, name: str, like: torch.Tensor, op: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.shape != like.shape or t.dtype != like.dtype or t.device != like.device:
        raise ValueError(f"{op}: {name} must be {like.dtype} of shape {tuple(like.shape)} on {like.device}, "
                         f"got {t.dtype} of shape {tuple(t.shape)} on {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous")


def _check_base(t: torch.Tensor, name: str, op: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        raise ValueError(f"{op}: {name} must be a 2-D tensor (nets x entries), got "
                         f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if t.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{op}: {name} must be float32 or float64, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous")


def flow_step(w: torch.Tensor, g: torch.Tensor, dt: torch.Tensor, tau: float = 0.0,
              v: Optional[torch.Tensor] = None, w_out: Optional[torch.Tensor] = None,
              v_out: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Trial weights of K nets (w, g: (K, P); dt: (K,)), written into ``w_out`` (and ``v_out`` when tau > 0).

    tau == 0: w_out = w - dt g.  tau > 0: v_out = x v - (1-x) g, w_out = w + dt v_out, x = exp(-dt/tau).
    Returns (w_out, v_out).  One pass over the buffers; no host synchronisation.
    """
    op = "flow_step"
    _check_base(w, "w", op)
    _check_2d(g, "g", w, op)
    if not (tau >= 0.0):
        raise ValueError(f"{op}: tau must be >= 0, got {tau}")
    if not isinstance(dt, torch.Tensor) or dt.shape != (w.shape[0],) or dt.dtype != w.dtype or dt.device != w.device:
        raise ValueError(f"{op}: dt must be a {w.dtype} tensor of shape ({w.shape[0]},) on {w.device}")
    if w_out is None:
        w_out = torch.empty_like(w)
    _check_2d(w_out, "w_out", w, op)
    if tau > 0:
        if v is None:
            raise ValueError(f"{op}: tau > 0 needs the velocity v")
        _check_2d(v, "v", w, op)
        if v_out is None:
            v_out = torch.empty_like(w)
        _check_2d(v_out, "v_out", w, op)
    empty = w.new_empty((0,))
    if _fallback():
        ref.flow_step(w, g, v, dt, tau, w_out, v_out)
    else:
        torch.ops.ntk_fast.flow_step(w, g, v if tau > 0 else empty, dt.contiguous(), float(tau), w_out,
                                     v_out if tau > 0 else empty)
    return w_out, v_out


def flow_grad_stats(g: torch.Tensor, gp: torch.Tensor) -> torch.Tensor:
    """(K, 2) float64 [|g'|^2, |g - g'|^2] per net, for g, g' of shape (K, P).  Bitwise reproducible."""
    op = "flow_grad_stats"
    _check_base(g, "g", op)
    _check_2d(gp, "gp", g, op)
    if _fallback():
        return ref.flow_grad_stats(g, gp)
    return torch.ops.ntk_fast.flow_grad_stats(g, gp)


def flow_loss(f: torch.Tensor, f0: torch.Tensor, y: torch.Tensor, F_prev: torch.Tensor, alpha: float,
              beta: float = 20.0, loss: str = "softhinge"):
    """(F, r, loss, nd, dout) of K nets on n points; see :func:`ntk_fast.ops.reference_flow.flow_loss`."""
    op = "flow_loss"
    _check_base(f, "f", op)
    _check_2d(f0, "f0", f, op)
    _check_2d(F_prev, "F_prev", f, op)
    if not isinstance(y, torch.Tensor) or y.shape != (f.shape[1],) or y.dtype != f.dtype or y.device != f.device:
        raise ValueError(f"{op}: y must be a {f.dtype} tensor of shape ({f.shape[1]},) on {f.device}")
    if f.shape[1] == 0:
        raise ValueError(f"{op}: needs at least one point")
    if not alpha > 0:
        raise ValueError(f"{op}: alpha must be > 0, got {alpha}")
    if loss not in ref.LOSS_KINDS:
        raise ValueError(f"{op}: loss must be one of {tuple(ref.LOSS_KINDS)}, got {loss!r}")
    kind = ref.LOSS_KINDS[loss]
    if _fallback():
        return ref.flow_loss(f, f0, y.contiguous(), F_prev, float(alpha), float(beta), kind)
    return torch.ops.ntk_fast.flow_loss(f, f0, y.contiguous(), F_prev, float(alpha), float(beta), kind)


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
        _check_2d(s, "s", z, op)
    if _fallback() or not _HAVE_ACT:
        ref.softplus_act(z, s, float(beta), float(c))
    else:
        torch.ops.ntk_fast.softplus_act(z, s if s is not None else z.new_empty((0,)), float(beta), float(c))
