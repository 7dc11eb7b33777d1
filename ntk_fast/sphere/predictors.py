"""The one-hidden-layer ReLU net of the sphere study and its four predictors (docs/sphere.md).

Model: ``FCNet(d, h, L=1, activation="relu", bias=1.0)`` on inputs of norm sqrt(d) (x = sqrt(d) u, u on the
unit sphere): f(u) = W_1 sigma(W_0 u + B_0) / sqrt(h) + B_1 with sigma = sqrt(2) relu, zero-initialised biases
B_0 (h,), B_1 (1,) (the bias choice: their NTK terms b^2 E[sigma'(u) sigma'(v)] and b^2 give the kernel every
harmonic degree; without them the ReLU NTK vanishes on the odd degrees >= 3).  Trained as F = alpha (f - f0)
on the loss (1/alpha^2) mean_i (F(u_i) - y_i)^2 / 2.  The slides' net
f_xi = H^-(1 - xi/2) sum_h (w_h relu(theta_h . u) - xi w_h^0 relu(theta_h^0 . u)) is F (biases aside) with

    xi = 1 (lazy):     alpha = 1 / sqrt(2)            (alpha sqrt(h) = sqrt(h / 2))
    xi = 0 (feature):  alpha = 1 / sqrt(2 h)          (alpha sqrt(h) = 1 / sqrt(2)); F also subtracts
                       alpha f0 = O(h^-1/2), which vanishes as h -> infinity
    and their gradient-descent time t_xi = t / alpha^2 (t: the trainer's time, in which the kernel dynamics does
    not depend on alpha).

Predictors on test points: the trained net (``fit_net``: full-batch gradient descent, ntk_fast.train with
dynamics="sgd", batch_size = n, lr = eta n / lambda_max(Theta_0) for the empirical NTK Theta_0 at
initialisation), kernel regression (ridgeless) with the infinite-width NTK (``limit_kernels(L=1, "relu",
bias=1.0)``) and (ridge 1e-10 mean diag) with the empirical NTK of the same net at initialisation.
"""
from __future__ import annotations

import math
import time
from typing import Dict, Optional

import torch

from ntk_fast.dynamics.solver import kernel_regression
from ntk_fast.dynamics.trainer import train
from ntk_fast.limits import limit_kernels
from ntk_fast.models.fc import FCNet
from ntk_fast.ntk.empirical import empirical_ntk
from ntk_fast.sphere.field import check_on_sphere

__all__ = ["BIAS", "make_net", "alpha_for_xi", "to_net_inputs", "ntk_inf_regression", "entk_regression", "fit_net"]

BIAS = 1.0


def alpha_for_xi(xi: int, h: int) -> float:
    """alpha of F = alpha (f - f0) matching the slides' f_xi (module docstring): 1/sqrt(2) or 1/sqrt(2 h)."""
    if xi not in (0, 1):
        raise ValueError(f"alpha_for_xi: xi must be 0 (feature) or 1 (lazy), got {xi!r}")
    return 1.0 / math.sqrt(2.0) if xi == 1 else 1.0 / math.sqrt(2.0 * h)


def make_net(d: int, h: int, seed: int) -> FCNet:
    """The study's net: FCNet(d, h, L=1, relu, bias=1.0), float64, weights from torch.Generator(seed)."""
    return FCNet(d, h, 1, activation="relu", bias=BIAS, dtype=torch.float64,
                 generator=torch.Generator().manual_seed(seed))


def to_net_inputs(u: torch.Tensor, name: str = "u") -> torch.Tensor:
    """Unit-sphere points u (n, d) -> FCNet's inputs sqrt(d) u (ValueError if u is off the unit sphere)."""
    check_on_sphere(u, name)
    return u.to(torch.float64) * math.sqrt(u.shape[1])


def ntk_inf_regression(u: torch.Tensor, y: torch.Tensor, u_test: torch.Tensor) -> torch.Tensor:
    """Ridgeless kernel regression with the h -> infinity NTK of the net: predictions on u_test (m,)."""
    x, xt = to_net_inputs(u), to_net_inputs(u_test, "u_test")
    _, K = limit_kernels(x, L=1, activation="relu", bias=BIAS)
    _, Kt = limit_kernels(xt, x, L=1, activation="relu", bias=BIAS)
    return kernel_regression(K, y.to(torch.float64), K_test=Kt).F_test


def entk_regression(net: FCNet, u: torch.Tensor, y: torch.Tensor, u_test: torch.Tensor,
                    ridge_rel: float = 1e-10) -> Dict[str, object]:
    """Kernel regression with the empirical NTK of ``net`` and the ridge ridge_rel * mean(diag K) (the finite
    net's Gram has rank <= P, the parameter count, so n close to P needs it; -> the minimum-norm interpolant
    as ridge_rel -> 0).  Returns {"pred": (m,), "K": the (n, n) Gram, "residual": relative training residual}."""
    x, xt = to_net_inputs(u), to_net_inputs(u_test, "u_test")
    K = empirical_ntk(net, x)
    Kt = empirical_ntk(net, xt, x)
    r = kernel_regression(K, y.to(torch.float64), ridge=ridge_rel * float(K.diagonal().mean()), K_test=Kt,
                          on_unsolved="status")
    return {"pred": r.F_test, "K": K, "residual": float(((r.F_train - y) ** 2).sum() / (y ** 2).sum()) ** 0.5}


def fit_net(net: FCNet, u: torch.Tensor, y: torch.Tensor, u_test: torch.Tensor, alpha: float, *,
            K0: Optional[torch.Tensor] = None, eta: float = 0.5, max_steps: int = 20000,
            max_wall: float = 60.0) -> Dict[str, object]:
    """Full-batch gradient descent of F = alpha (f - f0) on the square loss; stops at max_steps or max_wall.

    K0: the empirical NTK of net on u (computed when None) for the step size lr = eta n / lambda_max(K0).
    Returns {"pred": F on u_test (m,), "train_mse": mean (F - y)^2 on u, "steps", "wall", "status", "lr"}.
    """
    x, xt = to_net_inputs(u), to_net_inputs(u_test, "u_test")
    n = x.shape[0]
    if K0 is None:
        K0 = empirical_ntk(net, x)
    lr = eta * n / float(torch.linalg.eigvalsh(K0)[-1])
    t0 = time.perf_counter()
    r = train(net, x, y.to(torch.float64), alpha, x_test=xt, y_test=torch.zeros(xt.shape[0], dtype=torch.float64),
              loss="mse", dynamics="sgd", lr=lr, batch_size=n, max_steps=max_steps, max_wall=max_wall,
              progress=False)
    F_train, F_test = r.F_train[0], r.F_test[0]
    return {"pred": F_test, "train_mse": float(((F_train - y) ** 2).mean()), "steps": int(r.final[0]["step"]),
            "wall": time.perf_counter() - t0, "status": r.final[0].get("status", r.status), "lr": lr}
