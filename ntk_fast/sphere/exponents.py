"""Predicted learning-curve exponents (spectral-bias ansatz, derivation in docs/sphere.md) and power-law fits.

A predictor f^n(x) = sum_j g_j phi(x . y_j) whose profile phi has Gegenbauer coefficients phi_k ~ k^-a, learning
a field with power c_k ~ k^-(2 nu_t + d - 1) from n points, has test error eps(n) ~ n^-beta with

    beta = min(2 nu_t, 2 a) / (d - 1)

    lazy (NTK of the ReLU net, Theta_k ~ k^-d):                  a = d,           beta = min(2 nu_t, 2 d) / (d - 1)
    feature (sparse ReLU atoms, sigma_k ~ k^-(d + 2) / 2):       a = (d + 2)/2,   beta = min(2 nu_t, d + 2) / (d - 1)
"""
from __future__ import annotations

import math
from typing import Dict, Sequence

import numpy as np

__all__ = ["predicted_exponents", "fit_exponent"]


def predicted_exponents(d: int, nu_t: float) -> Dict[str, float]:
    """{"lazy": beta_lazy, "feature": beta_feature} for the ReLU net on S^{d-1} (module docstring)."""
    if d < 2 or not nu_t > 0:
        raise ValueError(f"predicted_exponents: need d >= 2 and nu_t > 0, got d={d}, nu_t={nu_t}")
    return {"lazy": min(2 * nu_t, 2 * d) / (d - 1), "feature": min(2 * nu_t, d + 2) / (d - 1)}


def fit_exponent(ns: Sequence[float], errors: np.ndarray) -> Dict[str, float]:
    """Fit log eps = log A - beta log n by least squares.

    errors: (draws, len(ns)) test errors.  beta: the fit to the mean over draws; beta_err: the standard error of
    the per-draw slopes (std / sqrt(draws), 0 for one draw)."""
    e = np.atleast_2d(np.asarray(errors, dtype=np.float64))
    ln = np.log(np.asarray(ns, dtype=np.float64))
    if e.shape[1] != ln.size or ln.size < 2 or not np.all(e > 0):
        raise ValueError("fit_exponent: need >= 2 sizes and positive errors shaped (draws, len(ns))")
    slope = lambda v: float(np.polyfit(ln, np.log(v), 1)[0])  # noqa: E731
    per = np.array([-slope(r) for r in e])
    err = float(per.std(ddof=1) / math.sqrt(len(per))) if len(per) > 1 else 0.0
    return {"beta": -slope(e.mean(axis=0)), "beta_err": err, "per_draw": per.tolist()}
