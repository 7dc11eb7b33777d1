"""The Theta operator of kernel_flow: what one attempt of the frozen-kernel flow does with Theta.

An operator has ``n``, ``dtype``, ``device``, ``rank`` (only rank 0 writes checkpoints and shows a bar) and

    step(Y, F, g, r, c, dt, active, loss, beta, clock) -> (F', r', g', c', stats (E, 7) float64)

with the formula and statistics of ``ntk_fast.ops.kernel_flow_step`` (F' = F - dt g, r' = l'(F', y),
c' = c + dt r / n, g' = Theta r' / n), plus ``fingerprint()`` (resume check) and ``agreed_wall(local)``
(the elapsed seconds the max_wall limit uses: the same number on every rank).

Two operators:

* :class:`InMemoryTheta` (the default): Theta as a tensor (n, n) / (E, n, n) or tile-packed, one call of
  the fused op per attempt (one read of the upper half of Theta);
* ``ntk_fast.distributed.flow.RowShard``: Theta in a ``.npy`` file (or numpy memmap), read by row blocks;
  under a torch.distributed process group each rank reads only its rows and one all-reduce combines them.
"""
from __future__ import annotations

from typing import List, Tuple

import torch

from ntk_fast.ops.kernel_flow import kernel_flow_step


class InMemoryTheta:
    """Theta held by the solver as a tensor: dense (n, n) / (E, n, n), or packed (``packed_block`` > 0)."""

    rank = 0

    def __init__(self, theta: torch.Tensor, n: int, packed_block: int, step_block: int):
        self.theta, self.n = theta, n
        self.packed_block, self.step_block = packed_block, step_block
        self.dtype, self.device = theta.dtype, theta.device

    def step(self, y, f, g, r, c, dt, active, loss: str, beta: float, clock: float = 0.0
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One attempt: ``ntk_fast.ops.kernel_flow_step`` (arguments checked by the solver)."""
        return kernel_flow_step(self.theta, y, f, g, r, c, dt, active, loss, beta, self.packed_block,
                                self.step_block, check=False)

    @staticmethod
    def agreed_wall(local: float) -> float:
        return local


def fingerprint(K: torch.Tensor) -> List[float]:
    """Cheap identity check of a kernel for resume: float64 sums of rows 0, n / 2 and n - 1 (of each kernel)."""
    Kb = K if K.dim() == 3 else K.unsqueeze(0)
    n = Kb.shape[-1]
    rows = sorted({0, n // 2, n - 1})
    return [float(Kb[:, i].double().sum()) for i in rows]
