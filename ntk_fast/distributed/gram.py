"""gram_to_disk(): an empirical NTK Gram written tile by tile into one ``.npy`` file, split across the
ranks of a torch.distributed process group (or computed by one process), resumable after a kill.

    Theta[I, J] = empirical_ntk(model, x1[rows I], x2[cols J])      for every tile (I, J)

Symmetric case (x2 None): only the upper tiles J >= I are computed (n^2/2 of the work); rows I belong to
one rank, which computes its upper tiles, and after a barrier fills the lower part of its rows by copying
the transposes of the finished upper tiles (Theta[I, J] = Theta[J, I]^T, with outputs swapped for
mode="full" with k > 1), so a rank never writes outside its own rows (page safety: ntk_fast.distributed.layout).
With x2 given, row panels of x1 go to ranks and every tile is computed.

Tiles come from ntk_fast.distributed.tiles: for structured models the features of each row block are
computed once per rank and each tile is one call of the fused op; any other model (or
cache_features=False) gets one call of the public :func:`ntk_fast.empirical_ntk` per tile, so every model,
mode and method that function supports works here.  Memory per rank: the cached features plus one tile;
the Gram itself lives in the file.
"""
from __future__ import annotations

import os
import shutil
import time
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from ntk_fast.distributed import comm, layout, manifest
from ntk_fast.distributed.tiles import TileSource
from ntk_fast.progress import progress_bar

PathLike = Union[str, "os.PathLike[str]"]
DEFAULT_TILE = 1024


def compute_tile(source: TileSource, ri: Tuple[int, int], rj: Optional[Tuple[int, int]]) -> np.ndarray:
    """One tile (rj None: the symmetric diagonal tile of ri, or the diagonal mode's entries)."""
    return source.tile(ri, rj)


def _mirror(block: np.ndarray, full_k: bool) -> np.ndarray:
    """Theta(x', x) from Theta(x, x'): swap points, and outputs too for (n1, n2, k, k) blocks."""
    return block.transpose(1, 0, 3, 2) if full_k else block.T


def _describe(model: nn.Module, x1: torch.Tensor, x2: Optional[torch.Tensor], mode: str, method: str,
              tile: Optional[int], page_bytes: int, precision: str) -> Dict[str, Any]:
    """Shape, dtype and tiling of the result, plus the digests that identify the problem."""
    with torch.no_grad():
        k = model(x1[:1]).reshape(1, -1).shape[1]
    n1 = x1.shape[0]
    n2 = n1 if x2 is None else x2.shape[0]
    if mode == "diagonal":
        shape: Tuple[int, ...] = (n1,)
    else:
        shape = (n1, n2, k, k) if (mode == "full" and k > 1) else (n1, n2)
    np_dtype = np.dtype(str(x1.dtype).replace("torch.", ""))
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np_dtype.itemsize
    q = layout.row_quantum(row_bytes, page_bytes)
    t = DEFAULT_TILE if tile is None else tile
    rows = layout.block_bounds(n1, t, q)
    return {"shape": list(shape), "dtype": str(np_dtype), "mode": mode, "method": method,
            "symmetric": x2 is None and mode != "diagonal", "tile": rows[0][1] - rows[0][0], "page_bytes": page_bytes,
            "precision": precision, "model_digest": manifest.model_digest(model),
            "x1_digest": manifest.tensor_digest(x1), "x2_digest": manifest.tensor_digest(x2), "n1": n1, "n2": n2}


def _prepare(path: str, meta: Dict[str, Any]) -> None:
    """Rank 0: validate an existing manifest, or write a new one and create the array (manifest first, so
    an array file never exists without one)."""
    mpath = manifest.manifest_path(path)
    if os.path.exists(mpath):
        manifest.check_manifest(path, meta)
        if not os.path.exists(path):
            tiles, _ = manifest.read_done(path)
            if tiles:
                raise ValueError(f"on-disk Gram: {path} is missing but its manifest {mpath} lists finished "
                                 f"tiles; delete the manifest files to start again")
    elif os.path.exists(path):
        raise ValueError(f"on-disk Gram: {path} exists without a manifest ({mpath}); refusing to overwrite it")
    else:
        manifest.write_manifest(path, meta)
    if not os.path.exists(path):
        nbytes = int(np.prod(meta["shape"], dtype=np.int64)) * np.dtype(meta["dtype"]).itemsize
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        if nbytes + layout.HEADER_BYTES > free:
            raise ValueError(f"on-disk Gram: {path} needs {nbytes / 1e9:.3f} GB but its filesystem has "
                             f"{free / 1e9:.3f} GB free")
        layout.create_npy(path, tuple(meta["shape"]), np.dtype(meta["dtype"]))


def _grid(meta: Dict[str, Any]) -> Tuple[List[Tuple[int, int]], List[Tuple[int, int]]]:
    """Row blocks and column blocks (one column block for mode="diagonal")."""
    rows = layout.block_bounds(meta["n1"], meta["tile"], 1)
    cols = [(0, 1)] if meta["mode"] == "diagonal" else layout.block_bounds(meta["n2"], meta["tile"], 1)
    return rows, cols


def _compute_tiles(path: str, meta: Dict[str, Any], mine: List[Tuple[int, int]], log: manifest.DoneLog,
                   source: TileSource, progress, rank: int) -> None:
    rows, cols = _grid(meta)
    mm = layout.open_npy(path, tuple(meta["shape"]), np.dtype(meta["dtype"]))
    bar = progress_bar(progress if rank == 0 else False, total=len(mine), desc="gram to disk", unit="tile")
    try:
        for t in mine:
            (i0, i1), (j0, j1) = rows[t[0]], cols[t[1]]
            t0 = time.perf_counter()
            diag = meta["mode"] == "diagonal"
            rj = None if (diag or (meta["symmetric"] and t[0] == t[1])) else (j0, j1)
            block = compute_tile(source, (i0, i1), rj)
            t1 = time.perf_counter()
            if diag:
                mm[i0:i1] = block
            else:
                mm[i0:i1, j0:j1] = block
            mm.flush()                      # data on disk before the tile is listed as done
            log.tile_done(t, t1 - t0, time.perf_counter() - t1)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        del mm


def _mirror_rows(path: str, meta: Dict[str, Any], mine: List[int], log: manifest.DoneLog) -> None:
    """Fill the lower part of this rank's row blocks from the finished upper tiles (a fresh mapping, opened
    after the barrier, so pages written by other ranks are read from the file)."""
    rows, _ = _grid(meta)
    full_k = len(meta["shape"]) == 4
    mm = layout.open_npy(path, tuple(meta["shape"]), np.dtype(meta["dtype"]))
    try:
        for b in mine:
            t0 = time.perf_counter()
            i0, i1 = rows[b]
            for j in range(b):
                j0, j1 = rows[j]
                mm[i0:i1, j0:j1] = _mirror(np.asarray(mm[j0:j1, i0:i1]), full_k)
            mm.flush()
            log.mirror_done(b, time.perf_counter() - t0)
    finally:
        del mm


def gram_to_disk(model: nn.Module, x1: torch.Tensor, path: PathLike, x2: Optional[torch.Tensor] = None, *,
                 mode: str = "full", method: str = "auto", tile: Optional[int] = None,
                 page_bytes: int = layout.HEADER_BYTES, progress: Optional[bool] = None,
                 precision: str = "highest", cache_features: bool = True) -> torch.Tensor:
    """Empirical NTK Gram of ``model`` on x1 (with x2, or itself) written into the ``.npy`` file ``path``.

    Collective when a torch.distributed process group is initialised (every rank calls it with the same
    model weights and data: checked by digest); a plain call in one process otherwise.  Shapes and modes as
    :func:`ntk_fast.empirical_ntk`.  Returns the result as a tensor over a memory map of the file.

    Args:
        tile: rows (and columns) per tile, rounded up to the row quantum page / gcd(row bytes, page)
            (default 1024).  page_bytes: the page size the row blocks are aligned to (default: this
            machine's page, also the header size); smaller values are safe only when all ranks share one
            page cache (one machine).  progress: one tqdm bar on rank 0 (None: when stderr is a terminal).
        cache_features: structured models: compute each row block's features once per rank and keep them
            (memory: features of the blocks this rank touches); False, or any other model: one public
            empirical_ntk call per tile (features recomputed per tile; ntk_fast.distributed.tiles).

    Files: ``path`` (the array, header padded to one page), ``path.manifest.json`` (what it holds),
    ``path.done.rank<r>.json`` (finished tiles of rank r).  Rerunning after a kill computes only the tiles
    not listed as done; a different model, data, shape or tiling is refused (ValueError naming the
    manifest), and a corrupt manifest is an error naming the file.  Cost: that of the tiles
    (n1 n2 / 2 Gram entries when symmetric) plus the features: one pass per row block and rank when
    cached, two block passes per tile otherwise.
    """
    from ntk_fast.ntk.empirical import METHODS, MODES
    if mode not in MODES:
        raise ValueError(f"gram_to_disk: mode must be one of {MODES}, got {mode!r}")
    if method not in METHODS:
        raise ValueError(f"gram_to_disk: method must be one of {METHODS}, got {method!r}")
    path = os.fspath(path)
    if not path.endswith(".npy"):
        raise ValueError(f"empirical_ntk: out must be a path ending in .npy, got {path!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"empirical_ntk: the folder of out does not exist: {folder} (create it first)")
    if mode == "diagonal" and x2 is not None:
        raise ValueError("empirical_ntk: mode='diagonal' takes no x2")
    if x1.shape[0] == 0 or (x2 is not None and x2.shape[0] == 0):
        raise ValueError("gram_to_disk: x1 and x2 must hold at least one point (nothing to write)")
    if not isinstance(page_bytes, int) or page_bytes < 1:
        raise ValueError(f"gram_to_disk: page_bytes must be a positive int, got {page_bytes!r}")
    if tile is not None and (not isinstance(tile, int) or tile < 1):
        raise ValueError(f"gram_to_disk: tile must be a positive int or None, got {tile!r}")
    rank, world = comm.rank_world()
    meta = comm.run_agreed(lambda: _describe(model, x1, x2, mode, method, tile, page_bytes, precision))
    comm.run_agreed(lambda: _prepare(path, meta) if rank == 0 else None)

    def load():
        manifest.check_manifest(path, meta)     # every rank: same weights and data as rank 0's manifest
        return manifest.read_done(path), manifest.DoneLog(path, rank)
    (done, mirrored), log = comm.run_agreed(load)
    rows, cols = _grid(meta)
    missing = [t for t in layout.all_tiles(len(rows), len(cols), meta["symmetric"]) if t not in done]
    plan = layout.plan_tiles(missing, rows, cols, meta["symmetric"], world)
    source = TileSource(model, x1, x2, mode, method, precision, cache_features)
    comm.run_agreed(lambda: _compute_tiles(path, meta, plan[rank], log, source, progress, rank))
    if meta["symmetric"]:
        todo = {b for b in range(1, len(rows)) if b not in mirrored}
        mplan = layout.plan_mirrors(todo, rows, world)
        comm.run_agreed(lambda: _mirror_rows(path, meta, mplan[rank], log))
    arr = np.load(path, mmap_mode="r+")
    return torch.from_numpy(arr)
