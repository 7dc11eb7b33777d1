"""The on-disk Gram (ntk_fast.distributed): 1 rank vs 2 ranks (gloo, 1 thread each) vs 1 process with
2 threads, and features cached per rank vs recomputed per tile (cache_features=False) vs the in-memory
path (empirical_ntk into a memmap, features once).

    python bench/bench_distributed.py [--n 3000] [--d 784] [--h 512] [--L 2] [--tile 512] [--configs 2x1:disk,1x2:disk]

Writes bench/results/distributed-<date>-n<n>-h<h>-L<L>.json and .md (machine, load average, wall times).  Each
configuration starts fresh processes (torch import excluded: the time is taken inside the worker, from the
first collective to the end of gram_to_disk).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = r'''
import json, os, sys, time, datetime
import numpy as np, torch
n, d, h, L, tile, world, rank, threads, kind, path = sys.argv[1:11]
n, d, h, L, tile, world, rank, threads = map(int, (n, d, h, L, tile, world, rank, threads))
torch.set_num_threads(threads)
from ntk_fast import FCNet, empirical_ntk
from ntk_fast.distributed import gram_to_disk
g = torch.Generator().manual_seed(0)
x = torch.randn(n, d, generator=g)
net = FCNet(d, h, L, generator=torch.Generator().manual_seed(1))
if world > 1:
    torch.distributed.init_process_group("gloo", init_method="file://" + path + ".pg", rank=rank,
                                         world_size=world, timeout=datetime.timedelta(seconds=600))
    torch.distributed.barrier()
t0 = time.perf_counter()
if kind in ("disk", "disk-per-tile"):
    gram_to_disk(net, x, path, tile=tile, progress=False, cache_features=kind == "disk")
else:                                  # features once, panels of `tile` rows into a memmap of the same file size
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, n))
    empirical_ntk(net, x, out=torch.from_numpy(mm), block_size=tile, progress=False)
    mm.flush()
wall = time.perf_counter() - t0
if world > 1:
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
status = open("/proc/self/status").read().split("\n")
mem = {l.split(":")[0]: l.split(":")[1].strip() for l in status if l.startswith(("VmHWM", "RssAnon", "RssFile"))}
done = {}
if kind != "memory":
    from ntk_fast.distributed.manifest import done_path
    blob = json.load(open(done_path(path, rank)))
    done = {"tiles": len(blob["tiles"]), "compute_seconds": blob.get("compute_seconds"),
            "write_seconds": blob.get("write_seconds")}
print(json.dumps({"rank": rank, "wall": wall, "mem": mem, "done": done}))
'''


def launch(args, world: int, threads: int, kind: str, folder: str, index: int = 0):
    path = os.path.join(folder, f"{kind}-{world}x{threads}-{index}.npy")     # a fresh file per run

    script = os.path.join(folder, "worker.py")
    with open(script, "w") as fh:
        fh.write(WORKER)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS=str(threads))
    procs = [subprocess.Popen([sys.executable, script, str(args.n), str(args.d), str(args.h), str(args.L),
                               str(args.tile), str(world), str(r), str(threads), kind, path], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in range(world)]
    out = []
    for p in procs:
        o, e = p.communicate(timeout=3600)
        if p.returncode != 0:
            raise RuntimeError(e.decode()[-2000:])
        out.append(json.loads(o.decode().strip().splitlines()[-1]))
    return {"world": world, "threads": threads, "kind": kind, "wall": max(o["wall"] for o in out), "ranks": out}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--d", type=int, default=784)
    ap.add_argument("--h", type=int, default=512)
    ap.add_argument("--L", type=int, default=2)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--machine", default="2-core AMD EPYC VM, no GPU")
    ap.add_argument("--configs", default="1x1:memory,1x1:disk-per-tile,1x1:disk,2x1:disk,1x2:disk",
                    help="comma-separated RANKSxTHREADS:KIND (KIND memory, disk, disk-per-tile), run in this order")
    ap.add_argument("--note", default="", help="a line for the .md (e.g. what else loaded the machine)")
    args = ap.parse_args()
    sys.path.insert(0, ROOT)
    from ntk_fast.diagnostics.machine import machine_info
    runs, load0 = [], os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        for i, spec in enumerate(args.configs.split(",")):
            shape, kind = spec.split(":")
            world, threads = map(int, shape.split("x"))
            runs.append(launch(args, world, threads, kind, folder, i))
            print(runs[-1]["kind"], runs[-1]["world"], "x", runs[-1]["threads"], f"{runs[-1]['wall']:.2f} s",
                  flush=True)
    day = datetime.date.today().isoformat()
    res = {"machine": args.machine, "machine_info": machine_info(), "loadavg_at_start": load0,
           "loadavg_at_end": os.getloadavg(),
           "args": vars(args), "runs": runs, "medians": medians(runs)}
    base = os.path.join(ROOT, "bench", "results", f"distributed-{day}-n{args.n}-h{args.h}-L{args.L}")
    with open(base + ".json", "w") as fh:
        json.dump(res, fh, indent=1)
    with open(base + ".md", "w") as fh:
        fh.write(f"# On-disk Gram, {args.machine}, {day}\n\nFCNet d={args.d} h={args.h} L={args.L}, float32, "
                 f"n={args.n}, tile={args.tile}; load average at end {os.getloadavg()[0]:.1f} "
                 f"(shared machine: times are indicative only)\n\n{args.note}\n\n| config | wall s |\n|---|---|\n")
        for r in runs:
            name = {"memory": "empirical_ntk into a memmap (features once, panels)",
                    "disk": "gram_to_disk (features cached per rank)",
                    "disk-per-tile": "gram_to_disk, cache_features=False (empirical_ntk per tile)"}[r["kind"]] + \
                f", {r['world']} rank(s) x {r['threads']} thread(s)"
            fh.write(f"| {name} | {r['wall']:.2f} |\n")
        med = medians(runs)
        fh.write("\n| config (RANKSxTHREADS:KIND) | runs | median wall s |\n|---|---|---|\n")
        for key, (count, m) in med.items():
            fh.write(f"| {key} | {count} | {m:.2f} |\n")
        if "2x1:disk" in med and "1x2:disk" in med:
            ratio = med["2x1:disk"][1] / med["1x2:disk"][1]
            fh.write(f"\n2 ranks x 1 thread against 1 process x 2 threads (medians): {ratio:.3f} "
                     f"({100 * (ratio - 1):+.1f}%)\n")
    print("wrote", base + ".json")


def medians(runs) -> dict:
    """{"RxT:kind": (number of runs, median wall seconds)} in first-seen order."""
    import statistics
    groups: dict = {}
    for r in runs:
        groups.setdefault(f"{r['world']}x{r['threads']}:{r['kind']}", []).append(r["wall"])
    return {k: (len(v), statistics.median(v)) for k, v in groups.items()}


if __name__ == "__main__":
    main()
