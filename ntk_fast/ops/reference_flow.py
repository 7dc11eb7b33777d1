"""Pure-torch references of the gradient-flow ops (simple, float64-safe, slow).

They define what the extension kernels in ``csrc/flow/`` compute; the tests compare the two.
Shapes: K nets, P parameters per net, n training points.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ntk_fast.dynamics.losses import get_loss

LOSS_KINDS = {"softhinge": 0, "qhinge": 1}


def flow_step(w: torch.Tensor, g: torch.Tensor, v: Optional[torch.Tensor], dt: torch.Tensor, tau: float,
              w_out: torch.Tensor, v_out: Optional[torch.Tensor]) -> None:
    """Trial weights of K nets, in place into ``w_out`` (and ``v_out``).

    tau == 0:  w_out = w - dt g                                   (explicit Euler on dw/dt = -g)
    tau  > 0:  x = exp(-dt/tau); v_out = x v - (1-x) g; w_out = w + dt v_out   (continuous momentum)
    w, g, v, w_out, v_out: (K, P); dt: (K,), one step per net.  Cost: one pass, 3P (5P) memory accesses per net.
    """
    h = dt[:, None]
    if tau > 0:
        x = torch.exp(-h / tau)
        v_out.copy_(x * v - (1 - x) * g)
        w_out.copy_(w + h * v_out)
    else:
        w_out.copy_(w - h * g)


def flow_grad_stats(g: torch.Tensor, gp: torch.Tensor) -> torch.Tensor:
    """(K, 2) float64: [|g'|^2, |g - g'|^2] per net (g, g': (K, P)).  dgrad = |g-g'|^2 / (|g| |g'|)."""
    g64, gp64 = g.double(), gp.double()
    return torch.stack([(gp64 * gp64).sum(1), ((g64 - gp64) ** 2).sum(1)], dim=1)


def flow_loss(f: torch.Tensor, f0: torch.Tensor, y: torch.Tensor, F_prev: torch.Tensor, alpha: float,
              beta: float, kind: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss side of a step for K nets on n points: returns (F, r, loss, nd, dout).

        F    = alpha (f - f0)                              (K, n)   the alpha-scaled model
        u    = y F
        loss = 1/(alpha^2 n) sum_i l(u_i)                   (K,)
        r_i  = dL/df_i = l'(u_i) y_i / (alpha n)            (K, n)   seed of the backward pass
        nd   = #{i: u_i < 1}                                (K,) int64, points under the margin
        dout = max_i |F_i - F_prev_i|                       (K,)     NaN when some F_i is not finite
    with l the soft hinge (kind 0, beta_l = beta) or the quadratic hinge (kind 1).
    """
    name = {v: k for k, v in LOSS_KINDS.items()}[kind]
    l, lp = get_loss(name)
    n = f.shape[1]
    F = alpha * (f - f0)
    u = y * F
    loss = l(u, beta).sum(1) / (alpha * alpha * n)
    r = lp(u, beta) * y / (alpha * n)
    nd = (u < 1).sum(1)
    dout = (F - F_prev).abs().amax(1)
    bad = ~torch.isfinite(F).all(1)
    nan = torch.full_like(dout, math.nan)
    return F, r, torch.where(bad, nan, loss), nd, torch.where(bad, nan, dout)


def softplus_act(z: torch.Tensor, s: Optional[torch.Tensor], beta: float, c: float) -> None:
    """The trainer's activation, in place: with x = beta z,

        z <- (c / beta) softplus(x) = (c / beta) log(1 + e^x)      s <- c sigmoid(x)   (when s is given)

    softplus via logaddexp(x, 0), so no overflow for large x.  z, s: same shape.  Cost: one pass.
    """
    x = beta * z
    if s is not None:
        s.copy_(torch.sigmoid(x).mul_(c))
    z.copy_(torch.logaddexp(x, torch.zeros((), dtype=x.dtype, device=x.device)).mul_(c / beta))
