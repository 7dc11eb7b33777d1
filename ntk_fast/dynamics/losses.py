"""Margin losses l(u) of the signed output u = y F(x), with their derivatives.

    softhinge:  l(u) = softplus(beta_l (1 - u)) / beta_l,      l'(u) = -sigmoid(beta_l (1 - u))   (beta_l = 20)
    qhinge:     l(u) = 0.5 relu(1 - u)^2,                      l'(u) = -relu(1 - u)
    mse:        l(u) = 0.5 (1 - u)^2,                          l'(u) = u - 1
                (for labels y = +-1 this is 0.5 (F - y)^2, the square loss; it has no margin stop)

The training loss of the alpha-scaled model is  L(w) = 1/(alpha^2 n) sum_i l(y_i F(x_i)).
Both the trainer and the frozen-kernel solver take their loss from here (one implementation).
"""
from __future__ import annotations

from typing import Callable, Tuple

import torch

LOSSES = ("softhinge", "qhinge", "mse")


def softhinge(u: torch.Tensor, beta: float = 20.0) -> torch.Tensor:
    """softplus(beta (1 - u)) / beta, evaluated stably (log(1 + e^x) = logaddexp(0, x))."""
    x = beta * (1.0 - u)
    return torch.logaddexp(torch.zeros_like(x), x) / beta


def softhinge_prime(u: torch.Tensor, beta: float = 20.0) -> torch.Tensor:
    """d/du softhinge(u) = -sigmoid(beta (1 - u))."""
    return -torch.sigmoid(beta * (1.0 - u))


def qhinge(u: torch.Tensor, beta: float = 0.0) -> torch.Tensor:
    """0.5 relu(1 - u)^2 (beta unused)."""
    return 0.5 * torch.relu(1.0 - u) ** 2


def qhinge_prime(u: torch.Tensor, beta: float = 0.0) -> torch.Tensor:
    """d/du qhinge(u) = -relu(1 - u)."""
    return -torch.relu(1.0 - u)


def mse(u: torch.Tensor, beta: float = 0.0) -> torch.Tensor:
    """0.5 (1 - u)^2 (beta unused); equals 0.5 (F - y)^2 for y = +-1 and u = y F."""
    return 0.5 * (1.0 - u) ** 2


def mse_prime(u: torch.Tensor, beta: float = 0.0) -> torch.Tensor:
    """d/du mse(u) = u - 1."""
    return u - 1.0


def get_loss(name: str) -> Tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:
    """(l, l') for a loss name in LOSSES; both take (u, beta)."""
    if name == "softhinge":
        return softhinge, softhinge_prime
    if name == "qhinge":
        return qhinge, qhinge_prime
    if name == "mse":
        return mse, mse_prime
    raise ValueError(f"loss must be one of {LOSSES}, got {name!r}")
