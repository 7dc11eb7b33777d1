"""The tile-packed symmetric layout of Theta, defined once (mirror of ``csrc/common/packed.h``).

With tile edge T and nt = ceil(n / T), the tiles (bi, bj) with bi <= bj of the upper triangle are stored one
after the other in row-major order of (bi, bj), each a dense zero-padded T x T row-major block (diagonal tiles
hold the full symmetric block):

    tile_index(bi, bj) = bi nt - bi (bi - 1) / 2 + (bj - bi),      P = nt (nt + 1) / 2 T^2 entries

(about n^2 / 2 + n T / 2).  The layout is the same for every T; the kernels take T as ``packed_block``.  The
solver packs with the tile of the device it runs on (:func:`packed_tile`): 64 on CUDA (the kernel's block tile,
the only edge it accepts) and 32 on the CPU, measured fastest there (bench/results/ab-issue12-2026-12-06: one
float64 attempt at n = 4000 on one thread of a 2-core AMD EPYC takes 2.4-2.9 ms with 32-tiles, about 6 ms with
64-tiles and 4.4 ms with the 256-tiles of earlier versions).
"""
from __future__ import annotations

import torch

PACKED_TILE = 64        # the CUDA kernel's tile; pack_symmetric's default
CPU_PACKED_TILE = 32    # the CPU solver's tile (see the module docstring)


def packed_tile(device: torch.device) -> int:
    """The packed tile edge the solver uses on ``device``: 64 on CUDA, 32 on the CPU."""
    return PACKED_TILE if torch.device(device).type == "cuda" else CPU_PACKED_TILE


def packed_size(n: int, block: int) -> int:
    """Number of entries of the tile-packed upper triangle of an n x n matrix with tile edge ``block``."""
    nt = -(-n // block)
    return nt * (nt + 1) // 2 * block * block


def pack_symmetric(K: torch.Tensor, block: int = PACKED_TILE) -> torch.Tensor:
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
