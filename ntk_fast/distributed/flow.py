"""Kernel dynamics on a Theta split by rows across ranks (building block of issue 16 item 3).

Each rank holds the rows [r0, r1) of Theta (n, n) (read from the on-disk Gram through a memory map, so a
rank reads only its rows, once per use) and the full vectors of the flow, identical on every rank.  One
attempt of the frozen-kernel flow is that of ``ntk_fast.ops.kernel_flow_step`` (same formula, same
statistics), with the product split by rows and combined by one all-reduce:

    f' = f - dt g,   r' = l'(f', y),   c' = c + dt r / n,
    g'[:, r0:r1] = r' Theta[r0:r1, :]^T / n  on each rank,  g' = all_reduce_sum(g' zero-padded)

Every entry of g' has exactly one non-zero contribution, so the sum is exact and every rank gets the same
numbers bit for bit (the step rule then takes the same decisions everywhere).  Cost per rank: 2 E n (r1 - r0)
flops and one all-reduce of E n numbers.

Not wired into :func:`ntk_fast.kernel_flow` yet: its solver calls the op inline (ntk_fast/dynamics/solver.py);
a hook there (a step function or a Theta operator) would let kernel_flow run on a :class:`RowShard`.
"""
from __future__ import annotations

import os
from typing import Tuple

import numpy as np
import torch

from ntk_fast.dynamics.losses import loss_grad, loss_value


def row_range(n: int, rank: int, world: int) -> Tuple[int, int]:
    """Rows [r0, r1) of rank ``rank`` out of ``world``: contiguous, sizes differing by at most one."""
    return rank * n // world, (rank + 1) * n // world


class RowShard:
    """Rows [r0, r1) of a symmetric Theta (n, n); ``product(R)`` = R Theta^T on all ranks (R (E, n))."""

    def __init__(self, rows: torch.Tensor, r0: int, n: int):
        if rows.dim() != 2 or rows.shape[1] != n or not 0 <= r0 <= n - rows.shape[0]:
            raise ValueError(f"RowShard: rows must be (m, {n}) starting at a row in [0, n - m], got "
                             f"{tuple(rows.shape)} at {r0}")
        self.rows, self.r0, self.n = rows, r0, n

    @classmethod
    def from_file(cls, path: "str | os.PathLike[str]") -> "RowShard":
        """This rank's rows of a square Gram stored as ``.npy`` (as written by gram_to_disk), memory-mapped
        (copy-on-write mapping: nothing is ever written back)."""
        from ntk_fast.distributed.comm import rank_world
        arr = np.load(os.fspath(path), mmap_mode="c")
        if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
            raise ValueError(f"RowShard.from_file: {os.fspath(path)} holds shape {arr.shape}, expected a square "
                             f"(n, n) Theta (trace or single-output Gram)")
        rank, world = rank_world()
        r0, r1 = row_range(arr.shape[0], rank, world)
        return cls(torch.from_numpy(arr[r0:r1]), r0, arr.shape[0])

    def product(self, R: torch.Tensor) -> torch.Tensor:
        """R Theta^T (= R Theta, Theta symmetric), (E, n): local rows, then one all-reduce (sum)."""
        out = torch.zeros_like(R)
        r1 = self.r0 + self.rows.shape[0]
        out[:, self.r0:r1] = R @ self.rows.to(dtype=R.dtype, device=R.device).T
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(out)
        return out


def sharded_flow_step(shard: RowShard, y: torch.Tensor, f: torch.Tensor, g: torch.Tensor, r: torch.Tensor,
                      c: torch.Tensor, dt: torch.Tensor, active: torch.Tensor, loss: str = "softhinge",
                      beta: float = 20.0):
    """One attempt of the flow for E problems, as ``ntk_fast.ops.kernel_flow_step`` (returns f', r', g', c',
    stats (E, 7) float64 = [|g|^2, |g'|^2, |g - g'|^2, dt max|g|, min(y o f'), mean l(f', y), max|g'|]), with
    Theta given by this rank's rows.  Collective when a process group is initialised."""
    n = f.shape[1]
    if shard.n != n:
        raise ValueError(f"sharded_flow_step: the shard is of a {shard.n} x {shard.n} Theta, f has {n} entries")
    dtc = dt[:, None]
    fn = f - dtc * g
    rn = loss_grad(loss, fn, y, beta)
    cn = c + dtc * r / n
    gn = shard.product(rn) / n
    g64, gn64 = g.double(), gn.double()
    stats = torch.stack([(g64 ** 2).sum(1), (gn64 ** 2).sum(1), ((g64 - gn64) ** 2).sum(1),
                         dt.double() * g64.abs().amax(1), (y * fn).double().amin(1),
                         loss_value(loss, fn.double(), y.double(), beta).mean(1), gn64.abs().amax(1)], dim=1)
    a = active[:, None]
    return (torch.where(a, fn, f), torch.where(a, rn, r), torch.where(a, gn, g), torch.where(a, cn, c),
            torch.where(a, stats, torch.zeros_like(stats)))
