"""Losses of the alpha-scaled model for the generic trainer, with their prefactors and label rules.

With F = alpha (f(w) - f(w0)) on a batch B of points (the full training set for the flow, a minibatch for
ADAM/SGD) the minimised loss is

    L(w) = c(alpha) / |B| sum_{i in B} l_i,     l_i = l(y_i F_i)  (margin losses)  or  0.5 (F_i - y_i)^2  (mse)

    loss        l(u)                               c(alpha)     labels       margin stop
    softhinge   softplus(beta_l (1 - u)) / beta_l  1/alpha^2    {-1, +1}     yes
    qhinge      0.5 relu(1 - u)^2                  1/alpha^2    {-1, +1}     yes
    hinge       relu(1 - u)                        1/alpha      {-1, +1}     yes
    mse         0.5 (F - y)^2                      1/alpha^2    real         only when every y is -1 or +1

The per-point losses are those of :mod:`ntk_fast.dynamics.losses` (one definition, also the fused FC trainer's
and the C++ ops'), so the generic flow minimises the same L as :func:`ntk_fast.dynamics.trainer.train`; this
module adds the prefactor c(alpha) and the label rule.

``hinge`` is the loss of the paper's ADAM runs.  Reference code (feature_lazy, article:main_adam.py) next to this
one, in its own units (alpha_code, f_code with the 1/h readout, F_code = f_code - f0_code)::

    reference:  loss = relu(1 - alpha_code F_code y).mean() / alpha_code
    here:       loss = relu(1 - y F).mean() / alpha,        F = alpha (f - f0)

These are the same function when the model's output is the reference's f_code and alpha = alpha_code (the
paper's CNN with its 1/h readout).  For a model with a 1/sqrt(h) readout (FCNet), alpha F_code = alpha_code
f_code means alpha = alpha_code / sqrt(h) and the prefactor differs from the reference's by sqrt(h): ADAM is
invariant to a constant factor of the loss up to its eps, so only the time units (and eps) notice.
``loss_prefactor`` overrides c(alpha).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ntk_fast.dynamics.losses import loss_value


@dataclass(frozen=True)
class LossSpec:
    name: str
    per_point: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]   # (F, y, beta) -> l_i
    alpha_power: int                                                          # c(alpha) = alpha^-power
    margin_labels: bool                                                       # labels must be +-1


def _per_point(name: str):
    return lambda F, y, beta: loss_value(name, F, y, beta)


SPECS = {
    "softhinge": LossSpec("softhinge", _per_point("softhinge"), 2, True),
    "qhinge": LossSpec("qhinge", _per_point("qhinge"), 2, True),
    "hinge": LossSpec("hinge", _per_point("hinge"), 1, True),
    "mse": LossSpec("mse", _per_point("mse"), 2, False),
}
GENERIC_LOSSES = tuple(SPECS)


def default_loss(dynamics: str) -> str:
    """The loss when none is given: the soft hinge for the flow, the plain hinge (with 1/alpha) for ADAM/SGD, as
    in the paper's runs."""
    return "softhinge" if dynamics == "flow" else "hinge"


def get_spec(name: str) -> LossSpec:
    if name not in SPECS:
        raise ValueError(f"train: loss must be one of {GENERIC_LOSSES}, got {name!r}")
    return SPECS[name]


def prefactor(spec: LossSpec, alpha: float, override: Optional[float]) -> float:
    """c(alpha) of the table above, or ``override`` (a positive finite number)."""
    if override is None:
        return alpha ** -spec.alpha_power
    c = float(override)
    if not c > 0 or c == float("inf"):
        raise ValueError(f"train: loss_prefactor must be a positive finite number, got {override}")
    return c


def is_pm1(y: torch.Tensor) -> bool:
    return bool(((y == 1) | (y == -1)).all())


def check_labels(spec: LossSpec, y: torch.Tensor, name: str) -> None:
    """Margin losses need labels in {-1, +1}; mse takes any finite target."""
    if not torch.isfinite(y).all():
        raise ValueError(f"train: {name} contains NaN or infinite values")
    if spec.margin_labels and not is_pm1(y):
        bad = y[(y != 1) & (y != -1)][:3].tolist()
        raise ValueError(f"train: loss {spec.name!r} needs labels {name} in {{-1, +1}}, found e.g. {bad} "
                         f"(use loss='mse' for real targets)")
