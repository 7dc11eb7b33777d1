"""Layout of a Gram on disk: a ``.npy`` file whose data starts on a page boundary, row blocks whose byte
ranges start on page boundaries, the tiles of the upper triangle, and their assignment to ranks.

Page safety.  A rank writes only rows it owns (the rows of the row blocks assigned to it); a row block of
T rows covers the bytes [H + r0 R, H + r1 R) with H the header size (one page, written by
:func:`create_npy`) and R the bytes of one row.  T is a multiple of the row quantum
q = page / gcd(R, page), so T R is a whole number of pages and two ranks never write into the same page,
even on a filesystem that writes back whole pages from several machines.

Work.  The upper tile (I, J), J >= I, of a symmetric Gram costs t_I t_J flops units (half on the diagonal);
row blocks are given to ranks by the longest-processing-time rule (largest remaining work first, to the
least loaded rank), which is within 4/3 of the best split and deterministic, so every rank computes the
same plan from the same list of finished tiles.
"""
from __future__ import annotations

import math
import mmap
import os
import struct
from typing import Dict, Iterable, List, Sequence, Set, Tuple

import numpy as np
import numpy.lib.format as npformat

HEADER_BYTES = mmap.PAGESIZE
Tile = Tuple[int, int]


def row_quantum(row_bytes: int, page_bytes: int) -> int:
    """Smallest number of rows whose bytes are a whole number of pages: page / gcd(row_bytes, page)."""
    return page_bytes // math.gcd(row_bytes, page_bytes)


def block_bounds(n: int, tile: int, quantum: int) -> List[Tuple[int, int]]:
    """Row blocks [r0, r1) of ``tile`` rows rounded up to a multiple of ``quantum`` (the last one shorter)."""
    t = max(quantum, -(-tile // quantum) * quantum)
    return [(r, min(r + t, n)) for r in range(0, n, t)]


def all_tiles(n_row_blocks: int, n_col_blocks: int, symmetric: bool) -> List[Tile]:
    """Tiles (I, J): the upper triangle J >= I when symmetric, every (I, J) otherwise."""
    return [(i, j) for i in range(n_row_blocks) for j in range(i if symmetric else 0, n_col_blocks)]


def tile_cost(rows: Sequence[Tuple[int, int]], cols: Sequence[Tuple[int, int]], t: Tile, symmetric: bool) -> float:
    """Relative work of a tile: rows x columns (half for a diagonal tile of a symmetric Gram)."""
    (a0, a1), (b0, b1) = rows[t[0]], cols[t[1]]
    w = float(a1 - a0) * float(b1 - b0)
    return 0.5 * w if symmetric and t[0] == t[1] else w


def assign_blocks(costs: Dict[int, float], world: int) -> Dict[int, int]:
    """Row block -> rank by longest processing time first: blocks by decreasing cost (ties: lower index),
    each to the rank with the least assigned cost so far (ties: lower rank)."""
    load = [0.0] * world
    owner: Dict[int, int] = {}
    for b in sorted(costs, key=lambda b: (-costs[b], b)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[b] = r
        load[r] += costs[b]
    return owner


def plan_tiles(missing: Iterable[Tile], rows, cols, symmetric: bool, world: int) -> Dict[int, List[Tile]]:
    """Missing tiles grouped by the owner of their row block: {rank: [tiles in row-major order]}."""
    missing = sorted(missing)
    costs: Dict[int, float] = {}
    for t in missing:
        costs[t[0]] = costs.get(t[0], 0.0) + tile_cost(rows, cols, t, symmetric)
    owner = assign_blocks(costs, world)
    plan: Dict[int, List[Tile]] = {r: [] for r in range(world)}
    for t in missing:
        plan[owner[t[0]]].append(t)
    return plan


def plan_mirrors(missing_blocks: Set[int], rows, world: int) -> Dict[int, List[int]]:
    """Row blocks whose lower part (columns left of the block) is still to be mirrored, by owner; the work
    of block I is t_I * r0_I elements copied."""
    costs = {b: float(rows[b][1] - rows[b][0]) * float(rows[b][0]) for b in missing_blocks}
    owner = assign_blocks(costs, world)
    plan: Dict[int, List[int]] = {r: [] for r in range(world)}
    for b in sorted(missing_blocks):
        plan[owner[b]].append(b)
    return plan


def create_npy(path: str, shape: Tuple[int, ...], dtype: np.dtype) -> None:
    """Create a ``.npy`` file of ``shape`` and ``dtype`` whose header fills exactly one page (HEADER_BYTES),
    data left as a sparse hole (zeros).  np.load / np.lib.format.open_memmap read it as any .npy (the
    header is the standard version 1.0 dictionary padded with spaces)."""
    d = {"descr": npformat.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
    text = repr(d).encode("latin1")
    magic = npformat.magic(1, 0)
    pad = HEADER_BYTES - len(magic) - 2 - len(text) - 1
    if pad < 0:
        raise ValueError(f"create_npy: header of {path} does not fit in {HEADER_BYTES} bytes")
    header = magic + struct.pack("<H", len(text) + pad + 1) + text + b" " * pad + b"\n"
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(header)
        fh.truncate(HEADER_BYTES + nbytes)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def open_npy(path: str, shape: Tuple[int, ...], dtype: np.dtype, mode: str = "r+") -> np.memmap:
    """Memory-map an existing Gram file, checking that it is one of ours: a page-sized header, the expected
    shape and dtype, and the full size (a truncated file is an error naming it)."""
    try:
        with open(path, "rb") as fh:
            version = npformat.read_magic(fh)
            if version != (1, 0):
                raise ValueError(f".npy format version {version}, expected (1, 0)")
            hdr_shape, fortran, hdr_dtype = npformat.read_array_header_1_0(fh)
            offset = fh.tell()
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"on-disk Gram {path}: not a readable .npy file ({e})") from e
    if tuple(hdr_shape) != tuple(shape) or np.dtype(hdr_dtype) != np.dtype(dtype) or fortran:
        raise ValueError(f"on-disk Gram {path}: holds {hdr_dtype} {tuple(hdr_shape)}, expected "
                         f"{np.dtype(dtype)} {tuple(shape)} as its manifest says")
    if offset != HEADER_BYTES:
        raise ValueError(f"on-disk Gram {path}: header of {offset} bytes, expected {HEADER_BYTES} "
                         f"(the file was not written by ntk_fast.distributed)")
    want = offset + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    size = os.path.getsize(path)
    if size != want:
        raise ValueError(f"on-disk Gram {path}: {size} bytes, expected {want} (truncated or damaged file)")
    return np.memmap(path, dtype=dtype, mode=mode, offset=offset, shape=tuple(shape))
