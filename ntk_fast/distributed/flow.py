"""Kernel dynamics on a Theta that lives on disk, read by row blocks, optionally split by rows across ranks.

Each rank holds the rows [r0, r1) of Theta (n, n) through a memory map of the ``.npy`` file (a rank reads
only its rows, in blocks of ``block`` rows, once per attempt) and the full vectors of the flow, identical on
every rank.  One attempt is that of ``ntk_fast.ops.kernel_flow_step`` (same formula, same statistics), with
the product split by rows and combined by one all-reduce:

    f' = f - dt g,   r' = l'(f', y),   c' = c + dt r / n,
    g'[:, r0:r1] = r' Theta[r0:r1, :]^T / n          on each rank (row blocks of the memmap),
    buf = [g' zero-padded (E, n) | partial sums (E, 4 W) in this rank's slots | rank 0's wall clock]
    buf = all_reduce_sum(buf)                        (float64; the one collective of an attempt)

Every entry of buf has exactly one non-zero contribution, so the sum is exact and every rank receives the
same numbers bit for bit.  The partial sums over the columns a rank owns (|g|^2, |g'|^2, |g - g'|^2 and
sum l(f', y)) are added over ranks in rank order on every rank, and the maxima/minima (dt max|g|,
min y f', max|g'|) are order-free: so the step rule takes the same decisions everywhere, whatever the
thread counts.  Limits measured in seconds use rank 0's clock (shipped in the same buffer).

Cost per rank and attempt: 2 E n (r1 - r0) flops, one read of its rows of Theta, one all-reduce of
E (n + 4 W) + 1 float64 numbers.  Memory: one block (block, n) plus O(E n); Theta stays in the file.
Without a process group the same code runs in one process on the whole file (W = 1, no collective).
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple, Union

import numpy as np
import torch

from ntk_fast.distributed.comm import _group_active, agree, rank_world
from ntk_fast.dynamics.losses import loss_grad, loss_value

DEFAULT_BLOCK_BYTES = 32 << 20          # rows per read: about 32 MiB of Theta


def row_range(n: int, rank: int, world: int) -> Tuple[int, int]:
    """Rows [r0, r1) of rank ``rank`` out of ``world``: contiguous, sizes differing by at most one."""
    return rank * n // world, (rank + 1) * n // world


def open_theta(source: Union[str, "os.PathLike[str]", np.ndarray], name: str = "K_train") -> np.ndarray:
    """A square float32/float64 Theta (n, n) from a ``.npy`` path (memory-mapped read-only) or a numpy array /
    memmap; ValueError naming ``name`` otherwise."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise ValueError(f"{name}: no such file {path!r}")
        try:
            arr = np.load(path, mmap_mode="r")
        except (ValueError, OSError, EOFError) as exc:
            raise ValueError(f"{name}: {path} is not a readable .npy array ({exc})") from None
        where = path
    elif isinstance(source, np.ndarray):
        arr, where = source, "the array"
    else:
        raise ValueError(f"{name} must be a tensor, a .npy path or a numpy array/memmap, got {type(source).__name__}")
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] == 0:
        raise ValueError(f"{name}: {where} holds shape {arr.shape}, expected a square (n, n) Theta (a trace or "
                         "single-output Gram)")
    if arr.dtype not in (np.float32, np.float64):
        raise ValueError(f"{name}: {where} has dtype {arr.dtype}, expected float32 or float64")
    return arr


class RowShard:
    """Rows [r0, r1) of a symmetric Theta (n, n) held in a numpy array or memmap, read ``block`` rows at a time.

    ``product(R)`` = R Theta^T (E, n) on every rank (collective under a process group); ``step(...)`` is one
    attempt of the flow (:func:`sharded_flow_step`).  The in-memory counterpart is
    :class:`ntk_fast.dynamics.theta_op.InMemoryTheta`.
    """

    def __init__(self, arr: np.ndarray, r0: int, r1: int, block: Optional[int] = None):
        n = arr.shape[0]
        if arr.ndim != 2 or arr.shape[1] != n or not 0 <= r0 <= r1 <= n:
            raise ValueError(f"RowShard: need a square array and 0 <= r0 <= r1 <= n, got {arr.shape} and [{r0}, {r1})")
        self.arr, self.r0, self.r1, self.n = arr, r0, r1, n
        self.dtype = torch.float64 if arr.dtype == np.float64 else torch.float32
        self.device = torch.device("cpu")
        self.block = max(1, DEFAULT_BLOCK_BYTES // (n * arr.itemsize)) if block is None else int(block)
        if self.block < 1:
            raise ValueError(f"RowShard: block must be >= 1 row, got {block}")
        self.rank, self.world = rank_world()
        self.clock = 0.0                 # rank 0's wall clock as of the last attempt

    @classmethod
    def from_file(cls, source: Union[str, "os.PathLike[str]", np.ndarray], block: Optional[int] = None) -> "RowShard":
        """This rank's rows of a square Gram stored as ``.npy`` (as written by gram_to_disk), memory-mapped
        read-only (or of a numpy array / memmap)."""
        arr = open_theta(source)
        rank, world = rank_world()
        return cls(arr, *row_range(arr.shape[0], rank, world), block=block)

    def blocks(self, r0: Optional[int] = None, r1: Optional[int] = None):
        """(i0, i1, rows (i1 - i0, n) tensor) over [r0, r1) (default: this shard), ``block`` rows at a time."""
        r0 = self.r0 if r0 is None else r0
        r1 = self.r1 if r1 is None else r1
        for i0 in range(r0, r1, self.block):
            i1 = min(r1, i0 + self.block)
            yield i0, i1, torch.from_numpy(np.array(self.arr[i0:i1]))

    def local_product(self, R: torch.Tensor) -> torch.Tensor:
        """R Theta[r0:r1, :]^T, (E, r1 - r0): this rank's columns of R Theta."""
        out = torch.empty(R.shape[0], self.r1 - self.r0, dtype=R.dtype, device=R.device)
        for i0, i1, rows in self.blocks():
            out[:, i0 - self.r0:i1 - self.r0] = R @ rows.to(dtype=R.dtype, device=R.device).T
        return out

    def product(self, R: torch.Tensor) -> torch.Tensor:
        """R Theta^T (= R Theta, Theta symmetric), (E, n): local rows, then one all-reduce (sum)."""
        out = torch.zeros(R.shape, dtype=torch.float64, device=R.device)
        out[:, self.r0:self.r1] = self.local_product(R)
        if _group_active():
            torch.distributed.all_reduce(out)
        return out.to(R.dtype)

    def fingerprint(self) -> List[float]:
        """Sums of rows 0, n / 2, n - 1 (float64), as the solver's in-memory fingerprint."""
        return [float(torch.from_numpy(np.array(self.arr[i])).double().sum()) for i in sorted({0, self.n // 2, self.n - 1})]

    def agreed_wall(self, local: float) -> float:
        """The elapsed seconds every rank uses for max_wall: rank 0's, as of the last attempt."""
        return local if self.world == 1 else self.clock

    def step(self, y, f, g, r, c, dt, active, loss: str, beta: float, clock: float = 0.0):
        """One attempt (see :func:`sharded_flow_step`)."""
        return sharded_flow_step(self, y, f, g, r, c, dt, active, loss, beta, clock=clock)


def sharded_flow_step(shard: RowShard, y: torch.Tensor, f: torch.Tensor, g: torch.Tensor, r: torch.Tensor,
                      c: torch.Tensor, dt: torch.Tensor, active: torch.Tensor, loss: str = "softhinge",
                      beta: float = 20.0, clock: float = 0.0):
    """One attempt of the flow for E problems, as ``ntk_fast.ops.kernel_flow_step`` (returns f', r', g', c',
    stats (E, 7) float64 = [|g|^2, |g'|^2, |g - g'|^2, dt max|g|, min(y o f'), mean l(f', y), max|g'|]), with
    Theta given by this rank's rows.  Collective when a process group is initialised (one all-reduce)."""
    E, n = f.shape
    if shard.n != n:
        raise ValueError(f"sharded_flow_step: the shard is of a {shard.n} x {shard.n} Theta, f has {n} entries")
    W, a, b = shard.world, shard.r0, shard.r1
    dtc = dt[:, None]
    fn = f - dtc * g
    rn = loss_grad(loss, fn, y, beta)
    cn = c + dtc * r / n
    gn_own = (shard.local_product(rn) / n).double()
    g_own, f_own = g[:, a:b].double(), fn[:, a:b].double()
    buf = torch.zeros(E, n + 4 * W + 1, dtype=torch.float64)
    buf[:, a:b] = gn_own
    s0 = n + 4 * shard.rank
    buf[:, s0:s0 + 4] = torch.stack([(g_own ** 2).sum(1), (gn_own ** 2).sum(1), ((g_own - gn_own) ** 2).sum(1),
                                     loss_value(loss, f_own, y[:, a:b].double(), beta).sum(1)], dim=1)
    if shard.rank == 0:
        buf[0, -1] = clock
    if _group_active():
        torch.distributed.all_reduce(buf)
    shard.clock = float(buf[0, -1])
    parts = buf[:, n:n + 4 * W].reshape(E, W, 4)
    sums = parts[:, 0]
    for w in range(1, W):                               # rank order, the same on every rank
        sums = sums + parts[:, w]
    gn64 = buf[:, :n]
    gn = gn64.to(f.dtype)
    stats = torch.stack([sums[:, 0], sums[:, 1], sums[:, 2], dt.double() * g.double().abs().amax(1),
                         (y * fn).double().amin(1), sums[:, 3] / n, gn64.abs().amax(1)], dim=1)
    act = active[:, None]
    return (torch.where(act, fn, f), torch.where(act, rn, r), torch.where(act, gn, g), torch.where(act, cn, c),
            torch.where(act, stats, torch.zeros_like(stats)))


# ------------------------------------------------------------------------------------------------ checks
def _check_rows(shard: RowShard, name: str) -> None:
    """This rank's rows: finite, equal to the transposed column strip (symmetry), diagonal >= -eps max|K|.
    Reads the rows and the column strip [r0, r1) once (a strip holding another rank's non-finite rows is
    left to that rank to report)."""
    from ntk_fast.guards.psd import PSD_EPS
    tol_rel, eps = (1e-4 if shard.dtype == torch.float32 else 1e-6), PSD_EPS[shard.dtype]
    for i0, i1, rows in shard.blocks():
        if not torch.isfinite(rows).all():
            raise ValueError(f"{name} has NaN or infinite entries (rows {i0}..{i1 - 1})")
        cols = torch.from_numpy(np.array(shard.arr[:, i0:i1])).T
        scale = float(rows.abs().amax())
        if torch.isfinite(cols).all():
            scale = max(scale, float(cols.abs().amax()))
            diff = float((rows - cols).abs().amax())
            if diff > tol_rel * max(scale, 1e-300):
                raise ValueError(f"{name} is not symmetric: max |{name} - {name}^T| = {diff:.3g} in rows "
                                 f"{i0}..{i1 - 1} (tolerance {tol_rel * scale:.3g}); a Gram matrix must be symmetric")
        d = rows[torch.arange(i1 - i0), torch.arange(i0, i1)]
        if float(d.min()) < -eps * max(scale, 1e-300) or (float(d.min()) < 0 and scale == -float(d.min())):
            i = i0 + int(d.argmin())
            raise ValueError(f"{name} has a negative diagonal entry {name}[{i}, {i}] = {float(d.min()):.3g}: a Gram "
                             "matrix has K_ii = |J_i|^2 >= 0 (a sign error? pass the NTK, not its negative)")


def check_disk_theta(shard: RowShard, name: str = "K_train", iters: int = 30) -> Tuple[float, float]:
    """Collective checks of an on-disk Theta (the disk counterpart of ntk_fast.guards.check_gram): each rank
    checks its rows (finite, symmetric against the column strip, non-negative diagonal), then lambda_min >=
    -eps ||K|| by Lanczos with the sharded product (``iters`` reads of each rank's rows).  A failure on any
    rank raises on every rank (DiskGramError naming the rank, or the ValueError itself in one process)."""
    from ntk_fast.guards.psd import PSD_EPS, lanczos_extremes
    err: Optional[BaseException] = None
    try:
        _check_rows(shard, name)
    except ValueError as exc:
        err = exc
    agree(err)
    eps = PSD_EPS[shard.dtype]
    lmin, lmax = lanczos_extremes(shard.arr, iters, matvec=lambda v: shard.product(v[None])[0])
    norm = max(abs(lmin), abs(lmax))
    err = None
    if lmin < -eps * norm:
        err = ValueError(f"{name} is not positive semi-definite: it has an eigenvalue of about {lmin:.3g}, below "
                         f"-{eps:g} x ||{name}||_2 (Lanczos estimate, {iters} iterations); the dynamics would diverge")
    agree(err)
    return lmin, lmax
