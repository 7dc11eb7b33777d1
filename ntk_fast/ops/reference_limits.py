"""Pure-torch reference of the op ``ntk_fast::limit_kernels`` (the infinite-width NNGP and NTK of FCNet).

Per entry (i, j), with S = x1_i . x2_j / d and b the bias scale (docs/limits.md)::

    S_0 = S,   T_0 = S_0 + b^2
    for l = 0 .. L-1, with q = q1[l, i], q' = q2[l, j], rho = S_l / sqrt(q q'):
        S_{l+1} = E[sigma(u) sigma(v)],   Sdot_{l+1} = E[sigma'(u) sigma'(v)]     (u, v) ~ N(0, [[q, S_l], [S_l, q']])
        T_{l+1} = S_{l+1} + b^2 + Sdot_{l+1} T_l
    nngp = S_L,   ntk = T_L

q1[l, i] = S_l(x_i, x_i) are the per-layer variances (computed once per point, O(n L)).  The expectations come
from (in this order of precedence):

* ``table`` (L, 4, K + 1) non-empty: per-layer maps of the correlation for equal-norm inputs, interpolated
  (``table_maps``);
* ``activation == "relu"``: the arc-cosine closed form (``relu_maps``), sigma = c relu;
* otherwise the product quadrature rule ``(nodes, weights)`` on sigma = c softplus(beta z) / beta or c tanh z.

Memory: the two outputs plus one row block of temporaries (``block`` rows; for the quadrature
rows * n2 * m^2 elements are bounded by a chunk size).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch

Fn = Callable[[torch.Tensor], torch.Tensor]
Maps = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]


def relu_maps(q1: torch.Tensor, q2: torch.Tensor, rho: torch.Tensor, c: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """sigma = c relu, theta = arccos(rho):  E[sigma sigma] = c^2 sqrt(q1 q2) (sin theta + (pi - theta) rho) / (2 pi),
    E[sigma' sigma'] = c^2 (pi - theta) / (2 pi)  (arc-cosine kernels of degree 1 and 0)."""
    rho = rho.clamp(-1.0, 1.0)
    th = torch.arccos(rho)
    k = c * c / (2.0 * math.pi)
    e = k * (q1 * q2).sqrt() * ((1.0 - rho * rho).clamp_min(0.0).sqrt() + (math.pi - th) * rho)
    return e, k * (math.pi - th)


def native_activation(name: str, beta: float, c: float) -> Tuple[Fn, Fn]:
    """(sigma, sigma') of the op's activations: c softplus(beta z) / beta, c tanh z, c relu z."""
    if name == "softplus":
        return (lambda z: c * torch.nn.functional.softplus(z, beta=beta, threshold=40.0),
                lambda z: c * torch.sigmoid(beta * z))
    if name == "tanh":
        return (lambda z: c * torch.tanh(z), lambda z: c * (1.0 - torch.tanh(z) ** 2))
    if name == "relu":
        return (lambda z: c * torch.relu(z), lambda z: c * (z > 0).to(z.dtype))
    raise ValueError(f"limit_kernels: unknown activation {name!r}")


def product_rule(sigma: Fn, dsigma: Fn, q1: torch.Tensor, q2: torch.Tensor, rho: torch.Tensor,
                 nodes: torch.Tensor, weights: torch.Tensor, chunk_elems: int = 1 << 22
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(E[sigma(u) sigma(v)], E[sigma'(u) sigma'(v)]) by the product rule: u = sqrt(q1) x_a,
    v = sqrt(q2) (rho x_a + sqrt(1 - rho^2) x_b), weights w_a w_b.  Flat float64 inputs of one length N;
    N m^2 evaluations in chunks of ``chunk_elems``."""
    shape = q1.shape
    q1, q2, rho = (t.reshape(-1).to(torch.float64) for t in (q1, q2, rho))
    x, w = nodes.to(torch.float64), weights.to(torch.float64)
    m = x.numel()
    ww = w[:, None] * w[None, :]
    e, ed = torch.empty_like(q1), torch.empty_like(q1)
    step = max(1, chunk_elems // (m * m))
    for i in range(0, q1.numel(), step):
        a, b, r = q1[i:i + step].sqrt(), q2[i:i + step].sqrt(), rho[i:i + step].clamp(-1.0, 1.0)
        s = (1.0 - r * r).clamp_min(0.0).sqrt()
        u = a[:, None] * x[None, :]
        v = b[:, None, None] * (r[:, None, None] * x[None, :, None] + s[:, None, None] * x[None, None, :])
        e[i:i + step] = torch.einsum("ca,cab,ab->c", sigma(u), sigma(v), ww)
        ed[i:i + step] = torch.einsum("ca,cab,ab->c", dsigma(u), dsigma(v), ww)
    return e.reshape(shape), ed.reshape(shape)


def _cubic(tab: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Four-point Lagrange interpolation of tab (K + 1 values at t = j / K) at t in [0, 1]."""
    K = tab.numel() - 1
    j0 = (t * K).floor().long().sub(1).clamp(0, K - 3)
    p = t * K - j0.to(t.dtype)                      # in [0, 3]: nodes at p = 0, 1, 2, 3
    f0, f1, f2, f3 = (tab[j0 + k] for k in range(4))
    return (-f0 * (p - 1) * (p - 2) * (p - 3) / 6 + f1 * p * (p - 2) * (p - 3) / 2
            - f2 * p * (p - 1) * (p - 3) / 2 + f3 * p * (p - 1) * (p - 2) / 6)


def table_maps(table_l: torch.Tensor, rho: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Interpolated (E[sigma sigma], E[sigma' sigma']) of one layer at correlations rho.

    table_l (4, K + 1): rows 0, 1 at rho = 1 - t^2 and rows 2, 3 at rho = s^2 - 1 (t, s = j / K).  In these
    variables the ReLU maps (sqrt(1 -+ rho) singularities at rho = +-1) are analytic, so a cubic on a
    uniform grid reaches 1e-7 (docs/limits.md)."""
    rho = rho.clamp(-1.0, 1.0)
    pos = rho >= 0
    t = torch.where(pos, (1.0 - rho).sqrt(), (1.0 + rho).sqrt())
    e = torch.where(pos, _cubic(table_l[0], t), _cubic(table_l[2], t))
    ed = torch.where(pos, _cubic(table_l[1], t), _cubic(table_l[3], t))
    return e, ed


def recursion(s0: torch.Tensor, qa: torch.Tensor, qb: torch.Tensor, maps: Maps, L: int, bias: float,
              diag: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The layer recursion on a block: s0 (r, c) first-layer covariances, qa (L, r), qb (L, c) variances,
    maps(l, q1, q2, rho) -> (E, Edot).  diag (r, c) bool: entries of a point with itself, where rho = 1
    exactly (rounding would otherwise enter the ReLU maps through sqrt(1 - rho)).  Returns (S_L, T_L)."""
    s = s0
    t = s + bias * bias
    for l in range(L):
        q1, q2 = qa[l][:, None].expand_as(s), qb[l][None, :].expand_as(s)
        den = (q1 * q2).sqrt()
        rho = torch.where(den > 0, s / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(s))
        if diag is not None:
            rho = torch.where(diag, torch.ones_like(rho), rho)
        s, sd = maps(l, q1, q2, rho)
        t = s + bias * bias + sd * t
    return s, t


def limit_kernels_ref(x1: torch.Tensor, x2: torch.Tensor, q1: torch.Tensor, q2: torch.Tensor, table: torch.Tensor,
                      nodes: torch.Tensor, weights: torch.Tensor, symmetric: bool, L: int, activation: str,
                      beta: float, c: float, bias: float, block: int = 0,
                      sigma: Fn = None, dsigma: Fn = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``torch.ops.ntk_fast.limit_kernels`` (same arguments; see the module docstring).

    ``sigma, dsigma`` (not in the op) replace the named activation by any torch functions (quadrature path).
    Computed in float64, returned in x1's dtype.
    """
    if symmetric:
        x2, q2 = x1, q1
    n1, n2, d = x1.shape[0], x2.shape[0], x1.shape[1]
    X1, X2 = x1.to(torch.float64), x2.to(torch.float64)
    Q1, Q2 = q1.to(torch.float64), q2.to(torch.float64)
    if table.numel() > 0:
        tab = table.to(torch.float64)

        def maps(l, a, b, rho):
            return table_maps(tab[l], rho)
    elif activation == "relu" and sigma is None:
        def maps(l, a, b, rho):
            return relu_maps(a, b, rho, c)
    else:
        if sigma is None:
            sigma, dsigma = native_activation(activation, beta, c)

        def maps(l, a, b, rho):
            return product_rule(sigma, dsigma, a, b, rho, nodes, weights)
    nngp = torch.empty((n1, n2), dtype=x1.dtype, device=x1.device)
    ntk = torch.empty_like(nngp)
    rows = block if block > 0 else max(1, (1 << 20) // max(1, n2))
    for i in range(0, n1, rows):
        s0 = X1[i:i + rows] @ X2.t() / d
        diag = None
        if symmetric:
            r = torch.arange(i, min(i + rows, n1), device=x1.device)
            diag = r[:, None] == torch.arange(n2, device=x1.device)[None, :]
        s, t = recursion(s0, Q1[:, i:i + rows], Q2, maps, L, bias, diag)
        nngp[i:i + rows], ntk[i:i + rows] = s, t
    if symmetric:       # like the op: the upper triangle, mirrored (the product rule is not exactly symmetric)
        for out in (nngp, ntk):
            out.copy_(out.triu() + out.triu(1).t())
    return nngp, ntk
