"""Sweeps: a grid of runs over h, alpha (or alpha*sqrt(h)) and init seeds, one run folder each.

Resumable by construction: a run folder with summary.json is finished and skipped; one with
checkpoint.pt resumes from it (ntk_fast.runs.experiment.run_experiment).  Runs go to a pool of ``jobs``
processes (spawned, each with cpus/jobs torch threads); a file named ``stop`` in the sweep folder stops
launching new runs (running ones finish); killing the sweep process ends its workers too (Linux), and a run
folder being worked on holds running.pid, so a second sweep over the same folder fails that run with a message
instead of running it twice.  The grid is written to sweep.json and the summaries of every
finished run to results.json (a list, in grid order).
"""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import sys
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ntk_fast.dynamics.config import progress_bar
from ntk_fast.runs.experiment import RunConfig, read_summary, run_experiment, write_json


def run_name(cfg: RunConfig, by_alpha_sqrt_h: bool) -> str:
    """Folder name of a grid point, e.g. ``h100_asqrth1e+03_s0`` or ``h100_alpha0.1_s0``."""
    a = f"asqrth{cfg.alpha_sqrt_h:.6g}" if by_alpha_sqrt_h else f"alpha{cfg.alpha:.6g}"
    return f"h{cfg.h}_{a}_s{cfg.seed}"


def grid_configs(make: Callable[..., RunConfig], hs: Sequence[int], seeds: Sequence[int],
                 alphas: Optional[Sequence[float]] = None, alphas_sqrt_h: Optional[Sequence[float]] = None,
                 **flags: Any) -> List[Tuple[str, RunConfig]]:
    """(name, config) for the Cartesian product h x alpha x seed.

    ``make(h=..., alpha=..., seed=..., **flags)`` builds one config; give ``alphas`` (article alpha) or
    ``alphas_sqrt_h`` (alpha sqrt(h), the paper's axis, converted per h: alpha = value / sqrt(h)).
    """
    if (alphas is None) == (alphas_sqrt_h is None):
        raise ValueError("grid_configs: give exactly one of alphas and alphas_sqrt_h")
    out = []
    for h in hs:
        for a in (alphas if alphas is not None else alphas_sqrt_h):
            alpha = a if alphas is not None else a / h ** 0.5
            for s in seeds:
                cfg = make(h=int(h), alpha=float(alpha), seed=int(s), **flags)
                name = run_name(cfg, alphas is None)
                try:                  # every grid point checked before any run starts or any folder is made
                    cfg.check()
                except ValueError as exc:
                    raise ValueError(f"sweep: grid point {name}: {exc}") from None
                out.append((name, cfg))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError("grid_configs: repeated grid points")
    return out


def _die_with_parent() -> None:
    """Pool initializer (Linux): a worker gets SIGTERM when the sweep process dies, so killing the sweep does not
    leave orphan runs behind (they would go on writing their run folders).  Elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))   # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker(cfg_json: Dict[str, Any], folder: str, threads: int) -> Tuple[str, Optional[Dict[str, Any]], str]:
    torch.set_num_threads(max(1, threads))
    try:
        s = run_experiment(RunConfig.from_json(cfg_json), folder, progress=False, log=lambda *a: None)
        return folder, s, ""
    except Exception:                                          # reported, the sweep goes on
        return folder, None, traceback.format_exc()


def run_sweep(configs: Sequence[Tuple[str, RunConfig]], out: str, jobs: int = 1, progress: Optional[bool] = None,
              threads: Optional[int] = None, log: Callable[..., None] = print) -> Dict[str, Any]:
    """Run every (name, config) in ``out/name``; return counts {"total", "done", "skipped", "failed"}.

    progress: a tqdm bar over the runs (None: only when stderr is a terminal); the runs themselves show none."""
    if jobs < 1:
        raise ValueError(f"run_sweep: jobs must be >= 1, got {jobs}")
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "sweep.json"), {"runs": [{"name": n, **c.to_json()} for n, c in configs]})
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    todo = [(n, c) for n, c in configs if read_summary(os.path.join(out, n)) is None]
    skipped = len(configs) - len(todo)
    counts = {"total": len(configs), "done": skipped, "skipped": skipped, "failed": 0}
    bar = progress_bar(progress, total=len(configs), initial=skipped, desc="sweep", unit="run")
    stop = os.path.join(out, "stop")

    def finished(folder: str, s: Optional[Dict[str, Any]], err: str) -> None:
        if s is None:
            counts["failed"] += 1
            log(f"{folder}: failed\n{err}")
        else:
            counts["done"] += 1
        if bar is not None:
            bar.update(1)

    try:
        if jobs == 1:
            prev = torch.get_num_threads()
            for n, c in todo:
                if os.path.exists(stop):
                    log(f"{stop} exists: not launching more runs")
                    break
                finished(*_worker(c.to_json(), os.path.join(out, n), threads))
            torch.set_num_threads(prev)
        else:
            ctx = multiprocessing.get_context("spawn")
            with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_die_with_parent) as pool:
                pending = set()
                queue = list(todo)
                while queue or pending:
                    while queue and len(pending) < jobs and not os.path.exists(stop):
                        n, c = queue.pop(0)
                        pending.add(pool.submit(_worker, c.to_json(), os.path.join(out, n), threads))
                    if os.path.exists(stop) and queue:
                        log(f"{stop} exists: not launching more runs")
                        queue = []
                    if not pending:
                        break
                    done, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                    for f in done:
                        finished(*f.result())
    finally:
        if bar is not None:
            bar.close()
        collect_results(configs, out)
    return counts


def collect_results(configs: Sequence[Tuple[str, RunConfig]], out: str) -> List[Dict[str, Any]]:
    """Summaries of the finished runs of a grid (grid order), also written to out/results.json."""
    rows = []
    for n, _ in configs:
        s = read_summary(os.path.join(out, n))
        if s is not None:
            rows.append({"name": n, **s})
    write_json(os.path.join(out, "results.json"), {"runs": rows})
    return rows
