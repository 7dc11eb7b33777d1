"""Pure-torch references of the frozen-kernel ops (float64-safe, simple, slow) and the packed layout.

``kernel_flow_step_ref`` is the specification of ``torch.ops.ntk_fast.kernel_flow_step``: for every active
problem e (rows of the (E, n) state; 1/n written inv_n)::

    f'  = f - dt g
    r'  = l'(y o f') o y
    c'  = c + dt r inv_n                   c(t) = int_0^t (1/n) l'(y o F) o y ds,  so that F = -Theta c
    g'  = Theta r' inv_n
    stats = [|g|^2, |g'|^2, |g - g'|^2, dt max|g|, min(y o f'), mean l(y o f'), max|g'|]   (float64, (E, 7))

Inactive problems are returned unchanged with zero stats.

Tile-packed symmetric storage (the layout the extension reads): with tile edge T and nt = ceil(n / T),
tiles (bi, bj), bi <= bj, are stored in row-major order of (bi, bj), each a dense zero-padded T x T block;
P = nt (nt + 1) / 2 T^2 entries (about n^2 / 2 + n T / 2).
"""
from __future__ import annotations

from typing import Tuple

import torch

from ntk_fast.dynamics.losses import get_loss


def packed_size(n: int, block: int) -> int:
    """Number of entries of the tile-packed upper triangle of an n x n matrix with tile edge ``block``."""
    nt = -(-n // block)
    return nt * (nt + 1) // 2 * block * block


def pack_symmetric(K: torch.Tensor, block: int = 256) -> torch.Tensor:
    """Tile-packed upper triangle of K ((n, n) -> (P,), or (E, n, n) -> (E, P)); reads only tiles bi <= bj.

    Cost: one pass over the upper half of K; memory P ~ n^2 / 2 (+ n block / 2) entries.
    """
    if block < 1:
        raise ValueError(f"pack_symmetric: block must be >= 1, got {block}")
    batched = K.dim() == 3
    Kb = K if batched else K.unsqueeze(0)
    E, n = Kb.shape[0], Kb.shape[-1]
    nt = -(-n // block)
    out = torch.zeros(E, packed_size(n, block), dtype=K.dtype, device=K.device)
    T2 = block * block
    k = 0
    for bi in range(nt):
        i0, i1 = bi * block, min(n, (bi + 1) * block)
        for bj in range(bi, nt):
            j0, j1 = bj * block, min(n, (bj + 1) * block)
            tile = out[:, k * T2:(k + 1) * T2].view(E, block, block)
            tile[:, :i1 - i0, :j1 - j0] = Kb[:, i0:i1, j0:j1]
            k += 1
    return out if batched else out[0]


def unpack_symmetric(P: torch.Tensor, n: int, block: int) -> torch.Tensor:
    """Inverse of pack_symmetric: the full symmetric (n, n) (or (E, n, n)) matrix."""
    batched = P.dim() == 2
    Pb = P if batched else P.unsqueeze(0)
    E = Pb.shape[0]
    nt = -(-n // block)
    K = torch.empty(E, n, n, dtype=P.dtype, device=P.device)
    T2 = block * block
    k = 0
    for bi in range(nt):
        i0, i1 = bi * block, min(n, (bi + 1) * block)
        for bj in range(bi, nt):
            j0, j1 = bj * block, min(n, (bj + 1) * block)
            tile = Pb[:, k * T2:(k + 1) * T2].view(E, block, block)[:, :i1 - i0, :j1 - j0]
            K[:, i0:i1, j0:j1] = tile
            if bi != bj:
                K[:, j0:j1, i0:i1] = tile.transpose(1, 2)
            k += 1
    return K if batched else K[0]


def kernel_flow_step_ref(theta: torch.Tensor, y: torch.Tensor, f: torch.Tensor, g: torch.Tensor, r: torch.Tensor,
                         c: torch.Tensor, dt: torch.Tensor, active: torch.Tensor, loss: str, beta: float,
                         packed_block: int = 0, block: int = 0
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference of kernel_flow_step (see the module docstring).  Uses the upper triangle of theta only."""
    lfun, lprime = get_loss(loss)
    E, n = f.shape
    if packed_block > 0:
        K = unpack_symmetric(theta, n, packed_block)
    else:
        K = theta.triu() + theta.triu(1).transpose(-1, -2)       # symmetric completion of the upper triangle
    dtc = dt[:, None]
    fn = f - dtc * g
    u = y * fn
    rn = lprime(u, beta) * y
    cn = c + dtc * r / n
    if K.dim() == 2:
        gn = (rn @ K) / n            # K symmetric: (K r_e)^T = r_e^T K
    else:
        gn = torch.einsum("eij,ej->ei", K, rn) / n
    g64, gn64 = g.double(), gn.double()
    stats = torch.stack([
        (g64 ** 2).sum(1), (gn64 ** 2).sum(1), ((g64 - gn64) ** 2).sum(1),
        dt.double() * g64.abs().amax(1), u.double().amin(1), lfun(u.double(), beta).mean(1),
        gn64.abs().amax(1)], dim=1)
    a = active[:, None]
    return (torch.where(a, fn, f), torch.where(a, rn, r), torch.where(a, gn, g), torch.where(a, cn, c),
            torch.where(a, stats, torch.zeros_like(stats)))
