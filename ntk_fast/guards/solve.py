"""Was a kernel regression solved?  Judged by the residual, not by the condition number.

After coef is computed from (K + (ridge + jitter) I) coef = y (Cholesky factor L of that matrix):

    residual  = max_e ||(K + ridge I) coef_e - y_e|| / ||y_e||     (the system the caller asked for: no jitter)
    condition = (max_i L_ii / min_i L_ii)^2                         (a cheap lower bound of cond(K + (ridge + jitter) I))

The system counts as solved when residual <= RESIDUAL_TOL[dtype] (float64: 1e-3, float32: 1e-2).  Smooth
kernels are badly conditioned and still solved (small residual); a rank-deficient K with labels outside its
range (e.g. K = 1 1^T with +-1 labels) is not: a jitter makes Cholesky succeed, but the coefficients
(~ 1 / jitter) fit nothing and the residual is of order 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["RESIDUAL_TOL", "SolveReport", "solve_report"]

RESIDUAL_TOL = {torch.float64: 1e-3, torch.float32: 1e-2}


@dataclass
class SolveReport:
    """jitter added to the diagonal, condition estimate, relative residual, the threshold and the verdict."""
    jitter: float
    condition: float
    residual: float
    tolerance: float
    status: str          # "solved" or "unsolved"

    def message(self, what: str = "kernel_regression") -> str:
        return (f"{what}: the system was not solved: relative training residual ||(K + ridge I) coef - y|| / ||y|| "
                f"= {self.residual:.3g} > {self.tolerance:g} (jitter {self.jitter:.3g}, condition >= "
                f"{self.condition:.3g}). K is (nearly) singular and y is not in its range, so no ridge-free fit "
                "exists: use ridge > 0, or check the kernel")


def solve_report(K: torch.Tensor, y: torch.Tensor, coef: torch.Tensor, F_train: torch.Tensor, ridge: float,
                 jitter: float, L: torch.Tensor) -> SolveReport:
    """Report for coef (E, n) solving (K + (ridge + jitter) I) coef = y (E, n), with F_train = coef K (E, n)."""
    res = F_train.double() + ridge * coef.double() - y.double()
    ynorm = y.double().norm(dim=-1).clamp_min(1e-300)
    residual = float((res.norm(dim=-1) / ynorm).max()) if res.numel() else 0.0
    d = L.diagonal().double().abs()
    condition = float((d.max() / d.min().clamp_min(1e-300)) ** 2) if d.numel() else 1.0
    tol = RESIDUAL_TOL.get(K.dtype, 1e-3)
    ok = residual <= tol
    return SolveReport(jitter=float(jitter), condition=condition, residual=residual, tolerance=tol,
                       status="solved" if ok else "unsolved")
