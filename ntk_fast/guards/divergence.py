"""Divergence monitor: the loss of a gradient flow with a PSD kernel never grows; one that grows diverges.

For dF/dt = -(1/n) Theta r(F) with Theta PSD, dL/dt = -(1/n^2) r^T Theta r <= 0 (r = dL/dF n).  Euler steps
accepted by the step rule follow the flow closely, so the loss at accepted steps decreases up to rounding.
The monitor keeps the losses of the last ``window`` accepted steps and reports "diverging" when

    every one of them is >= the one before  and  last > (1 + rtol) first + atol,

i.e. the loss rose steadily over the whole window (an indefinite or negative kernel, a sign error).
Defaults: window = 50 accepted steps, rtol = 1e-6, atol = 1e-12.  Cost O(1) per step.
"""
from __future__ import annotations

from collections import deque
import math

__all__ = ["DivergenceMonitor", "DIVERGING"]

DIVERGING = "diverging"


class DivergenceMonitor:
    """Call :meth:`update` with the loss after each accepted step; it returns True once the run diverges."""

    def __init__(self, window: int = 50, rtol: float = 1e-6, atol: float = 1e-12):
        if window < 2:
            raise ValueError(f"DivergenceMonitor: window must be >= 2, got {window}")
        self.window, self.rtol, self.atol = int(window), float(rtol), float(atol)
        self.losses: deque = deque(maxlen=self.window)
        self.rising = 0        # number of consecutive non-decreasing steps

    def update(self, loss: float) -> bool:
        """Record the loss of one accepted step; True when the last ``window`` losses rose steadily."""
        loss = float(loss)
        if not math.isfinite(loss):
            return False       # non-finite states have their own status ("nonfinite")
        if self.losses and loss >= self.losses[-1]:
            self.rising += 1
        else:
            self.rising = 0
        self.losses.append(loss)
        if self.rising < self.window - 1:
            return False
        first = self.losses[0]
        return loss > (1.0 + self.rtol) * first + self.atol
