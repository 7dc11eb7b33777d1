"""Row panels of an n1 x n2 Gram, written once for every path (structured op, streamed, Jacobian).

A panel is the rows [r0, r1) against the columns [c0, n2): c0 = 0 in general, c0 = r0 for a symmetric
Gram (x2 = None), where only the upper part is computed and the block right of the diagonal block is
mirrored into the rows below:  out[r1:, r0:r1] = out[r0:r1, r1:]^T.  Diagonal blocks are made exactly
symmetric from their upper triangle (BLAS tiles inside one block need not be).
"""
from __future__ import annotations

from typing import List, NamedTuple

import torch


class Panel(NamedTuple):
    r0: int
    r1: int
    c0: int


def default_full_rows(n1: int) -> int:
    """Rows per panel of the (n1, n2, k, k) full-mode Gram when none are given: eight panels, at least 64 rows."""
    return max(64, -(-n1 // 8))


def row_panels(n1: int, rows: int, symmetric: bool) -> List[Panel]:
    """The panels of ``rows`` rows (the last may be shorter) covering the rows [0, n1)."""
    if rows < 1:
        raise ValueError(f"panel rows must be >= 1, got {rows}")
    return [Panel(r0, min(n1, r0 + rows), r0 if symmetric else 0) for r0 in range(0, n1, rows)]


def mirror_in_place(out: torch.Tensor, p: Panel) -> None:
    """Symmetric Gram whose rows [r0, r1) x [r0, n) are written in ``out``: symmetrise the diagonal block
    and copy the block right of it into the rows below (out[r1:, r0:r1] = out[r0:r1, r1:]^T)."""
    diag = out[p.r0:p.r1, p.r0:p.r1]
    diag.copy_(torch.triu(diag) + torch.triu(diag, 1).transpose(0, 1))
    if p.r1 < out.shape[0]:
        out[p.r1:, p.r0:p.r1] = out[p.r0:p.r1, p.r1:].transpose(0, 1)


def store_panel(out: torch.Tensor, values: torch.Tensor, p: Panel, symmetric: bool) -> None:
    """Write a computed panel (r1 - r0, n2 - c0) into ``out`` (any device or a memmap), mirrored when symmetric."""
    if not symmetric:
        out[p.r0:p.r1, p.c0:].copy_(values)
        return
    m = p.r1 - p.r0
    diag = values[:, :m]
    out[p.r0:p.r1, p.r0:p.r1].copy_(torch.triu(diag) + torch.triu(diag, 1).transpose(0, 1))
    if values.shape[1] > m:
        out[p.r0:p.r1, p.r1:].copy_(values[:, m:])
        out[p.r1:, p.r0:p.r1].copy_(values[:, m:].transpose(0, 1))
