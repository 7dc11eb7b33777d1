"""Gegenbauer polynomials and spherical-harmonic dimensions on S^{d-1} (float64, three-term recurrence).

    P_k(d; t) = C_k^{(d-2)/2}(t) / C_k^{(d-2)/2}(1)              normalised: P_k(1) = 1, |P_k(t)| <= 1 on [-1, 1]
    P_0 = 1,  P_1 = t,  (k + d - 2) P_{k+1} = (2k + d - 2) t P_k - k P_{k-1}          (k >= 1)
    d = 2: P_k(cos theta) = cos(k theta) (Chebyshev);  d = 3: Legendre.
    N(k, d) = (2k + d - 2) (k + d - 3)! / (k! (d - 2)!)         (N(0, d) = 1; d = 2: N(k) = 2 for k >= 1)

Addition theorem: sum_l Y_kl(x) Y_kl(y) = N(k, d) P_k(x . y) for harmonics orthonormal under the uniform
probability measure of the sphere; hence a dot-product kernel K(x . y) = sum_k a_k N(k, d) P_k(x . y) has the
eigenvalue a_k (multiplicity N(k, d)) as an integral operator on that measure, with (Funk-Hecke;
E_t[P_j P_k] = delta_jk / N(k, d))

    a_k = E_t[K(t) P_k(t)],     t = x . y for y uniform: density prop. to (1 - t^2)^((d-3)/2).

The recurrence is forward-stable on [-1, 1] (the normalised P_k are bounded by 1); cost O(k_max) per point.
"""
from __future__ import annotations

import math
from typing import Tuple

import numpy as np
import torch

__all__ = ["gegenbauer", "harmonic_dim", "harmonic_dims", "gegenbauer_nodes", "degree_coefficients"]


def _check_d(d) -> None:
    if not isinstance(d, int) or isinstance(d, bool) or d < 2:
        raise ValueError(f"sphere: d must be an int >= 2 (the sphere S^(d-1) in R^d), got {d!r}")


def _check_k(k_max) -> None:
    if not isinstance(k_max, int) or isinstance(k_max, bool) or k_max < 0:
        raise ValueError(f"sphere: k_max must be an int >= 0, got {k_max!r}")


def harmonic_dim(k: int, d: int) -> int:
    """N(k, d): the number of linearly independent degree-k spherical harmonics on S^{d-1} (exact integer)."""
    _check_d(d)
    _check_k(k)
    if k == 0:
        return 1
    return (2 * k + d - 2) * math.comb(k + d - 3, k - 1) // k


def harmonic_dims(k_max: int, d: int) -> torch.Tensor:
    """(k_max + 1,) float64 tensor of N(k, d), k = 0 .. k_max."""
    _check_k(k_max)
    return torch.tensor([float(harmonic_dim(k, d)) for k in range(k_max + 1)], dtype=torch.float64)


def gegenbauer(k_max: int, d: int, t: torch.Tensor) -> torch.Tensor:
    """P_k(d; t) for k = 0 .. k_max: a (k_max + 1, *t.shape) tensor in t's dtype (float64 advised).

    t must lie in [-1, 1] (up to 1e-12, clamped).  Memory: (k_max + 1) times t (field.py sums over k with three
    buffers when only a weighted sum is needed).
    """
    _check_d(d)
    _check_k(k_max)
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise ValueError("gegenbauer: t must be a floating-point tensor")
    if t.numel() and (not bool(torch.isfinite(t).all()) or float(t.abs().max()) > 1 + 1e-12):
        raise ValueError("gegenbauer: t must be finite and lie in [-1, 1]")
    t = t.clamp(-1.0, 1.0)
    out = torch.empty((k_max + 1,) + tuple(t.shape), dtype=t.dtype, device=t.device)
    out[0] = 1.0
    if k_max >= 1:
        out[1] = t
    for k in range(1, k_max):
        out[k + 1] = ((2 * k + d - 2) * t * out[k] - k * out[k - 1]) / (k + d - 2)
    return out


def gegenbauer_nodes(d: int, order: int) -> Tuple[np.ndarray, np.ndarray]:
    """Gauss-Jacobi rule for E_t[g(t)], t ~ (1 - t^2)^((d-3)/2) on [-1, 1] normalised: (nodes, weights summing
    to 1).  Exact for polynomials of degree <= 2 order - 1."""
    _check_d(d)
    if not isinstance(order, int) or order < 1:
        raise ValueError(f"gegenbauer_nodes: order must be an int >= 1, got {order!r}")
    from scipy.special import roots_jacobi
    a = (d - 3) / 2.0
    t, w = roots_jacobi(order, a, a)
    return t, w / w.sum()


def degree_coefficients(kernel, d: int, k_max: int, order: int = 0) -> torch.Tensor:
    """a_k, k = 0 .. k_max, of a dot-product kernel K(t) = sum_k a_k N(k, d) P_k(t) on S^{d-1}: a_k = E_t[K(t) P_k(t)].

    kernel: a function of a float64 tensor t (the cosine) returning K(t) of the same shape.  order: Gauss-Jacobi
    nodes (0: max(4 k_max, 2000)); exact when K is a polynomial of degree < 2 order - k_max; for a kernel with
    an algebraic singularity (1 - t)^s at t = 1 the error falls like order^-(2 s + d - 1) (compare two orders).
    Returns a (k_max + 1,) float64 tensor: the eigenvalues of the integral operator on the uniform probability
    measure, multiplicity N(k, d).  Cost: O(order k_max).
    """
    _check_k(k_max)
    order = order or max(4 * k_max, 2000)
    t, w = gegenbauer_nodes(d, order)
    tt = torch.from_numpy(t)
    kt = kernel(tt)
    if not isinstance(kt, torch.Tensor) or kt.shape != tt.shape:
        raise ValueError("degree_coefficients: kernel(t) must return a tensor shaped like t")
    P = gegenbauer(k_max, d, tt)
    return (P * (kt.to(torch.float64) * torch.from_numpy(w))).sum(dim=1)
