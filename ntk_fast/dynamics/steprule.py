"""The adaptive time step of the paper's gradient flow (shared by the trainer and the kernel solver).

A trial step of size dt is made from the state (w or F) with gradient g; g' is the gradient after it.

    dgrad = |g - g'|^2 / (|g| |g'|)         (0 when |g| or |g'| is 0)
    dout  = max_i |F'(x_i) - F(x_i)|

accept  iff dgrad < max_dgrad and dout < max_dout; after an accepted step dt *= grow when both are below
grow_fraction times their bounds; a rejected step is undone and dt /= shrink.  dt starts at 1.
Defaults: max_dgrad = 1e-4, max_dout = 0.1, grow = 1.1, shrink = 10, grow_fraction = 0.5 (the paper's
reference code uses 0.5 for the network and 0.1 for its kernel dynamics).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple


@dataclass(frozen=True)
class StepRule:
    max_dgrad: float = 1e-4
    max_dout: float = 0.1
    grow: float = 1.1
    shrink: float = 10.0
    grow_fraction: float = 0.5

    def __post_init__(self):
        for name in ("max_dgrad", "max_dout"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise ValueError(f"StepRule: {name} must be a positive finite number, got {v}")
        if not self.grow >= 1.0:
            raise ValueError(f"StepRule: grow must be >= 1, got {self.grow}")
        if not self.shrink > 1.0:
            raise ValueError(f"StepRule: shrink must be > 1, got {self.shrink}")
        if not 0.0 < self.grow_fraction <= 1.0:
            raise ValueError(f"StepRule: grow_fraction must be in (0, 1], got {self.grow_fraction}")

    def decide(self, dgrad: float, dout: float, dt: float) -> Tuple[bool, float]:
        """Return (accepted, dt for the next attempt).  Non-finite dgrad/dout count as a rejection."""
        if dgrad < self.max_dgrad and dout < self.max_dout:
            if dgrad < self.grow_fraction * self.max_dgrad and dout < self.grow_fraction * self.max_dout:
                return True, dt * self.grow
            return True, dt
        return False, dt / self.shrink


def dgrad_from_norms(g_sq: float, gp_sq: float, diff_sq: float) -> float:
    """dgrad = |g - g'|^2 / (|g| |g'|) from the squared norms |g|^2, |g'|^2, |g - g'|^2 (0 if a norm is 0)."""
    # not sqrt(g_sq * gp_sq): that product underflows to 0 for gradients below ~1e-160 (a margin loss far past
    # its margins), and the division then raised
    denom = math.sqrt(g_sq) * math.sqrt(gp_sq)
    if denom == 0.0:
        return 0.0
    return diff_sq / denom
