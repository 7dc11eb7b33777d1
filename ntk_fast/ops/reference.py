"""Pure-torch references (simple, slow, float64-safe) of every extension op, and of the NTK paths.

They define what the kernels under ``csrc/`` compute; the tests compare the two, and each op family's
wrapper (``ntk_fast/ops/<family>.py``) falls back to them when its compiled op is unavailable.

* ``gram_reference``: the op ``ntk_fast::gram`` written as per-layer matmuls and Hadamard products,

      out = sum_l s_l (D1_l D2_l^T) o (A1_l A2_l^T)            (n1 x n2)

  It materialises two n1 x n2 matrices per layer; cost 2 n1 n2 sum_l (fan_in_l + fan_out_l) flops.
* ``gram_full_reference``: the op ``ntk_fast::gram_full`` by einsums over whole (point, token) Grams,

      out[i, j, c, c'] = sum_l s_l sum_{t, t'} (A1_l[i, t] . A2_l[j, t']) (D1_l[i, c, t] . D2_l[j, c', t'])

  It materialises (n1 T) x (n2 T) and (n1 k T) x (n2 k T) matrices per layer.
* ``jacobian_ntk_reference``: the empirical NTK of any module by full per-sample Jacobians (torch.func)
  and one contraction, Theta[i, j, c, c'] = sum_p J[i, c, p] J[j, c', p].  Memory n k P.
* gradient-flow ops (``flow_step``, ``flow_grad_stats``, ``flow_loss``, ``softplus_act``): K nets, P parameters
  per net, n training points.
* ``kernel_flow_step``: one attempt of the frozen-kernel flow for E problems (rows of the (E, n) state)::

      f'  = f - dt g
      r'  = dl/dF(f', y)
      c'  = c + dt r / n                     c(t) = int_0^t (1/n) dl/dF(F, y) ds,  so that F = -Theta c
      g'  = Theta r' / n
      stats = [|g|^2, |g'|^2, |g - g'|^2, dt max|g|, min(y o f'), mean l(f', y), max|g'|]   (float64, (E, 7))

  Inactive problems are returned unchanged with zero stats.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from ntk_fast.dynamics.losses import loss_grad, loss_value
from ntk_fast.ops.packed import unpack_symmetric


def gram_reference(a1: Sequence[torch.Tensor], d1: Sequence[torch.Tensor],
                   a2: Optional[Sequence[torch.Tensor]] = None, d2: Optional[Sequence[torch.Tensor]] = None,
                   scales: Optional[Sequence[float]] = None) -> torch.Tensor:
    """sum_l scales[l] * (d1[l] @ d2[l].T) * (a1[l] @ a2[l].T); a2/d2 default to a1/d1."""
    a2 = a1 if a2 is None else a2
    d2 = d1 if d2 is None else d2
    scales = [1.0] * len(a1) if scales is None else scales
    out = None
    for s, a, d, b, e in zip(scales, a1, d1, a2, d2):
        term = (d @ e.T) * (a @ b.T) * s
        out = term if out is None else out + term
    return out


def gram_full_reference(a1: Sequence[torch.Tensor], d1: Sequence[torch.Tensor],
                        a2: Optional[Sequence[torch.Tensor]] = None, d2: Optional[Sequence[torch.Tensor]] = None,
                        scales: Optional[Sequence[float]] = None,
                        w: Optional[Sequence[Optional[torch.Tensor]]] = None) -> torch.Tensor:
    """sum_l s_l einsum over tokens of (a1[l] a2[l]^T) and (d1[l] d2[l]^T): (n1, n2, k, k); a2/d2 default to a1/d1.

    a[l] (n, T_l, p_l), d[l] (n, k, T_l, q_l); or, where w[l] (k, q_l) is given, d[l] (n, 1, 1, q_l) = s and
    the signal is D[i, c] = s_i o w_c (made dense here)."""
    a2 = a1 if a2 is None else a2
    d2 = d1 if d2 is None else d2
    if w is not None:
        dense = lambda d, f: d if f is None else d * f[None, :, None, :]      # noqa: E731
        d1 = [dense(d, f) for d, f in zip(d1, w)]
        d2 = [dense(d, f) for d, f in zip(d2, w)]
    scales = [1.0] * len(a1) if scales is None else scales
    out = None
    for s, x1, y1, x2, y2 in zip(scales, a1, d1, a2, d2):
        ga = torch.einsum("itp,jup->itju", x1, x2)
        gd = torch.einsum("ictq,jduq->ictjdu", y1, y2)
        term = s * torch.einsum("itju,ictjdu->ijcd", ga, gd)
        out = term if out is None else out + term
    return out


def _trainable(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}


def per_sample_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """J[i, c, p] = d f_c(x_i) / d w_p over the parameters that require grad: shape (n, k, P)."""
    from torch.func import functional_call, jacrev, vmap

    params = _trainable(model)
    fixed = {k: v for k, v in model.named_parameters() if not v.requires_grad}
    fixed.update(dict(model.named_buffers()))

    def f(p, xi):
        out = functional_call(model, {**p, **fixed}, (xi.unsqueeze(0),))
        return out.reshape(-1)

    jac = vmap(jacrev(f), in_dims=(None, 0))(params, x)          # dict name -> (n, k, *shape)
    n = x.shape[0]
    return torch.cat([j.reshape(n, j.shape[1], -1) for j in jac.values()], dim=2)


def jacobian_ntk_reference(model: nn.Module, x1: torch.Tensor, x2: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Full empirical NTK (n1, n2, k, k) by Jacobian contraction (no blocking)."""
    j1 = per_sample_jacobian(model, x1)
    j2 = j1 if x2 is None else per_sample_jacobian(model, x2)
    return torch.einsum("icp,jdp->ijcd", j1, j2)


# ------------------------------------------------------------------ gradient-flow ops

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
              beta: float, loss: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss side of a step for K nets on n points: returns (F, r, loss, nd, dout).

        F    = alpha (f - f0)                              (K, n)   the alpha-scaled model
        loss = 1/(alpha^2 n) sum_i l(F_i, y_i)              (K,)
        r_i  = dL/df_i = dl/dF(F_i, y_i) / (alpha n)        (K, n)   seed of the backward pass
        nd   = #{i: y_i F_i < 1}                            (K,) int64, points under the margin
        dout = max_i |F_i - F_prev_i|                       (K,)     NaN when some F_i is not finite
    with l one of the losses of :mod:`ntk_fast.dynamics.losses` (beta used by softhinge).
    """
    n = f.shape[1]
    F = alpha * (f - f0)
    value = loss_value(loss, F, y, beta).sum(1) / (alpha * alpha * n)
    r = loss_grad(loss, F, y, beta) / (alpha * n)
    nd = (y * F < 1).sum(1)
    dout = (F - F_prev).abs().amax(1)
    bad = ~torch.isfinite(F).all(1)
    nan = torch.full_like(dout, math.nan)
    return F, r, torch.where(bad, nan, value), nd, torch.where(bad, nan, dout)


def softplus_act(z: torch.Tensor, s: Optional[torch.Tensor], beta: float, c: float) -> None:
    """The trainer's activation, in place: with x = beta z,

        z <- (c / beta) softplus(x) = (c / beta) log(1 + e^x)      s <- c sigmoid(x)   (when s is given)

    softplus via logaddexp(x, 0), so no overflow for large x.  z, s: same shape.  Cost: one pass.
    """
    x = beta * z
    if s is not None:
        s.copy_(torch.sigmoid(x).mul_(c))
    z.copy_(torch.logaddexp(x, torch.zeros((), dtype=x.dtype, device=x.device)).mul_(c / beta))


# ------------------------------------------------------------------ frozen-kernel op

def kernel_flow_step_ref(theta: torch.Tensor, y: torch.Tensor, f: torch.Tensor, g: torch.Tensor, r: torch.Tensor,
                         c: torch.Tensor, dt: torch.Tensor, active: torch.Tensor, loss: str, beta: float,
                         packed_block: int = 0, block: int = 0
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference of kernel_flow_step (see the module docstring).  Uses the upper triangle of theta only."""
    E, n = f.shape
    if packed_block > 0:
        K = unpack_symmetric(theta, n, packed_block)
    else:
        K = theta.triu() + theta.triu(1).transpose(-1, -2)       # symmetric completion of the upper triangle
    dtc = dt[:, None]
    fn = f - dtc * g
    u = y * fn
    rn = loss_grad(loss, fn, y, beta)
    cn = c + dtc * r / n
    if K.dim() == 2:
        gn = (rn @ K) / n            # K symmetric: (K r_e)^T = r_e^T K
    else:
        gn = torch.einsum("eij,ej->ei", K, rn) / n
    g64, gn64 = g.double(), gn.double()
    stats = torch.stack([
        (g64 ** 2).sum(1), (gn64 ** 2).sum(1), ((g64 - gn64) ** 2).sum(1),
        dt.double() * g64.abs().amax(1), u.double().amin(1), loss_value(loss, fn.double(), y.double(), beta).mean(1),
        gn64.abs().amax(1)], dim=1)
    a = active[:, None]
    return (torch.where(a, fn, f), torch.where(a, rn, r), torch.where(a, gn, g), torch.where(a, cn, c),
            torch.where(a, stats, torch.zeros_like(stats)))
