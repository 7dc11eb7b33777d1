"""ADAM and SGD (with momentum) on the rows of a flat (K, P) parameter buffer, one optimizer state per row.

Each row follows exactly the update of ``torch.optim.Adam`` / ``torch.optim.SGD`` (their single-tensor CPU
implementations, no weight decay), written with the same torch ops in the same order, so a row's trajectory
equals the torch optimizer's on the same gradients bit for bit.  Rows that are not active (a stopped model)
are left alone, state included.  When every row is active at the same step count (the usual case) the update
is one pass of these ops over the whole (K, P) buffer (elementwise: the same numbers as row by row).

    Adam (step s = 1, 2, ...):  m <- lerp(m, g, 1 - b1);  v <- b2 v + (1 - b2) g^2
                                w <- w - (lr / (1 - b1^s)) m / (sqrt(v) / sqrt(1 - b2^s) + eps)
    SGD:                        buf <- g (first step), mu buf + (1 - dampening) g (after)
                                w <- w - lr (g + mu buf if nesterov else buf)
"""
from __future__ import annotations

import math
from typing import Dict, Sequence

import torch


def _all_rows_in_step(rows: Sequence[int], steps: Sequence[int], K: int) -> bool:
    """True when ``rows`` are all K rows and they share one step count (one update over the whole buffer)."""
    return len(rows) == K and all(s == steps[0] for s in steps)


class RowAdam:
    def __init__(self, W: torch.Tensor, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8):
        self.lr, self.b1, self.b2, self.eps = float(lr), float(betas[0]), float(betas[1]), float(eps)
        self.m = torch.zeros_like(W)
        self.v = torch.zeros_like(W)
        self.steps = [0] * W.shape[0]

    def step(self, W: torch.Tensor, G: torch.Tensor, rows: Sequence[int]) -> None:
        for k in rows:
            self.steps[k] += 1
        if _all_rows_in_step(rows, self.steps, W.shape[0]):
            self._update(self.m, self.v, G, W, self.steps[0])
            return
        for k in rows:
            self._update(self.m[k], self.v[k], G[k], W[k], self.steps[k])

    def _update(self, m: torch.Tensor, v: torch.Tensor, g: torch.Tensor, w: torch.Tensor, s: int) -> None:
        """torch.optim.Adam's single-tensor update at step s, in place on (rows of) m, v, w."""
        m.lerp_(g, 1 - self.b1)
        v.mul_(self.b2).addcmul_(g, g.conj(), value=1 - self.b2)
        bc1 = 1 - self.b1 ** s
        bc2 = 1 - self.b2 ** s
        step_size = self.lr / bc1
        denom = (v.sqrt() / math.sqrt(bc2)).add_(self.eps)
        w.addcdiv_(m, denom, value=-step_size)

    def state(self) -> Dict:
        return {"m": self.m.cpu().clone(), "v": self.v.cpu().clone(), "steps": list(self.steps)}

    def load(self, st: Dict) -> None:
        self.m.copy_(st["m"])
        self.v.copy_(st["v"])
        self.steps = list(st["steps"])


class RowSGD:
    def __init__(self, W: torch.Tensor, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False):
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("train: nesterov momentum needs momentum > 0 and dampening = 0")
        self.lr, self.mu, self.damp, self.nesterov = float(lr), float(momentum), float(dampening), bool(nesterov)
        self.buf = torch.zeros_like(W) if momentum != 0 else None
        self.steps = [0] * W.shape[0]

    def step(self, W: torch.Tensor, G: torch.Tensor, rows: Sequence[int]) -> None:
        for k in rows:
            self.steps[k] += 1
        if _all_rows_in_step(rows, self.steps, W.shape[0]):
            self._update(G, W, None if self.buf is None else self.buf, self.steps[0])
            return
        for k in rows:
            self._update(G[k], W[k], None if self.buf is None else self.buf[k], self.steps[k])

    def _update(self, d_p: torch.Tensor, w: torch.Tensor, b, s: int) -> None:
        """torch.optim.SGD's single-tensor update at step s, in place on (rows of) w and the momentum buffer b."""
        if b is not None:
            if s == 1:
                b.copy_(d_p)
            else:
                b.mul_(self.mu).add_(d_p, alpha=1 - self.damp)
            d_p = d_p.add(b, alpha=self.mu) if self.nesterov else b
        w.add_(d_p, alpha=-self.lr)

    def state(self) -> Dict:
        return {"buf": None if self.buf is None else self.buf.cpu().clone(), "steps": list(self.steps)}

    def load(self, st: Dict) -> None:
        if self.buf is not None:
            self.buf.copy_(st["buf"])
        self.steps = list(st["steps"])
