"""Observables of the training dynamics (article notation: F = alpha (f - f0), margin at y F = 1).

All functions are plain torch and work on the outputs of K nets at once where that makes sense.
"""
from __future__ import annotations

import math
import operator
from typing import Dict, List, Optional, Sequence

import torch


def next_record(step: int, rate: float = 0.01, spacing: int = 100) -> int:
    """The step of the next history record after ``step`` in the reference code's log-linear sequence.

    s_{k+1} = int(s_k + 1 + spacing (1 - exp(-s_k rate / spacing))), s_0 = 0: every step up to ~100,
    then spacing growing by about ``rate`` per record, then a constant ``spacing``.
    """
    return int(step + 1 + spacing * (1.0 - math.exp(-step * rate / spacing)))


def loglinspace(n_max: int, rate: float = 0.01, spacing: int = 100) -> List[int]:
    """All record steps <= n_max (0, 1, 2, ..., see :func:`next_record`)."""
    out, s = [], 0
    while s <= n_max:
        out.append(s)
        s = next_record(s, rate, spacing)
    return out


def error(F: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Classification error mean_i [y_i F_i <= 0] over the last dim (an output of exactly 0 is an error)."""
    return ((F * y) <= 0).to(torch.float64).mean(-1)


def under_margin(F: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Number of points with y F < 1 (the trainer stops when it is 0), over the last dim."""
    return ((F * y) < 1).sum(-1)


def rms(F: torch.Tensor) -> torch.Tensor:
    """sqrt(mean F^2) over the last dim."""
    return F.double().pow(2).mean(-1).sqrt()


def ensemble_stats(F_test: torch.Tensor, y_test: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """Ensemble observables of K nets' test outputs F_test (K, m).

    mean_F: the average output  Fbar(x) = (1/K) sum_r F_r(x);  var: mean_x of the unbiased across-net variance
    (1/(K-1)) sum_r (F_r(x) - Fbar(x))^2 (the paper's Var, in article units; NaN for K = 1);
    ens_err: test error of Fbar; mean_err: average of the K individual errors.
    """
    K = F_test.shape[0]
    Fd = F_test.double()
    mean = Fd.mean(0)
    out: Dict[str, float] = {
        "K": K,
        "var": float(((Fd - mean) ** 2).sum(0).mean() / (K - 1)) if K > 1 else math.nan,
        "rms_mean_F": float(rms(mean)),
    }
    if y_test is not None:
        out["ens_err"] = float(error(mean, y_test.double()))
        out["mean_err"] = float(error(Fd, y_test.double()).mean())
    return out


def gram_from_features(A: Sequence[torch.Tensor], D: Sequence[torch.Tensor]) -> torch.Tensor:
    """Theta = sum_l (D_l D_l^T) o (A_l A_l^T), (m, m), through the fused Gram op (:func:`ntk_fast.ops.gram.gram`,
    which falls back to plain torch without the extension).  Cost: m^2 sum_l (fan_in_l + fan_out_l) flops."""
    from ntk_fast.ops.gram import gram
    return gram(list(A), list(D))


def kernel_change(theta: torch.Tensor, theta0: torch.Tensor) -> float:
    """|Theta - Theta0|_F / |Theta0|_F."""
    return float(torch.linalg.norm((theta - theta0).double()) / torch.linalg.norm(theta0.double()))


def kernel_points_of(kernel_points, x: torch.Tensor, x_test: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The points of the kernel change: None (0 or None: off), the first m test points (train points without
    a test set) for an int m >= 1, or a given (m, ...) tensor with x's per-point shape, finite, in x's dtype and
    device.  Anything else is a clear error naming kernel_points."""
    if isinstance(kernel_points, torch.Tensor):
        if kernel_points.dim() != x.dim() or kernel_points.shape[1:] != x.shape[1:] or kernel_points.shape[0] < 1:
            raise ValueError(f"train: kernel_points must be an (m, {', '.join(map(str, x.shape[1:]))}) tensor like x, "
                             f"got shape {tuple(kernel_points.shape)}")
        if not torch.isfinite(kernel_points).all():
            raise ValueError("train: kernel_points contains NaN or infinite values")
        return kernel_points.to(dtype=x.dtype, device=x.device).contiguous()
    if kernel_points is None:
        return None
    try:
        m = operator.index(kernel_points) if not isinstance(kernel_points, bool) else -1
    except TypeError:
        m = -1
    if m < 0:
        raise ValueError(f"train: kernel_points must be an int >= 0 or a tensor of points, got {kernel_points!r}")
    return (x_test if x_test is not None else x)[:m] if m else None
