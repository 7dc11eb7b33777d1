"""Infinite-width kernels: ntk_fast.limit_kernels against neural-tangents' stax kernel_fn, and n = 10,000 timings.

    python bench/bench_limits.py                       # n = 4000 side by side, then n = 10,000 (ours only)
    python bench/bench_limits.py --n 1000 --big 0      # quick
    --nt-python PY (default $NTK_FAST_NT_PYTHON, else .venv-nt/bin/python of scripts/setup_peers.sh): the
    interpreter of a venv with neural-tangents; the comparison is skipped when it cannot import it.

Cases (float64, d = 784, L = 3, no bias):
  * relu, general inputs (Gaussian rows, norms differ): closed form per entry (C++ op);
  * relu, equal-norm inputs (rows on the sphere of radius sqrt(d)): closed form and tabulated maps;
  * erf (custom activation torch.erf, not normalised) on equal-norm inputs: tabulated maps (quadrature);
  * softplus beta = 5 (FCNet's default) on equal-norm inputs: tabulated (no neural-tangents counterpart:
    stax has no softplus kernel).
FCNet's normalising constant c maps to stax's W_std = c on every layer after an activation (W_std = 1 on the
input layer).  neural-tangents runs in a subprocess of its own venv (bench/_nt_limit_worker.py); we report the
max abs difference over max |value| of each kernel, and the wall times (ours: one call, best of 2; theirs:
first call with jit, best of 2 later calls).  Also: per-entry quadrature for general inputs (softplus) timed at
small n and extrapolated as n^2.  Results: bench/results/limits-<date>.{json,md}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import ntk_fast  # noqa: E402

MACHINE = "2-core AMD EPYC VM, no GPU"


def best_time(fn, repeats=2):
    out, best = None, float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best


def data(n, d, sphere, seed=0):
    x = torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=1, keepdim=True) * math.sqrt(d) if sphere else x


def run_nt(nt_python, x, L, activation, c, tmp):
    spec = {"x": os.path.join(tmp, "x.npy"), "L": L, "activation": activation, "c": c,
            "out": os.path.join(tmp, f"nt_{activation}"), "repeats": 2}
    np.save(spec["x"], x.numpy())
    sp = os.path.join(tmp, "spec.json")
    with open(sp, "w") as f:
        json.dump(spec, f)
    r = subprocess.run([nt_python, os.path.join(ROOT, "bench", "_nt_limit_worker.py"), sp],
                       capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        return None, r.stderr[-2000:]
    with open(spec["out"] + ".json") as f:
        info = json.load(f)
    return (np.load(spec["out"] + "_nngp.npy"), np.load(spec["out"] + "_ntk.npy"), info), None


def nt_available(nt_python):
    if not nt_python or not os.path.exists(nt_python):
        return False
    r = subprocess.run([nt_python, "-c", "import neural_tangents"], capture_output=True, timeout=300)
    return r.returncode == 0


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def offdiag(a):
    return a[~np.eye(a.shape[0], dtype=bool)]


def side_by_side(n, d, L, nt_python, rows):
    cases = [("relu", "general", "relu", "exact"), ("relu", "sphere", "relu", "exact"),
             ("relu", "sphere", "relu", "tabulated"), ("erf", "sphere", torch.erf, "tabulated"),
             ("softplus", "sphere", "softplus", "tabulated")]
    have_nt = nt_available(nt_python)
    nt_cache = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, inputs, act, method in cases:
            x = data(n, d, inputs == "sphere")
            (S, T), t_ours = best_time(lambda: ntk_fast.limit_kernels(x, L=L, activation=act, method=method))
            row = {"n": n, "d": d, "L": L, "activation": name, "inputs": inputs, "method": method,
                   "ours_s": round(t_ours, 3)}
            if have_nt and name in ("relu", "erf"):
                key = (name, inputs)
                if key not in nt_cache:
                    c = ntk_fast.activation_normaliser("relu") if name == "relu" else 1.0
                    nt_cache[key] = run_nt(nt_python, x, L, name, c, tmp)
                res, err = nt_cache[key]
                if res is None:
                    row["nt_error"] = err
                else:
                    nngp, ntk, info = res
                    row.update(nt_first_s=round(info["first_s"], 3), nt_best_s=round(info["best_s"], 3),
                               rel_diff_nngp=rel(S.numpy(), nngp), rel_diff_ntk=rel(T.numpy(), ntk),
                               rel_diff_ntk_offdiag=rel(offdiag(T.numpy()), offdiag(ntk)))
            elif name in ("relu", "erf"):
                row["nt"] = "skipped: neural_tangents not importable"
            rows.append(row)
            print(row, flush=True)


def big(n, d, L, rows):
    for name, inputs, method in (("relu", "general", "exact"), ("relu", "sphere", "tabulated"),
                                 ("softplus", "sphere", "tabulated")):
        x = data(n, d, inputs == "sphere")
        t = time.perf_counter()
        gram = x @ x.t()
        t_gram = time.perf_counter() - t
        del gram
        t = time.perf_counter()
        S, T = ntk_fast.limit_kernels(x, L=L, activation=name, method=method)
        rows.append({"n": n, "d": d, "L": L, "activation": name, "inputs": inputs, "method": method,
                     "ours_s": round(time.perf_counter() - t, 3), "plain_gram_x_xT_s": round(t_gram, 3)})
        print(rows[-1], flush=True)
        del S, T


def quadrature_cost(d, L, rows, n=200):
    x = data(n, d, False)
    t = time.perf_counter()
    ntk_fast.limit_kernels(x, L=L, activation="softplus", method="exact")
    dt = time.perf_counter() - t
    rows.append({"n": n, "d": d, "L": L, "activation": "softplus", "inputs": "general", "method": "exact",
                 "ours_s": round(dt, 3), "extrapolated_n10000_s": round(dt * (10000 / n) ** 2, 1)})
    print(rows[-1], flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--big", type=int, default=10000, help="n of the ours-only timings (0: skip)")
    ap.add_argument("--d", type=int, default=784)
    ap.add_argument("--L", type=int, default=3)
    ap.add_argument("--quad-n", type=int, default=200, help="n of the per-entry quadrature timing (0: skip)")
    ap.add_argument("--nt-python", default=os.environ.get("NTK_FAST_NT_PYTHON",
                                                          os.path.join(ROOT, ".venv-nt", "bin", "python")))
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    a = ap.parse_args()
    rows = []
    side_by_side(a.n, a.d, a.L, a.nt_python, rows)
    if a.quad_n:
        quadrature_cost(a.d, a.L, rows, a.quad_n)
    if a.big:
        big(a.big, a.d, a.L, rows)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d-%H%M")
    meta = {"machine": MACHINE, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_average_at_end": os.getloadavg(), "date_utc": stamp}
    os.makedirs(a.out, exist_ok=True)
    base = os.path.join(a.out, f"limits-{stamp}")
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(f"# limit_kernels benchmark ({MACHINE}), {stamp} UTC\n\n")
        f.write(f"torch {meta['torch']}, {meta['threads']} threads, load average at the end {meta['load_average_at_end']}"
                " (the machine is shared: times vary with the load)\n\n")
        keys = ["n", "activation", "inputs", "method", "ours_s", "nt_first_s", "nt_best_s", "rel_diff_nngp",
                "rel_diff_ntk", "rel_diff_ntk_offdiag", "plain_gram_x_xT_s", "extrapolated_n10000_s"]
        f.write("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n")
        for r in rows:
            f.write("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |\n")
    print("wrote", base + ".json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
