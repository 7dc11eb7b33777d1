"""neural-tangents side of bench_any_model.py's cnn case, run in its own venv (jax + neural-tangents; never torch).

    NT_PYTHON bench/_peer_ntk_worker_nt.py SPEC.json

SPEC: the same as bench/_peer_ntk_worker_torch.py's, methods among "nt_structured" and "nt_jacobian"
(``nt.empirical_ntk_fn(apply_fn, trace_axes=(-1,), vmap_axes=0, implementation=STRUCTURED_DERIVATIVES or
JACOBIAN_CONTRACTION)`` under jax.jit), plus "repeats" (timed calls after the first, default 1).

The CV in stax, NHWC: per conv layer a zero padding of ``padding`` pixels (stax.Conv only knows VALID / SAME /
CIRCULAR; the CV pads by 1 with 5 x 5 filters, so a parameter-free padding layer comes first), then
``stax.Conv(h, (s, s), strides, padding="VALID", W_std=1, b_std=None, parameterization="ntk")``, which is
conv(a, W) / sqrt(fan_in), exactly the CV's layer, with W = the CV's weight as (s, s, in, out);
``stax.Elementwise(c softplus(beta z) / beta)``; then ``stax.GlobalAvgPool()`` and
``stax.Dense(k, W_std=1, b_std=None, parameterization="ntk")``.  jax float32 on CPU is true float32.
Writes prefix_<method>.npy (n x n, float64) and prefix.json ({method: {"first_s", "s"} or {"error"}}).
"""
from __future__ import annotations

import json
import os
import sys
import time

from _peer_record import record    # this folder is sys.path[0] when run as a script

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def timed(impl, apply_fn, x, params, spec, m):
    """Time the jitted empirical NTK of one implementation (first call with compile, best later call) and save
    its Gram next to the spec's output prefix."""
    import jax
    import numpy as np
    import neural_tangents as nt
    kfn = jax.jit(nt.empirical_ntk_fn(apply_fn, trace_axes=(-1,), vmap_axes=0, implementation=impl))
    t = time.perf_counter()
    K = kfn(x, None, params).block_until_ready()
    first = time.perf_counter() - t
    best = None
    for _ in range(int(spec.get("repeats", 1))):
        t = time.perf_counter()
        K = kfn(x, None, params).block_until_ready()
        dt = time.perf_counter() - t
        best = dt if best is None else min(best, dt)
    np.save(f"{spec['out']}_{m}.npy", np.asarray(K, dtype=np.float64).reshape(x.shape[0], x.shape[0]))
    return {"first_s": first, "s": best if best is not None else first}


def main(path: str) -> int:
    with open(path) as f:
        spec = json.load(f)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import neural_tangents as nt
    from neural_tangents import stax

    beta, c, p = float(spec["beta"]), float(spec["c"]), int(spec["padding"])
    x = jnp.asarray(np.load(spec["x"]).astype(np.float32).transpose(0, 2, 3, 1))      # NCHW -> NHWC
    weights = [np.load(w).astype(np.float32) for w in spec["weights"]]

    def pad_layer(q):
        def init_fn(rng, shape):
            return (shape[0], shape[1] + 2 * q, shape[2] + 2 * q, shape[3]), ()

        def apply_fn(params, a, **kwargs):
            return jnp.pad(a, ((0, 0), (q, q), (q, q), (0, 0)))

        def kernel_fn(*args, **kwargs):
            raise NotImplementedError("padding layer: empirical kernels only")
        return init_fn, apply_fn, kernel_fn

    def act(z):
        return c * jax.nn.softplus(beta * z) / beta

    layers = []
    for w, s in zip(weights[:-1], spec["strides"]):
        if p:
            layers.append(pad_layer(p))
        layers += [stax.Conv(int(w.shape[0]), tuple(int(v) for v in w.shape[2:]), strides=(int(s), int(s)),
                             padding="VALID", W_std=1.0, b_std=None, parameterization="ntk"),
                   stax.Elementwise(act, None)]
    layers += [stax.GlobalAvgPool(), stax.Dense(int(weights[-1].shape[0]), W_std=1.0, b_std=None,
                                                parameterization="ntk")]
    init_fn, apply_fn, _ = stax.serial(*layers)
    _, p0 = init_fn(jax.random.PRNGKey(0), (1,) + tuple(x.shape[1:]))
    params, it = [], iter(weights)
    for q in p0:                                   # Conv / Dense: (W, None); padding, Elementwise, pool: ()
        if isinstance(q, tuple) and len(q) == 2 and getattr(q[0], "ndim", 0) in (2, 4):
            w = next(it)
            w = w.transpose(2, 3, 1, 0) if w.ndim == 4 else w.T                   # OIHW -> HWIO; (out, in) -> (in, out)
            assert q[0].shape == w.shape, (q[0].shape, w.shape)
            params.append((jnp.asarray(w), q[1]))
        else:
            params.append(q)
    impls = {"nt_structured": nt.NtkImplementation.STRUCTURED_DERIVATIVES,
             "nt_jacobian": nt.NtkImplementation.JACOBIAN_CONTRACTION}
    res = {"versions": {"jax": jax.__version__, "neural_tangents": getattr(nt, "__version__", "?")}}
    for m in spec["methods"]:
        record(res, m, spec["out"], lambda: timed(impls[m], apply_fn, x, params, spec, m))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
