"""neural-tangents column of the side-by-side benchmark, run as a script in its own environment.

    NT_PYTHON bench/runner/nt_worker.py SPEC.json

Same SPEC.json protocol as ``peer_worker.py`` (method "neural_tangents").  Imports only numpy, jax and
neural_tangents (never torch or ntk_fast): neural-tangents 0.6.5 needs old jax/numpy pins that must not meet
ours (scripts/setup_peers.sh installs them in .venv-nt).  The network is the paper's FC net in stax with the "ntk" parameterisation:
Dense(h, W_std=1, b_std=None) computes x @ W / sqrt(fan_in), exactly FCNet's layer, with W = FCNet's weight
transposed; the activation is c * softplus(beta z) / beta.  The kernel is
``empirical_ntk_fn(apply_fn, trace_axes=(), vmap_axes=0, implementation=STRUCTURED_DERIVATIVES)`` under jax.jit.
On CPU, jax's float32 matmuls are true float32.
"""
from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ramp import fix_malloc, ramp_measure  # noqa: E402  (pure Python, no torch)


def main(spec_path: str) -> int:
    fix_malloc()
    with open(spec_path) as f:
        spec = json.load(f)
    import jax
    if spec["dtype"] == "float64":
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    import neural_tangents as nt
    from neural_tangents import stax

    beta, c = float(spec["beta"]), float(spec["c"])
    dtype = jnp.float64 if spec["dtype"] == "float64" else jnp.float32
    data = np.load(spec["data"])
    nl = sum(1 for k in data.files if k.startswith("W"))
    weights = [data[f"W{l}"] for l in range(nl)]
    x_all = data["x"]

    def act(z):
        return c * jax.nn.softplus(beta * z) / beta

    layers = []
    for l, w in enumerate(weights):
        layers.append(stax.Dense(int(w.shape[0]), W_std=1.0, b_std=None, parameterization="ntk"))
        if l < nl - 1:
            layers.append(stax.Elementwise(act, None))
    init_fn, apply_fn, _ = stax.serial(*layers)
    _, p0 = init_fn(jax.random.PRNGKey(0), (1, int(weights[0].shape[1])))
    params, it = [], iter(weights)
    for p in p0:                       # Dense: (W (in, out), None); Elementwise: ()
        if isinstance(p, tuple) and len(p) == 2 and getattr(p[0], "ndim", 0) == 2:
            w = next(it)
            assert p[0].shape == w.T.shape, (p[0].shape, w.shape)
            params.append((jnp.asarray(w.T, dtype=dtype), p[1]))
        else:
            params.append(p)
    kfn = jax.jit(nt.empirical_ntk_fn(apply_fn, trace_axes=(), vmap_axes=0,
                                      implementation=nt.NtkImplementation.STRUCTURED_DERIVATIVES))

    def make(m):
        x = jnp.asarray(x_all[:m], dtype=dtype)
        return lambda: kfn(x, None, params).block_until_ready()

    r = spec["ramp"]
    m, times, peak, K, reason, trace = ramp_measure(make, r["sizes"], r["flops"], r["fits"], r["budget"],
                                                    r["warmup"], r["repeats"])
    out = {"versions": {"jax": jax.__version__, "neural_tangents": getattr(nt, "__version__", "?")},
           "n": m, "times": times, "peak_bytes": peak, "reason": reason, "trace": trace}
    if spec.get("save", True):
        path = os.path.join(spec["out"], f"K_{m}.npy")
        np.save(path, np.asarray(K, dtype=np.float64).reshape(m, m))
        out["kernel"] = path
    with open(os.path.join(spec["out"], "result.json"), "w") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
