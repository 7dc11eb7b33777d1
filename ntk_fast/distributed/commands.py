"""The on-disk side of the ``gram`` and ``kernel`` subcommands, one process or ``torchrun --nproc_per_node N``.

    torchrun --standalone --nproc_per_node 2 -m ntk_fast gram --p 60000 --out runs/big     # Gram to disk
    torchrun --standalone --nproc_per_node 2 -m ntk_fast kernel --gram runs/big --out runs/big-flow

``gram`` streams the Gram into ``OUT/gram.npy`` (empirical_ntk(out=...): tiles across ranks, resumable) after
checking the free disk space, and writes ``OUT/labels.npy`` and ``OUT/summary.json`` with per-rank timings;
``kernel --gram DIR`` runs kernel_flow on ``DIR/gram.npy`` (each rank reads its rows) with ``DIR/labels.npy``
and writes ``OUT/kernel_flow.pt`` (the result), ``OUT/summary.json`` and, while running, a checkpoint that a
rerun resumes from.  Under torchrun (WORLD_SIZE > 1) the process group is initialised from torchrun's
environment (gloo on CPUs, NCCL on GPUs) with a stated timeout; rank 0 alone writes files and shows a bar.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import threading
import time
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch

from ntk_fast.distributed import comm, layout, manifest
from ntk_fast.guards.memory import fmt_bytes

STREAM_ABOVE_BYTES = 2 << 30      # gram: a Gram above 2 GiB goes to disk (and skips the reference) by default


def torchrun_world() -> int:
    """WORLD_SIZE set by torchrun (1 without it)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


@contextlib.contextmanager
def process_group(device: torch.device, timeout_s: float) -> Iterator[None]:
    """Initialise the default process group from torchrun's environment when WORLD_SIZE > 1 (gloo on CPUs,
    NCCL on GPUs, each rank on cuda:LOCAL_RANK), destroy it at the end; a no-op in one process.  ``timeout_s``
    bounds every collective wait (a dead peer makes the others fail instead of hanging)."""
    if torchrun_world() <= 1 or torch.distributed.is_initialized():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                         timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def check_free_space(folder: str, nbytes: float) -> None:
    """ValueError naming both numbers when ``folder``'s filesystem has less than ``nbytes`` free."""
    os.makedirs(folder, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if nbytes + layout.HEADER_BYTES > free:
        raise ValueError(f"--out {folder}: the Gram needs {fmt_bytes(nbytes)} but the filesystem has "
                         f"{fmt_bytes(free)} free")


class AnonPeak:
    """Peak RssAnon of this process (anonymous memory: mapped file pages do not count), sampled every
    ``every`` seconds by a daemon thread while the context is open; ``peak`` in bytes (0 off Linux)."""

    def __init__(self, every: float = 0.2):
        self.every, self.peak = every, 0
        self._stop = threading.Event()

    @staticmethod
    def now() -> int:
        try:
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith("RssAnon:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, self.now())

    def __enter__(self) -> "AnonPeak":
        self.peak = self.now()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def _done_state(path: str, rank: int) -> Dict[str, Any]:
    p = manifest.done_path(path, rank)
    if not os.path.exists(p):
        return {"tiles": 0, "compute_seconds": 0.0, "write_seconds": 0.0}
    blob = manifest._read_json(p, "done list")
    return {"tiles": len(blob.get("tiles", [])), "compute_seconds": float(blob.get("compute_seconds", 0.0)),
            "write_seconds": float(blob.get("write_seconds", 0.0))}


def gather(obj: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Every rank's ``obj``, in rank order (one all_gather_object; [obj] in one process)."""
    rank, world = comm.rank_world()
    if world == 1:
        return [obj]
    out: List[Any] = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def gram_to_folder(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, out: str, tile: Optional[int],
                   progress: Optional[bool]) -> Dict[str, Any]:
    """``OUT/gram.npy`` by empirical_ntk(out=...) across the ranks, ``OUT/labels.npy`` (rank 0); returns the
    summary fields: wall seconds, tiles per second, bytes written per second, and per rank (wall, compute
    and write seconds and tiles of this run, peak RssAnon)."""
    from ntk_fast.ntk.empirical import empirical_ntk
    rank, world = comm.rank_world()
    path = os.path.join(out, "gram.npy")
    before = _done_state(path, rank)
    t0 = time.perf_counter()
    with AnonPeak() as mem:
        empirical_ntk(net, x, out=path, block_size=tile, progress=progress)
    wall = time.perf_counter() - t0
    after = _done_state(path, rank)
    mine = {"rank": rank, "wall_seconds": wall, "tiles": after["tiles"] - before["tiles"],
            "compute_seconds": after["compute_seconds"] - before["compute_seconds"],
            "write_seconds": after["write_seconds"] - before["write_seconds"], "rss_anon_peak_bytes": mem.peak}
    ranks = gather(mine)
    if rank == 0:
        np.save(os.path.join(out, "labels.npy"), y.detach().cpu().numpy())
    meta = manifest._read_json(manifest.manifest_path(path), "manifest")
    tiles = sum(r["tiles"] for r in ranks)
    slowest = max(r["wall_seconds"] for r in ranks)
    nbytes = float(np.prod(meta["shape"])) * np.dtype(meta["dtype"]).itemsize
    return {"out_of_core": True, "path": path, "world_size": world, "tile": meta["tile"], "seconds": slowest,
            "tiles_this_run": tiles, "tiles_per_second": tiles / slowest if slowest > 0 else None,
            "gram_bytes": nbytes, "bytes_per_second": nbytes / slowest if slowest > 0 else None, "per_rank": ranks}


def reference_check(net: torch.nn.Module, x: torch.Tensor, path: str) -> Dict[str, Any]:
    """The plain-torch reference (per-layer Grams + Hadamard) in memory against the on-disk Gram (rank 0);
    MemoryBudgetError when its n^2 result does not fit."""
    from ntk_fast.guards.memory import require_memory
    from ntk_fast.ntk.empirical import structured_features
    from ntk_fast.ops.reference import gram_reference
    n = x.shape[0]
    require_memory(3.0 * n * n * x.element_size(), f"gram --reference: the plain-torch reference Gram (n = {n})",
                   x.device, "Leave the reference off for Grams this large.")
    t0 = time.perf_counter()
    A, D, _ = structured_features(net, x)
    R = gram_reference(A, [d.reshape(d.shape[0], -1) for d in D])
    t_ref = time.perf_counter() - t0
    K = torch.from_numpy(np.load(path, mmap_mode="c")).to(R.device)      # copy-on-write: never written back
    err = float((R - K).abs().max() / R.abs().max())
    return {"reference_seconds": t_ref, "max_rel_diff_vs_reference": err}


def kernel_on_folder(args: Any) -> Dict[str, Any]:
    """kernel_flow on ``GRAM/gram.npy`` with ``GRAM/labels.npy`` (collective under torchrun); rank 0 writes
    OUT/kernel_flow.pt and returns the summary (statuses, t, steps, errors, per-rank wall seconds)."""
    from ntk_fast.dynamics.generic.losses import default_loss
    from ntk_fast.dynamics.solver import kernel_flow
    path, lab = os.path.join(args.gram, "gram.npy"), os.path.join(args.gram, "labels.npy")
    for p in (path, lab):
        if not os.path.isfile(p):
            raise ValueError(f"--gram {args.gram}: {os.path.basename(p)} is missing (write it with "
                             f"`python -m ntk_fast gram --out {args.gram}`)")
    theta_dtype = np.load(path, mmap_mode="r").dtype
    y = torch.from_numpy(np.load(lab).astype(theta_dtype))
    rank, world = comm.rank_world()
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
    comm.agree(None)
    ck = os.path.join(args.out, "kernel_flow.ck.pt")
    t0 = time.perf_counter()
    res = kernel_flow(path, y, loss=args.loss or default_loss("flow"), loss_beta=args.loss_beta, max_dgrad=args.max_dgrad,
                      max_dout=args.max_dout, max_time=None if args.max_time == float("inf") else args.max_time,
                      max_steps=args.max_steps, max_wall=None if args.max_wall == float("inf") else args.max_wall,
                      checkpoint=ck, checkpoint_every=args.checkpoint_every,
                      resume=ck if os.path.exists(ck) else None, progress=False if args.no_progress else None)
    ranks = gather({"rank": rank, "wall_seconds": time.perf_counter() - t0})
    if rank == 0:
        res.save(os.path.join(args.out, "kernel_flow.pt"))
    u = (y * res.F_train[0]).double()
    return {"gram": path, "n": int(y.shape[0]), "world_size": world, "status": res.status,
            "statuses": res.statuses, "t": res.t.tolist(), "steps": res.steps.tolist(),
            "attempts": res.attempts.tolist(), "train_err": float((u <= 0).double().mean()),
            "margin_min": float(u.min()), "seconds": max(r["wall_seconds"] for r in ranks), "per_rank": ranks}
