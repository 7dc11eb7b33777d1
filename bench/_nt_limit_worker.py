"""neural-tangents side of bench_limits.py, run in its own venv (jax + neural-tangents; never torch).

    NT_PYTHON bench/_nt_limit_worker.py SPEC.json      (a venv with jax + neural-tangents, e.g. .venv-nt)

SPEC: {"x": path.npy, "L": int, "activation": "relu" | "erf", "c": float, "out": prefix, "repeats": int}.
FCNet's layer z' = W (c sigma(z)) / sqrt(h) is stax's "ntk" Dense with W_std = c after an activation
(W_std = 1 on the input layer), sigma = Relu() or Erf() (a = 1, b = 1, c = 0).  Writes prefix_nngp.npy,
prefix_ntk.npy and prefix.json with the times of the first (jit) and best later calls of the jitted kernel_fn.
"""
import json
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)
import numpy as np  # noqa: E402
from neural_tangents import stax  # noqa: E402


def main(path: str) -> int:
    with open(path) as f:
        spec = json.load(f)
    x = np.load(spec["x"])
    act = stax.Relu() if spec["activation"] == "relu" else stax.Erf()
    layers = [stax.Dense(1, W_std=1.0, b_std=None, parameterization="ntk")]
    for _ in range(spec["L"]):
        layers += [act, stax.Dense(1, W_std=float(spec["c"]), b_std=None, parameterization="ntk")]
    _, _, kernel_fn = stax.serial(*layers)
    fn = jax.jit(kernel_fn, static_argnames="get")
    times = []
    for _ in range(1 + int(spec.get("repeats", 2))):
        t = time.perf_counter()
        k = fn(x, None, get=("nngp", "ntk"))
        k.ntk.block_until_ready()
        times.append(time.perf_counter() - t)
    np.save(spec["out"] + "_nngp.npy", np.asarray(k.nngp))
    np.save(spec["out"] + "_ntk.npy", np.asarray(k.ntk))
    with open(spec["out"] + ".json", "w") as f:
        json.dump({"first_s": times[0], "best_s": min(times[1:]) if len(times) > 1 else times[0],
                   "jax": jax.__version__}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
