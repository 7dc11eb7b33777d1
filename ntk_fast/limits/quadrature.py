"""Gaussian expectations of the activation: the two integrals of the infinite-width recursion.

For (u, v) centred Gaussian with Var u = q1, Var v = q2, corr(u, v) = rho, write
u = sqrt(q1) z1 and v = sqrt(q2) (rho z1 + sqrt(1 - rho^2) z2) with z1, z2 iid N(0, 1); then

    E[f(u) g(v)] = sum_a sum_b w_a w_b f(sqrt(q1) x_a) g(sqrt(q2) (rho x_a + sqrt(1 - rho^2) x_b))

for a one-dimensional rule (x_a, w_a) of the standard normal (weights summing to 1), applied on a product grid
(m^2 nodes per expectation).  Two rules:

* ``"hermite"``: m-point Gauss-Hermite (probabilists'), nodes and weights by Golub-Welsch (stable for large m).
* ``"trapezoid"`` (default): m equispaced nodes on [-9, 9] with weights proportional to phi(x_a).  For an
  integrand analytic in the strip |Im z| < delta the error falls like exp(-2 pi delta / step); softplus(beta z)
  and sigmoid(beta z) have poles at Im z = pi / beta, and this rule needs about 2.5x fewer nodes per axis than
  Gauss-Hermite for the same error (beta = 5, error 1e-9: m = 96 against m = 256; measured, docs/limits.md).

The order is chosen for a stated absolute error ``tol`` by :func:`choose_order`: m grows by a factor 1.25 from
16 until two successive orders agree to ``tol`` on a set of probe correlations (rho in [-1, 1], including
+-0.999) and variances (the smallest and largest the recursion meets).  Non-smooth activations (a custom ReLU)
converge only algebraically; the order is then capped at ``max_order`` with a warning.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence, Tuple, Union

import numpy as np
import torch

from ntk_fast.models.fc import activation_and_derivative, activation_normaliser
from ntk_fast.ops.reference_limits import product_rule

RULES = ("trapezoid", "hermite")
NATIVE = ("relu", "softplus", "tanh")   # activations the C++ op evaluates itself (FCNet's, normalised)
TRAPEZOID_HALF_WIDTH = 9.0               # phi(9) = 2.6e-18: truncation is below float64 rounding

Fn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Activation:
    """An activation sigma and its derivative as torch functions.

    ``name`` is one of NATIVE for FCNet's normalised activations (``c`` and ``beta`` then describe it exactly:
    sigma(z) = c relu(z), c softplus(beta z) / beta or c tanh(z)), or "custom" for a user function.
    """
    name: str
    sigma: Fn
    dsigma: Fn
    c: float = 1.0
    beta: float = 0.0

    @property
    def native(self) -> bool:
        return self.name in NATIVE


def _autograd_derivative(fn: Fn) -> Fn:
    def d(z: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            zz = z.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(fn(zz).sum(), zz)
        return g.detach()
    return d


def resolve_activation(activation: Union[str, Fn, Tuple[Fn, Fn]], beta: float = 5.0) -> Activation:
    """A string (FCNet's normalised "relu", "softplus" (with beta), "tanh"), a callable sigma (its derivative
    by autograd) or a pair (sigma, dsigma).  Custom functions are used as given (no normalisation)."""
    if isinstance(activation, str):
        if activation not in NATIVE:
            raise ValueError(f"limit_kernels: activation must be one of {NATIVE}, a callable or a pair "
                             f"(sigma, dsigma), got {activation!r}")
        if activation == "softplus" and not (isinstance(beta, (int, float)) and beta > 0 and math.isfinite(beta)):
            raise ValueError(f"limit_kernels: beta must be a finite number > 0, got {beta!r}")
        s, ds = activation_and_derivative(activation, float(beta))
        return Activation(activation, s, ds, activation_normaliser(activation, float(beta)),
                          float(beta) if activation == "softplus" else 0.0)
    if isinstance(activation, tuple) and len(activation) == 2 and all(callable(a) for a in activation):
        return Activation("custom", activation[0], activation[1])
    if callable(activation):
        return Activation("custom", activation, _autograd_derivative(activation))
    raise ValueError(f"limit_kernels: activation must be a name in {NATIVE}, a callable or a pair "
                     f"(sigma, dsigma), got {type(activation).__name__}")


def normal_rule(m: int, rule: str = "trapezoid") -> Tuple[torch.Tensor, torch.Tensor]:
    """(nodes, weights) float64 of an m-point rule for E[F(z)], z ~ N(0, 1); weights sum to 1."""
    if rule not in RULES:
        raise ValueError(f"limit_kernels: rule must be one of {RULES}, got {rule!r}")
    if not isinstance(m, int) or m < 2:
        raise ValueError(f"limit_kernels: quadrature order must be an int >= 2, got {m!r}")
    if rule == "hermite":
        k = np.sqrt(np.arange(1, m, dtype=np.float64))
        x, vec = np.linalg.eigh(np.diag(k, 1) + np.diag(k, -1))   # Golub-Welsch: Jacobi matrix of He_k
        w = vec[0] ** 2
    else:
        x = np.linspace(-TRAPEZOID_HALF_WIDTH, TRAPEZOID_HALF_WIDTH, m)
        w = np.exp(-0.5 * x * x)
    return torch.from_numpy(x.copy()), torch.from_numpy(w / w.sum())


def bivariate_expectations(act: Activation, q1: torch.Tensor, q2: torch.Tensor, rho: torch.Tensor,
                           nodes: torch.Tensor, weights: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(E[sigma(u) sigma(v)], E[sigma'(u) sigma'(v)]) for float64 tensors q1, q2, rho of one shape
    (the product rule of the module docstring; m^2 evaluations per entry)."""
    return product_rule(act.sigma, act.dsigma, q1, q2, rho, nodes, weights)


def second_moment(act: Activation, q: torch.Tensor, nodes: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """E[sigma(sqrt(q) z)^2] per entry of q (the product rule at rho = 1 reduces to this one-dimensional sum)."""
    q = q.to(torch.float64)
    u = q.reshape(-1, 1).sqrt() * nodes.to(torch.float64)[None, :]
    return (act.sigma(u) ** 2 @ weights.to(torch.float64)).reshape(q.shape)


def choose_order(act: Activation, q_probe: Sequence[float], tol: float, rule: str = "trapezoid",
                 max_order: int = 512, start: int = 16) -> int:
    """Smallest m in 16, 20, 25, 31, ... whose expectations agree with the next order's to ``tol`` (absolute)
    on probe correlations in [-1, 1] and the variances ``q_probe``.  Cost: a few probes times m^2."""
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"limit_kernels: quad_tol must be > 0, got {tol!r}")
    rho = torch.tensor([-1.0, -0.999, -0.7, -0.3, 0.0, 0.4, 0.8, 0.95, 0.999, 1.0], dtype=torch.float64)
    qs = sorted({float(q) for q in q_probe if q > 0}) or [1.0]
    qv = torch.tensor(qs, dtype=torch.float64)
    q1 = qv.repeat_interleave(rho.numel())
    r = rho.repeat(len(qs))

    def values(m: int) -> torch.Tensor:
        x, w = normal_rule(m, rule)
        return torch.cat(bivariate_expectations(act, q1, q1, r, x, w))

    m, prev = start, values(start)
    while True:
        nxt = int(round(m * 1.25))
        if nxt > max_order:
            warnings.warn(f"limit_kernels: quadrature did not reach quad_tol={tol:g} by order {max_order} "
                          f"(the activation is probably not smooth); using order {m}", RuntimeWarning,
                          stacklevel=3)
            return m
        cur = values(nxt)
        if float((cur - prev).abs().max()) <= tol:
            return m            # its error is estimated by |E_m - E_next| <= tol
        m, prev = nxt, cur
