"""Observables of the training dynamics (article notation: F = alpha (f - f0), margin at y F = 1).

All functions are plain torch and work on the outputs of K nets at once where that makes sense.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch


def next_checkpoint(step: int, rate: float = 0.01, spacing: int = 100) -> int:
    """The checkpoint after ``step`` in the reference code's log-linear sequence.

    s_{k+1} = int(s_k + 1 + spacing (1 - exp(-s_k rate / spacing))), s_0 = 0: every step up to ~100,
    then spacing growing by about ``rate`` per checkpoint, then a constant ``spacing``.
    """
    return int(step + 1 + spacing * (1.0 - math.exp(-step * rate / spacing)))


def loglinspace(n_max: int, rate: float = 0.01, spacing: int = 100) -> List[int]:
    """All checkpoints <= n_max (0, 1, 2, ..., see :func:`next_checkpoint`)."""
    out, s = [], 0
    while s <= n_max:
        out.append(s)
        s = next_checkpoint(s, rate, spacing)
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


def fc_features(weights: Sequence[torch.Tensor], x: torch.Tensor, sigma, dsigma):
    """Per-layer NTK features (A_l, D_l) of a scalar-output FC net given as a list of 2-D weights.

    Same maths as :meth:`ntk_fast.models.fc.FCNet.features` (k = 1, no biases): a0 = x/sqrt(d),
    a(l) = sigma(z(l))/sqrt(h), D_L = 1, D_(l-1) = (D_l W(l)) o sigma'(z(l))/sqrt(h).
    """
    d, h = weights[0].shape[1], weights[0].shape[0]
    L = len(weights) - 1
    A = [x / math.sqrt(d)]
    ds = []
    for l in range(L):
        z = A[-1] @ weights[l].t()
        ds.append(dsigma(z))
        A.append(sigma(z) / math.sqrt(h))
    delta = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
    D = [delta]
    for l in range(L, 0, -1):
        delta = (delta @ weights[l]) * (ds[l - 1] / math.sqrt(h))
        D.append(delta)
    D.reverse()
    return A, D


def gram_from_features(A: Sequence[torch.Tensor], D: Sequence[torch.Tensor]) -> torch.Tensor:
    """Theta = sum_l (D_l D_l^T) o (A_l A_l^T), (m, m), through the fused Gram op (:func:`ntk_fast.ops.gram.gram`,
    which falls back to plain torch without the extension).  Cost: m^2 sum_l (fan_in_l + fan_out_l) flops."""
    from ntk_fast.ops.gram import gram
    return gram(list(A), list(D))


def kernel_change(theta: torch.Tensor, theta0: torch.Tensor) -> float:
    """|Theta - Theta0|_F / |Theta0|_F."""
    return float(torch.linalg.norm((theta - theta0).double()) / torch.linalg.norm(theta0.double()))


def first_crossing(ts: Sequence[float], values: Sequence[float], level: float) -> float:
    """First t with value <= level (NaN if never): e.g. t1 = first t with mean loss <= half its initial value."""
    for t, v in zip(ts, values):
        if v <= level:
            return float(t)
    return math.nan
