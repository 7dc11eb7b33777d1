"""ADAM and SGD (with momentum) on the rows of a flat (K, P) parameter buffer, one optimizer state per row.

Each row follows exactly the update of ``torch.optim.Adam`` / ``torch.optim.SGD`` (their single-tensor CPU
implementations, no weight decay), written with the same torch ops in the same order, so a row's trajectory
equals the torch optimizer's on the same gradients bit for bit.  Rows that are not active (a stopped model)
are left alone, state included.

    Adam (step s = 1, 2, ...):  m <- lerp(m, g, 1 - b1);  v <- b2 v + (1 - b2) g^2
                                w <- w - (lr / (1 - b1^s)) m / (sqrt(v) / sqrt(1 - b2^s) + eps)
    SGD:                        buf <- g (first step), mu buf + (1 - dampening) g (after)
                                w <- w - lr (g + mu buf if nesterov else buf)
"""
from __future__ import annotations

import math
from typing import Dict, Sequence

import torch


class RowAdam:
    def __init__(self, W: torch.Tensor, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8):
        self.lr, self.b1, self.b2, self.eps = float(lr), float(betas[0]), float(betas[1]), float(eps)
        self.m = torch.zeros_like(W)
        self.v = torch.zeros_like(W)
        self.steps = [0] * W.shape[0]

    def step(self, W: torch.Tensor, G: torch.Tensor, rows: Sequence[int]) -> None:
        for k in rows:
            self.steps[k] += 1
            s = self.steps[k]
            m, v, g, w = self.m[k], self.v[k], G[k], W[k]
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
            d_p = G[k]
            if self.buf is not None:
                b = self.buf[k]
                if self.steps[k] == 1:
                    b.copy_(d_p)
                else:
                    b.mul_(self.mu).add_(d_p, alpha=1 - self.damp)
                d_p = d_p.add(b, alpha=self.mu) if self.nesterov else b
            W[k].add_(d_p, alpha=-self.lr)

    def state(self) -> Dict:
        return {"buf": None if self.buf is None else self.buf.cpu().clone(), "steps": list(self.steps)}

    def load(self, st: Dict) -> None:
        if self.buf is not None:
            self.buf.copy_(st["buf"])
        self.steps = list(st["steps"])
