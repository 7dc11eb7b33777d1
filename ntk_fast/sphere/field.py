"""Points on the sphere and an exact Gaussian random field sampler with a prescribed harmonic power.

Target (Petrini et al.): f*(x) = sum_{k >= 1} sum_l f_kl Y_kl(x), f_kl ~ N(0, c_k) independent, harmonics
orthonormal under the uniform probability measure, c_k = k^-(2 nu_t + d - 1) (c_0 = 0: no constant mode), so
E|f*(x) - f*(y)|^2 = O(|x - y|^(2 nu_t)) (smoothness nu_t > 0).  By the addition theorem the covariance is

    C(x . y) = sum_{k=1..K} c_k N(k, d) P_k(d; x . y),      C(1) = sum_k c_k N(k, d) = E f*(x)^2

The sampler draws the field on all points at once (train and test together): C on the (n, n) cosines by the
Gegenbauer recurrence (three (n, n) buffers), a Cholesky factor L of C + eps I, values L z with z ~ N(0, I).
It is exact for the field truncated at degree K; the truncation drops the variance
tail(K) = sum_{k > K} c_k N(k, d) ~ c_K N(K, d) K / (2 nu_t) (c_k N(k, d) ~ k^-(2 nu_t + 1): the integral test,
leading order in 1/K), reported relative to C(1).  The jitter eps (0, else 1e-12 C(1) times 10 until the
factorisation succeeds, at most 1e-6 C(1)) adds white noise of that variance, also reported.
Cost: O(K n^2) for C, n^3 / 3 for the factor, n^2 draws; memory ~ 5 n^2 doubles (checked before allocating).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ntk_fast.guards.memory import require_memory
from ntk_fast.sphere.harmonics import _check_d, harmonic_dim, harmonic_dims

__all__ = ["FieldSample", "sample_sphere", "check_on_sphere", "target_power", "choose_degree", "field_covariance",
           "sample_field"]

MAX_JITTER = 1e-6


@dataclass
class FieldSample:
    """values (draws, n); k_max: truncation degree K; tail: dropped variance / C(1); jitter: eps / C(1);
    variance: C(1) = E f*(x)^2 of the truncated field."""
    values: torch.Tensor
    k_max: int
    tail: float
    jitter: float
    variance: float


def sample_sphere(n: int, d: int, generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float64,
                  radius: float = 1.0) -> torch.Tensor:
    """n points uniform on the sphere of radius ``radius`` in R^d: normalised standard Gaussians, (n, d)."""
    _check_d(d)
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"sample_sphere: n must be an int >= 1, got {n!r}")
    g = torch.randn(n, d, generator=generator, dtype=torch.float64)
    return (radius * g / g.norm(dim=1, keepdim=True)).to(dtype)


def check_on_sphere(x: torch.Tensor, name: str = "x", radius: float = 1.0, rtol: float = 1e-6) -> None:
    """ValueError naming ``name`` unless x is a finite (n, d) float tensor with every |x_i| = radius (rtol)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point() or x.shape[0] < 1:
        what = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a floating (n, d) tensor of points on the sphere, got {what}")
    if x.shape[1] < 2:
        raise ValueError(f"{name}: points on S^(d-1) need d >= 2 columns, got {x.shape[1]}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} has non-finite entries (NaN or inf)")
    dev = float((x.double().norm(dim=1) / radius - 1.0).abs().max())
    if dev > rtol:
        raise ValueError(f"{name} is not on the sphere of radius {radius}: max | |x_i| / radius - 1 | = {dev:.3g} "
                         f"> {rtol:g} (normalise the rows, e.g. x / x.norm(dim=1, keepdim=True) * radius)")


def _check_nu(nu_t) -> float:
    if not isinstance(nu_t, (int, float)) or isinstance(nu_t, bool) or not (math.isfinite(nu_t) and nu_t > 0):
        raise ValueError(f"nu_t must be a finite number > 0 (the target's smoothness), got {nu_t!r}")
    return float(nu_t)


def target_power(d: int, nu_t: float, k_max: int) -> torch.Tensor:
    """c_k = k^-(2 nu_t + d - 1) for k = 1 .. k_max, c_0 = 0: a (k_max + 1,) float64 tensor."""
    _check_d(d)
    nu_t = _check_nu(nu_t)
    k = torch.arange(k_max + 1, dtype=torch.float64)
    c = k.clamp(min=1.0) ** -(2 * nu_t + d - 1)
    c[0] = 0.0
    return c


def _tail(d: int, nu_t: float, K: int) -> float:
    return K ** -(2 * nu_t + d - 1) * harmonic_dim(K, d) * K / (2 * nu_t)


def choose_degree(d: int, nu_t: float, tol: float = 1e-6, k_min: int = 16, k_cap: int = 2048):
    """Smallest K >= k_min (powers of two) with tail(K) <= tol C(1), at most k_cap: (K, tail(K) / C(1))."""
    nu_t = _check_nu(nu_t)
    K = max(1, k_min)
    while True:
        var = float((target_power(d, nu_t, K) * harmonic_dims(K, d)).sum())
        rel = _tail(d, nu_t, K) / var
        if rel <= tol or K >= k_cap:
            return K, rel
        K = min(2 * K, k_cap)


def field_covariance(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """C_ij = sum_k c_k N(k, d) P_k(x_i . x_j) for unit-norm rows of x (n, d): (n, n) float64.

    Three (n, n) buffers run the recurrence; cost ~ 6 K n^2 flops for K = len(c) - 1."""
    n, d = x.shape
    K = c.numel() - 1
    N = harmonic_dims(K, d)
    xd = x.to(torch.float64)
    t = (xd @ xd.T).clamp_(-1.0, 1.0)
    prev = torch.ones_like(t)
    cov = torch.full_like(t, float(c[0] * N[0]))
    cur = t.clone()
    for k in range(1, K + 1):
        cov.add_(cur, alpha=float(c[k] * N[k]))
        if k < K:
            nxt = cur.mul((2 * k + d - 2) / (k + d - 2)).mul_(t).sub_(prev, alpha=k / (k + d - 2))
            prev, cur = cur, nxt
    return cov


def _cholesky(C: torch.Tensor, scale: float):
    jitter = 0.0
    eye = torch.eye(C.shape[0], dtype=C.dtype)
    while True:
        Lc, info = torch.linalg.cholesky_ex(C + jitter * eye if jitter else C)
        if int(info) == 0:
            return Lc, jitter / scale
        jitter = 1e-12 * scale if jitter == 0.0 else jitter * 10.0
        if jitter > MAX_JITTER * scale:
            raise ValueError("sample_field: the covariance is not positive definite even with a jitter of "
                             f"{MAX_JITTER:g} C(1) (duplicate points?)")


def sample_field(x: torch.Tensor, nu_t: float, draws: int = 1, generator: Optional[torch.Generator] = None,
                 tol: float = 1e-6, k_cap: int = 2048) -> FieldSample:
    """Exact draws of the Gaussian field of smoothness nu_t on the unit-sphere points x (n, d) (module docstring).

    tol: the dropped variance tail(K) / C(1) aimed at (K <= k_cap; the result reports what was reached).
    Raises ValueError for x off the unit sphere or nu_t <= 0, MemoryBudgetError when n is too large.
    """
    check_on_sphere(x, "sample_field: x")
    nu_t = _check_nu(nu_t)
    if not isinstance(draws, int) or draws < 1:
        raise ValueError(f"sample_field: draws must be an int >= 1, got {draws!r}")
    n, d = x.shape
    require_memory(8.0 * (5 * n * n + n * draws), f"sample_field: the exact sampler on n = {n} points (five (n, n) "
                   "float64 buffers)", None, "Use fewer points (the cost grows as n^2 in memory and n^3 in time).")
    K, tail = choose_degree(d, nu_t, tol, k_cap=k_cap)
    c = target_power(d, nu_t, K)
    C = field_covariance(x, c)
    scale = float((c * harmonic_dims(K, d)).sum())
    Lc, jitter = _cholesky(C, scale)
    del C
    z = torch.randn(n, draws, generator=generator, dtype=torch.float64)
    return FieldSample(values=(Lc @ z).T.contiguous(), k_max=K, tail=tail, jitter=jitter, variance=scale)
