"""Spectrum tools for Gram matrices: eigenpairs (dense, or the top k of a memory-mapped Gram), the spectrum in
spherical-harmonic degrees for points on the sphere, and kernel-target alignment.

    eigenpairs:   K = V diag(lam) V^T, lam descending                       (torch.linalg.eigh: O(n^3))
    top k (memmap): Lanczos (scipy.sparse.linalg.eigsh) on v -> K v, K read in row blocks of ``block`` rows:
                  O(n^2) reads per matrix-vector product, memory O(block n + n k)
    degree power: p_k(v, w) = N(k, d) / n^2 sum_ij v_i w_j P_k(x_i . x_j)  (P_k: degree-k projector of the
                  empirical measure; for n -> inf and v = f on the points, p_k(f, f) -> sum_l f_kl^2, the
                  field's power in degree k); its diagonal part N(k, d) / n mean(v w) is a bias of relative size
                  N(k, d) / n, so for a function sampled at independent points the U-statistic
                  u_k = N(k, d) / (n (n - 1)) sum_{i != j} v_i w_j P_k(x_i . x_j) (unbiased=True) is used where
                  N(k, d) is not small against n, and the Gram's degree content
                  g_k(K) = N(k, d) / n^2 sum_ij K_ij P_k(x_i . x_j) -> a_k N(k, d) for a dot-product kernel
    alignment:    A(K, y) = y^T K y / (||K||_F ||y||^2)  in [0, 1] for K psd (1: K = c y y^T)
    mode projections: (v_r . y)^2 / ||y||^2 per eigenvector: how much of y lies on each of the first modes.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple, Union

import numpy as np
import torch

from ntk_fast.sphere.field import check_on_sphere
from ntk_fast.sphere.harmonics import degree_coefficients, gegenbauer, harmonic_dims

__all__ = ["gram_eigh", "gram_topk", "degree_power", "gram_degree_content", "kernel_degree_spectrum",
           "kernel_target_alignment", "mode_projections"]


def _check_gram(K, name: str = "K") -> None:
    if not isinstance(K, torch.Tensor) or K.dim() != 2 or K.shape[0] != K.shape[1] or K.shape[0] < 1:
        what = tuple(K.shape) if isinstance(K, torch.Tensor) else type(K).__name__
        raise ValueError(f"{name} must be a square (n, n) tensor, got {what}")
    if not K.is_floating_point() or not bool(torch.isfinite(K).all()):
        raise ValueError(f"{name} must be a finite floating-point tensor")


def gram_eigh(K: torch.Tensor, k: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and eigenvectors (columns) of a symmetric Gram K (n, n); the first k if given.

    The symmetric part (K + K^T) / 2 is used.  Cost O(n^3), memory ~ 3 n^2."""
    _check_gram(K)
    lam, V = torch.linalg.eigh((K + K.T) / 2)
    lam, V = lam.flip(0), V.flip(1)
    if k is not None:
        if not isinstance(k, int) or not 1 <= k <= K.shape[0]:
            raise ValueError(f"gram_eigh: k must be an int in [1, {K.shape[0]}], got {k!r}")
        lam, V = lam[:k], V[:, :k]
    return lam, V


def gram_topk(K: Union[np.ndarray, str, os.PathLike, torch.Tensor], k: int, block: int = 1024, tol: float = 0.0,
              maxiter: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Top k eigenpairs (descending) of a symmetric (n, n) float Gram stored as a .npy file or a numpy (memmap)
    array (or a tensor): read and checked as kernel_flow reads an on-disk Theta (clear errors for a missing,
    unreadable, non-square or non-float file).

    Lanczos (ARPACK through scipy.sparse.linalg.eigsh, which="LA") with K v computed over row blocks, so only
    ``block`` rows are in memory at a time.  tol: ARPACK's relative accuracy (0: machine precision); maxiter:
    its iteration budget (default 10 n) -- ArpackNoConvergence past it.  Returns (lam (k,), V (n, k)) float64.
    """
    try:
        from scipy.sparse.linalg import LinearOperator, eigsh
    except ImportError as e:                                  # pragma: no cover
        raise ImportError("gram_topk needs scipy (pip install scipy)") from e
    from ntk_fast.distributed.flow import open_theta      # the one reader of an on-disk Gram
    if isinstance(K, torch.Tensor):
        K = K.detach().cpu().numpy()
    A = open_theta(K, "gram_topk: K")
    n = A.shape[0]
    if not isinstance(k, int) or not 1 <= k < n:
        raise ValueError(f"gram_topk: k must be an int in [1, {n - 1}] (use gram_eigh for all), got {k!r}")
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"gram_topk: block must be an int >= 1, got {block!r}")

    def matvec(v):
        v = np.asarray(v, dtype=np.float64).reshape(n, -1)
        out = np.empty_like(v)
        for i in range(0, n, block):
            out[i:i + block] = np.asarray(A[i:i + block], dtype=np.float64) @ v
        return out

    op = LinearOperator((n, n), matvec=matvec, matmat=matvec, dtype=np.float64)
    lam, V = eigsh(op, k=k, which="LA", tol=tol, maxiter=maxiter or 10 * n)
    order = np.argsort(lam)[::-1]
    return lam[order], V[:, order]


def degree_power(x: torch.Tensor, v: torch.Tensor, k_max: int, w: Optional[torch.Tensor] = None,
                 unbiased: bool = False) -> torch.Tensor:
    """p_k(v, w) for k = 0 .. k_max on unit-sphere points x (n, d); v, w: (n,) or (m, n) values (w = v if None).

    unbiased: the off-diagonal U-statistic u_k (module docstring): for v = f(x_i), w = g(x_i) at n independent
    uniform points, E u_k = sum_l f_kl g_kl exactly (needs n >= 2).
    Returns (k_max + 1,) or (m, k_max + 1).  Cost O(k_max n^2 (1 + m / n)); memory 3 n^2."""
    check_on_sphere(x, "degree_power: x")
    n, d = x.shape
    vv = v.to(torch.float64).reshape(-1, n)
    ww = vv if w is None else w.to(torch.float64).reshape(-1, n)
    if vv.shape[1] != n or ww.shape != vv.shape:
        raise ValueError(f"degree_power: v and w must be (n,) or (m, n) with n = {n}")
    if unbiased and n < 2:
        raise ValueError("degree_power: unbiased=True needs n >= 2 points")
    xd = x.to(torch.float64)
    t = (xd @ xd.T).clamp_(-1.0, 1.0)
    if unbiased:
        t.fill_diagonal_(0.0)          # P_k(0) on the diagonal, removed below with its exact value
    N = harmonic_dims(k_max, d)
    out = torch.empty(vv.shape[0], k_max + 1, dtype=torch.float64)
    prev, cur = torch.ones_like(t), t.clone()
    for k in range(k_max + 1):
        P = prev if k == 0 else cur
        out[:, k] = N[k] / n ** 2 * ((vv @ P) * ww).sum(dim=1)
        if k >= 1:
            nxt = cur.mul((2 * k + d - 2) / (k + d - 2)).mul_(t).sub_(prev, alpha=k / (k + d - 2))
            prev, cur = cur, nxt
    if unbiased:
        P0 = gegenbauer(k_max, d, torch.zeros(1, dtype=torch.float64))[:, 0]       # P_k(0): the diagonal used
        out = (out - N * P0 / n ** 2 * (vv * ww).sum(dim=1, keepdim=True)) * (n / (n - 1))
    return out[0] if v.dim() == 1 else out


def gram_degree_content(K: torch.Tensor, x: torch.Tensor, k_max: int) -> torch.Tensor:
    """g_k(K) = N(k, d) / n^2 sum_ij K_ij P_k(x_i . x_j), k = 0 .. k_max: the degree-k part of the Gram's trace
    per point (-> a_k N(k, d) for a dot-product kernel as n grows)."""
    _check_gram(K)
    check_on_sphere(x, "gram_degree_content: x")
    if x.shape[0] != K.shape[0]:
        raise ValueError(f"gram_degree_content: x has {x.shape[0]} rows but K is {tuple(K.shape)}")
    n, d = x.shape
    xd = x.to(torch.float64)
    P = gegenbauer(k_max, d, (xd @ xd.T).clamp_(-1.0, 1.0))
    return harmonic_dims(k_max, d) / n ** 2 * (P * K.to(torch.float64)).sum(dim=(1, 2))


def kernel_degree_spectrum(kernel, d: int, k_max: int, order: int = 0) -> torch.Tensor:
    """Eigenvalues a_k (multiplicity N(k, d)) of a dot-product kernel K(t) on S^{d-1} by Gauss-Jacobi quadrature
    in t = x . y (ntk_fast.sphere.harmonics.degree_coefficients)."""
    return degree_coefficients(kernel, d, k_max, order)


def kernel_target_alignment(K: torch.Tensor, y: torch.Tensor) -> float:
    """A(K, y) = y^T K y / (||K||_F ||y||^2)."""
    _check_gram(K)
    if not isinstance(y, torch.Tensor) or y.shape != (K.shape[0],):
        raise ValueError(f"kernel_target_alignment: y must be ({K.shape[0]},)")
    y = y.to(K.dtype)
    den = float(K.norm()) * float(y @ y)
    if den == 0.0:
        raise ValueError("kernel_target_alignment: K or y is zero")
    return float(y @ K @ y) / den


def mode_projections(V: torch.Tensor, *vectors: torch.Tensor) -> torch.Tensor:
    """(len(vectors), r): (V[:, r] . y)^2 / ||y||^2 of each vector y on the columns of V (e.g. from gram_eigh)."""
    rows = []
    for y in vectors:
        if y.shape != (V.shape[0],):
            raise ValueError(f"mode_projections: each vector must be ({V.shape[0]},), got {tuple(y.shape)}")
        y = y.to(V.dtype)
        rows.append((V.T @ y) ** 2 / (y @ y))
    return torch.stack(rows)
