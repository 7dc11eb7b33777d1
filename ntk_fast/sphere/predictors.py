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

Predictors on test points: the trained net (``fit_net``: full-batch heavy-ball gradient descent on all the
weights, in float64, stopped at the first step whose training mse is at most a stated target, with a step
lr = eta n / lambda_max(Theta_0) rescaled by tr Theta_0 / tr Theta_t as the kernel grows), kernel regression
(ridgeless) with the infinite-width NTK (``limit_kernels(L=1, "relu", bias=1.0)``) and (ridge 1e-10 mean diag)
with the empirical NTK of the same net at initialisation.
"""
from __future__ import annotations

import math
import time
from typing import Dict, Optional, Sequence

import torch

from ntk_fast.dynamics.solver import kernel_regression
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


def _check_study_net(net: FCNet) -> None:
    if not (isinstance(net, FCNet) and net.L == 1 and net.k == 1 and net.activation == "relu"
            and net.biases is not None):
        raise ValueError(f"fit_net: net must be the study's FCNet(L=1, k=1, relu, bias > 0) (make_net), got {net!r}")


def _forward(P: Sequence[torch.Tensor], a0: torch.Tensor, b: float, c: float):
    """f on the scaled inputs a0 = x / sqrt(d), with the hidden layer's c relu(z) (c = sqrt(2 / h)) and its mask."""
    W0, B0, W1, B1 = P
    z = torch.addmm(B0 * b, a0, W0.T)
    m = (z > 0).to(z.dtype)
    a = z.mul_(m).mul_(c)
    return torch.mv(a, W1[0]) + b * B1[0], a, m


def _ntk_trace(P: Sequence[torch.Tensor], a: torch.Tensor, m: torch.Tensor, q: torch.Tensor, b: float,
               c: float) -> float:
    """tr Theta = sum_i |grad_w f(x_i)|^2 = |a|^2 + sum_ij m_ij (c W1_j)^2 (|a0_i|^2 + b^2) + n b^2."""
    W1 = P[2][0]
    return float(a.pow(2).sum() + torch.mv(m, (c * W1).pow(2)).dot(q) + a.shape[0] * b * b)


def _grads(P: Sequence[torch.Tensor], a0: torch.Tensor, a: torch.Tensor, m: torch.Tensor, g: torch.Tensor,
           b: float, c: float):
    """Gradients of sum_i g_i f(x_i) with respect to (W0, B0, W1, B1)."""
    delta = torch.outer(g, c * P[2][0]).mul_(m)
    return (delta.T @ a0, b * delta.sum(0), (g @ a).unsqueeze(0), (b * g.sum()).reshape(1))


def fit_net(net: FCNet, u: torch.Tensor, y: torch.Tensor, u_test: torch.Tensor, alpha: float, *,
            K0: Optional[torch.Tensor] = None, eta: float = 1.0, momentum: float = 0.9, target_mse: float = 0.0,
            max_steps: int = 20000, max_wall: float = 60.0) -> Dict[str, object]:
    """Full-batch heavy-ball gradient descent of F = alpha (f - f0) on the loss
    L = (1/alpha^2) mean_i (F_i - y_i)^2 / 2, until mean (F - y)^2 <= target_mse (status "reached"), or
    max_steps ("max_steps"), max_wall seconds ("max_wall"), a non-finite loss ("nonfinite").

    Step s (w: all weights and biases of ``net``, trained in place; mu = momentum):

        v <- mu v + grad_w L,   w <- w - lr_s v,   lr_s = eta n / lambda_max(K0) * tr K0 / tr K_s

    K_s: the empirical NTK of f at step s (its trace is exact and cheap, see _ntk_trace; K0 is computed when
    None).  In function space dF = -(lr / n) K r, so lr lambda_max / n = eta; heavy ball on a quadratic is stable
    for lr lambda_max / n < 2 (1 + mu), and with mu close to 1 the slow modes converge at the rate
    lr lambda / (n (1 - mu)) per step instead of lr lambda / n (sqrt(condition number) steps for the well-tuned
    method).  The factor tr K0 / tr K_s keeps the step stable when the kernel grows (the feature regime: it grows
    by 10 .. 200 times here); in the lazy regime it stays ~1.  momentum = 0 is plain gradient descent.
    The loss is computed at every step, so the stop is at the first iterate with mean (F - y)^2 <= target_mse.
    Returns {"pred": F on u_test (m,), "train_mse", "steps", "wall", "status", "lr" (first), "lr_last"}.
    """
    _check_study_net(net)
    for name, v in (("eta", eta), ("max_wall", max_wall)):
        if not v > 0:
            raise ValueError(f"fit_net: {name} must be > 0, got {v!r}")
    if not 0 <= momentum < 1:
        raise ValueError(f"fit_net: momentum must be in [0, 1), got {momentum!r}")
    if not target_mse >= 0:
        raise ValueError(f"fit_net: target_mse must be >= 0, got {target_mse!r}")
    x, xt = to_net_inputs(u), to_net_inputs(u_test, "u_test")
    y = y.to(torch.float64)
    n, d = x.shape
    if K0 is None:
        K0 = empirical_ntk(net, x)
    P = [net.weights[0], net.biases[0], net.weights[1], net.biases[1]]
    b, c = net.bias_scale, math.sqrt(2.0 / net.h)
    a0, at = x / math.sqrt(d), xt / math.sqrt(d)
    q = a0.pow(2).sum(1) + b * b
    t0 = time.perf_counter()
    with torch.no_grad():
        P = [p.data for p in P]
        f0, a, m = _forward(P, a0, b, c)
        f0_test = _forward(P, at, b, c)[0]
        lr0 = eta * n / float(torch.linalg.eigvalsh(K0)[-1])
        tr0 = _ntk_trace(P, a, m, q, b, c)
        V = [torch.zeros_like(p) for p in P]
        status, step, lr = "running", 0, lr0
        while True:
            f, a, m = _forward(P, a0, b, c)
            r = alpha * (f - f0) - y
            mse = float(r.pow(2).mean())
            status = ("nonfinite" if not math.isfinite(mse) else "reached" if mse <= target_mse
                      else "max_steps" if step >= max_steps else "max_wall" if time.perf_counter() - t0 > max_wall
                      else "running")
            if status != "running":
                break
            lr = lr0 * tr0 / _ntk_trace(P, a, m, q, b, c)
            for p, v, gr in zip(P, V, _grads(P, a0, a, m, r / (alpha * n), b, c)):
                p.sub_(v.mul_(momentum).add_(gr), alpha=lr)
            step += 1
        pred = alpha * (_forward(P, at, b, c)[0] - f0_test)
    return {"pred": pred, "train_mse": mse, "steps": step, "wall": time.perf_counter() - t0, "status": status,
            "lr": lr0, "lr_last": lr}
