"""Is a matrix a Gram matrix?  Cheap checks that scale to n = 60k (no Cholesky, no eigendecomposition).

A Gram matrix K = J J^T is symmetric positive semi-definite: finite, K = K^T, K_ii >= 0 and every eigenvalue
>= 0.  In floating point a PSD Gram can have eigenvalues slightly below 0, so the test is

    lambda_min(K) < -eps ||K||_2      ->  not a Gram matrix,

with eps = PSD_EPS[dtype] (float64: 1e-8, float32: 1e-3) and ||K||_2 = max |lambda|.  Singular PSD kernels
(lambda_min = 0) and float32 Grams with rounding-level negative eigenvalues pass.

lambda_min and lambda_max are estimated by a few Lanczos iterations with full reorthogonalisation (cost: iters
products K v, each 2 n^2 flops read in row chunks, so K may be an on-disk memmap; memory iters x n).  Ritz values
lie inside [lambda_min, lambda_max], so the estimate of lambda_min is never below the true one: a matrix flagged
as indefinite is indefinite; a weakly indefinite one may pass (the solver's divergence monitor is the second
line of defence).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import numpy as np
import torch

__all__ = ["PSD_EPS", "lanczos_extremes", "check_gram", "check_ntk_result"]

PSD_EPS = {torch.float64: 1e-8, torch.float32: 1e-3}
_CHUNK_BYTES = 64 << 20


def _rows(K: Any, i0: int, i1: int) -> torch.Tensor:
    blk = K[i0:i1]
    blk = torch.from_numpy(np.array(blk, dtype=np.float64)) if isinstance(blk, np.ndarray) else blk
    return blk.to(torch.float64)


def _matvec(K: Any, v: torch.Tensor, chunk: int) -> torch.Tensor:
    n = v.shape[0]
    out = torch.empty(n, dtype=torch.float64, device=v.device)
    for i0 in range(0, n, chunk):
        i1 = min(n, i0 + chunk)
        out[i0:i1] = _rows(K, i0, i1).to(v.device) @ v
    return out


def lanczos_extremes(K: Any, iters: int = 30, seed: int = 0,
                     matvec: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Tuple[float, float]:
    """(lambda_min, lambda_max) estimates of a symmetric (n, n) tensor, numpy array or memmap.

    Lanczos from a seeded random start: Q_j orthonormal (reorthogonalised twice against all earlier vectors),
    T = Q^T K Q tridiagonal with alpha_j = q_j^T K q_j and beta_j = ||w_j||; the extremes of eig(T) are returned.
    Exact when iters >= n (up to rounding).  Work in float64.  ``matvec`` (v (n,) float64 -> K v) replaces the
    row-chunked product, e.g. by a product split across ranks (ntk_fast.distributed.flow.check_disk_theta).
    """
    n = int(K.shape[0])
    if n == 0:
        return 0.0, 0.0
    device = K.device if isinstance(K, torch.Tensor) else torch.device("cpu")
    chunk = max(1, _CHUNK_BYTES // (8 * n))
    m = max(1, min(int(iters), n))
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, generator=g, dtype=torch.float64).to(device)
    q /= q.norm()
    Q = torch.zeros(m, n, dtype=torch.float64, device=device)
    alphas, betas = [], []
    scale = 0.0
    for j in range(m):
        Q[j] = q
        w = _matvec(K, q, chunk) if matvec is None else matvec(q).to(torch.float64)
        a = float(q @ w)
        alphas.append(a)
        scale = max(scale, float(w.norm()))
        for _ in range(2):                                     # full reorthogonalisation, twice
            w -= Q[:j + 1].T @ (Q[:j + 1] @ w)
        b = float(w.norm())
        if j == m - 1 or b <= 1e-12 * max(scale, 1e-300):      # invariant subspace found: T is exact there
            break
        betas.append(b)
        q = w / b
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas, dtype=torch.float64)
        T += torch.diag(off, 1) + torch.diag(off, -1)
    ev = torch.linalg.eigvalsh(T)
    return float(ev[0]), float(ev[-1])


def check_gram(K: Any, name: str = "K", *, iters: int = 30, seed: int = 0, eps: Optional[float] = None,
               symmetric_checked: bool = False) -> Tuple[float, float]:
    """Raise ValueError naming ``name`` unless K (n, n) or (E, n, n) looks like a Gram matrix.

    Checks: float32/float64 tensor, finite and symmetric (ntk_fast.dynamics.solver.check_kernel, skipped when
    ``symmetric_checked``), diagonal >= -eps max|K|, and lambda_min >= -eps ||K||_2 by :func:`lanczos_extremes`
    (eps = PSD_EPS[dtype] unless given).  Returns (lambda_min, lambda_max) (the extremes over a batch).
    Cost: iters n^2 multiply-adds per kernel.
    """
    if not symmetric_checked:
        from ntk_fast.dynamics.solver import check_kernel   # local import: the solver imports this module
        check_kernel(K, name)
    eps = PSD_EPS.get(K.dtype, 1e-8) if eps is None else eps
    Kb = K if K.dim() == 3 else K.unsqueeze(0)
    lo, hi = np.inf, -np.inf
    for e in range(Kb.shape[0]):
        Ke = Kb[e]
        where = f"{name}[{e}]" if K.dim() == 3 else name
        diag = Ke.diagonal()
        dmin = float(diag.min())
        amax = float(Ke.abs().amax())
        if dmin < -eps * amax or (dmin < 0 and amax == -dmin):
            i = int(diag.argmin())
            raise ValueError(f"{where} has a negative diagonal entry {where}[{i}, {i}] = {dmin:.3g}: a Gram matrix "
                             "has K_ii = |J_i|^2 >= 0 (a sign error? pass the NTK, not its negative)")
        lmin, lmax = lanczos_extremes(Ke, iters, seed)
        norm = max(abs(lmin), abs(lmax))
        if lmin < -eps * norm:
            raise ValueError(f"{where} is not positive semi-definite: it has an eigenvalue of about {lmin:.3g}, "
                             f"below -{eps:g} x ||{where}||_2 = {-eps * norm:.3g} ({K.dtype} tolerance; Lanczos "
                             f"estimate, {iters} iterations). A Gram matrix (an NTK) has no eigenvalue below "
                             "rounding level; the dynamics would diverge")
        lo, hi = min(lo, lmin), max(hi, lmax)
    return float(lo), float(hi)


def check_ntk_result(res: torch.Tensor, symmetric: bool, mode: str, name: str = "empirical_ntk result") -> None:
    """Opt-in health check of an NTK Gram: finite, non-negative diagonal, symmetric when ``symmetric``.

    (n1, n2) results are checked in row blocks; (n, n, k, k) results as the (n k, n k) matrix
    Theta[(i, c), (j, d)] (one permuted copy).  mode "diagonal": finite and >= 0.
    """
    if mode == "diagonal":
        if not bool(torch.isfinite(res).all()):
            raise ValueError(f"{name} has NaN or infinite entries")
        if res.numel() and float(res.min()) < 0:
            raise ValueError(f"{name}: the NTK diagonal has a negative entry {float(res.min()):.3g}")
        return
    if res.dim() == 4:
        n1, n2, k, _ = res.shape
        res = res.permute(0, 2, 1, 3).reshape(n1 * k, n2 * k)
    from ntk_fast.dynamics.solver import check_kernel
    if symmetric:
        check_kernel(res, name, batch_ok=False)
        d = res.diagonal()
        amax = float(res.abs().amax()) if res.numel() else 0.0
        if d.numel() and float(d.min()) < -PSD_EPS.get(res.dtype, 1e-8) * amax:
            raise ValueError(f"{name}: the NTK Gram has a negative diagonal entry {float(d.min()):.3g}")
    elif not bool(torch.isfinite(res).all()):
        raise ValueError(f"{name} has NaN or infinite entries")
