"""The losses of the trainer and of the frozen-kernel solver (one definition; the C++ ops mirror it in
``csrc/common/loss.h``).

Margin losses, labels y in {-1, +1}, signed output u = y F:

    softhinge:  l = softplus(beta (1 - u)) / beta        dl/du = -sigmoid(beta (1 - u))      (beta = 20)
    qhinge:     l = 0.5 relu(1 - u)^2                    dl/du = -relu(1 - u)
    hinge:      l = relu(1 - u)                          dl/du = -[u < 1]
                (the plain hinge of the paper's ADAM runs)

and dl/dF = y dl/du.  They have a margin stop: training ends when y_i F_i >= 1 for every i.

Residual loss, real-valued targets y:

    mse:        l = 0.5 (F - y)^2                        dl/dF = F - y      (no margin stop)

The training loss of the alpha-scaled model is  L(w) = 1/(alpha^2 n) sum_i l(F(x_i), y_i).
"""
from __future__ import annotations

from typing import Tuple

import torch

MARGIN_LOSSES = ("softhinge", "qhinge", "hinge")
LOSSES = MARGIN_LOSSES + ("mse",)


def check_loss(loss: str, where: str) -> str:
    """Return ``loss`` when it names a loss, else a ValueError naming ``where``."""
    if loss not in LOSSES:
        raise ValueError(f"{where}: loss must be one of {LOSSES}, got {loss!r}")
    return loss


def is_margin(loss: str) -> bool:
    """True for the margin losses (labels +-1, margin stop), False for mse (real targets)."""
    return check_loss(loss, "is_margin") in MARGIN_LOSSES


def check_targets(y: torch.Tensor, loss: str, name: str, where: str) -> None:
    """Labels must be -1/+1 for the margin losses; targets must be finite for mse.  Errors name ``name``."""
    check_loss(loss, where)
    if not bool(torch.isfinite(y).all()):
        raise ValueError(f"{where}: {name} contains NaN or inf")
    if loss in MARGIN_LOSSES:
        bad = y[(y != 1) & (y != -1)]
        if bad.numel():
            raise ValueError(f"{where}: {name} must hold labels -1 or +1 for the margin loss {loss!r}, found e.g. "
                             f"{float(bad.reshape(-1)[0])} (use loss='mse' for real-valued targets)")


def _softplus(x: torch.Tensor) -> torch.Tensor:
    return torch.logaddexp(torch.zeros_like(x), x)


def loss_value(loss: str, F: torch.Tensor, y: torch.Tensor, beta: float = 20.0) -> torch.Tensor:
    """l(F, y) elementwise (shapes broadcast).  beta is used by softhinge only."""
    if loss == "mse":
        return 0.5 * (F - y) ** 2
    u = y * F
    if loss == "softhinge":
        return _softplus(beta * (1.0 - u)) / beta
    if loss == "qhinge":
        return 0.5 * torch.relu(1.0 - u) ** 2
    if loss == "hinge":
        return torch.relu(1.0 - u)
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


def loss_grad(loss: str, F: torch.Tensor, y: torch.Tensor, beta: float = 20.0) -> torch.Tensor:
    """dl/dF (F, y) elementwise."""
    if loss == "mse":
        return F - y
    u = y * F
    if loss == "softhinge":
        lp = -torch.sigmoid(beta * (1.0 - u))
    elif loss == "qhinge":
        lp = -torch.relu(1.0 - u)
    elif loss == "hinge":
        lp = -(u < 1.0).to(F.dtype)
    else:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    return lp * y


def loss_and_grad(loss: str, F: torch.Tensor, y: torch.Tensor, beta: float = 20.0
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(l, dl/dF) at (F, y)."""
    return loss_value(loss, F, y, beta), loss_grad(loss, F, y, beta)


# ------------------------------------------------------------------ the margin losses as functions of u = y F

def softhinge(u: torch.Tensor, beta: float = 20.0) -> torch.Tensor:
    """softplus(beta (1 - u)) / beta (the reference code's loss of y F)."""
    return _softplus(beta * (1.0 - u)) / beta


def _margin_prime(loss: str):
    return lambda u, beta=20.0: loss_grad(loss, u, torch.ones_like(u), beta)


def get_loss(loss: str):
    """(l(u, beta), dl/du(u, beta)) of a margin loss as functions of u = y F (labels +-1 only)."""
    if loss not in MARGIN_LOSSES:
        raise ValueError(f"get_loss: {loss!r} is not a margin loss {MARGIN_LOSSES}; use loss_value/loss_grad "
                         "with (F, y)")
    return (lambda u, beta=20.0: loss_value(loss, u, torch.ones_like(u), beta)), _margin_prime(loss)
