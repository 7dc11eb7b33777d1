"""nngeometry and ASDL side of bench_any_model.py's cnn case, run in a venv with torch + the peers (never ntk_fast).

    PEERS_PYTHON bench/_peer_ntk_worker_torch.py SPEC.json

SPEC: {"x": path.npy (n, C, H, W) float32, "weights": [path.npy, ...] (the CV's conv weights (out, in, s, s),
then the readout (k, h)), "strides": [int per conv], "beta": float, "c": float, "threshold": float,
"padding": int, "methods": [names], "out": prefix, "warmup_n": int, "threads": int | null}.  Methods:

* nngeometry:        ``GramMatrix(model, DataLoader(x, batch_size=n), representation=FMatDense)`` (its dense
                     representation of the Gram of per-example Jacobians, from its hooks).
* asdl_direct:       ``asdl.kernel.batch(empirical_class_wise_direct_ntk, model, x, batch_size=n)``
                     (per-layer batched gradients, one Gram each).
* asdl_hadamard:     the same with ``empirical_class_wise_hadamard_ntk`` (per-layer (A A^T) o (B B^T) over the
                     unfolded inputs; for a convolution with several output positions ASDL's factorisation is
                     not the exact NTK: reported with its error).
* asdl_direct_ntk:   ``asdl.kernel.empirical_direct_ntk`` (all per-example gradients concatenated, one einsum;
                     in asdfghjkl 0.1a5 it looks for a ``module.operation`` that ``extend`` no longer sets, so it
                     collects nothing and fails).
* asdl_batch_grads:  the same idea through ASDL's current API: ``with extend(model, OP_BATCH_GRADS) as cxt``,
                     one backward pass, ``J = cxt.full_batch_grads(model)``, then ``J @ J.T``.

The model is the paper's CV written as an ordinary nn.Sequential with the CV's weights: per conv layer
Conv2d(bias=False), Scale(1/sqrt(fan_in)), Softplus(beta), Scale(c); then the spatial mean, the readout
Linear(h, k, bias=False) and Scale(1/sqrt(h)).  The 1/sqrt(fan_in) factors and c sit in parameter-free modules,
so the weight gradients, hence the NTK, are exactly the CV's.  Each method is warmed up once at warmup_n
points, then timed once at n.  Writes prefix_<method>.npy (the n x n Gram, float64) and prefix.json
({method: {"s": seconds} or {"error": text}}, "versions": {...}).
"""
from __future__ import annotations

import json
import math
import sys
import os
import time

import numpy as np
import torch
from torch import nn

from _peer_record import record    # this folder is sys.path[0] when run as a script

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "runner"))
from peer_worker import Scale  # noqa: E402  (the runner's constant-scale module: torch only, no ntk_fast)


class SpatialMean(nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3))


def cnn(weights, strides, beta, c, threshold, padding):
    layers = []
    for w, stride in zip(weights[:-1], strides):
        w = torch.as_tensor(w)
        conv = nn.Conv2d(w.shape[1], w.shape[0], tuple(w.shape[2:]), stride=stride, padding=padding, bias=False)
        with torch.no_grad():
            conv.weight.copy_(w)
        layers += [conv, Scale(1.0 / math.sqrt(w[0].numel())), nn.Softplus(beta=beta, threshold=threshold),
                   Scale(c)]
    w = torch.as_tensor(weights[-1])
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    layers += [SpatialMean(), lin, Scale(1.0 / math.sqrt(w.shape[1]))]
    return nn.Sequential(*layers)


def kernel_fn(method, model, x):
    n = x.shape[0]
    if method == "nngeometry":
        from nngeometry.object import FMatDense
        try:
            from nngeometry.gram import GramMatrix
        except ImportError:                      # older releases
            from nngeometry.metrics import GramMatrix
        from torch.utils.data import DataLoader, TensorDataset
        loader = DataLoader(TensorDataset(x), batch_size=n, shuffle=False)
        G = GramMatrix(model=model, loader=loader, representation=FMatDense)
        K = G.to_torch() if hasattr(G, "to_torch") else G.get_dense_tensor()
        return K.reshape(n, n)
    if method in ("asdl_direct", "asdl_hadamard"):
        from asdl.kernel import batch, empirical_class_wise_direct_ntk, empirical_class_wise_hadamard_ntk
        f = empirical_class_wise_direct_ntk if method == "asdl_direct" else empirical_class_wise_hadamard_ntk
        return batch(f, model, x, batch_size=n)[:, :, 0]
    if method == "asdl_direct_ntk":
        from asdl.kernel import empirical_direct_ntk
        return empirical_direct_ntk(model, x)[:, :, 0, 0]
    if method == "asdl_batch_grads":
        from asdl.core import extend
        from asdl.operations import OP_BATCH_GRADS
        with extend(model, OP_BATCH_GRADS) as cxt:
            model.zero_grad()
            model(x).sum().backward()                    # k = 1: one backward pass gives every per-example gradient
            J = cxt.full_batch_grads(model)
        return J @ J.T
    raise ValueError(f"unknown method {method!r}")


def version(dist):
    from importlib import metadata
    try:
        return metadata.version(dist)
    except Exception:  # noqa: BLE001
        return "?"


def timed(method, model, x, wn, out):
    """One warm-up call on wn points, then the timed Gram of every point (saved next to ``out``)."""
    kernel_fn(method, model, x[:wn].contiguous())
    t = time.perf_counter()
    K = kernel_fn(method, model, x)
    dt = time.perf_counter() - t
    np.save(f"{out}_{method}.npy", K.detach().double().numpy())
    return {"s": dt}


def main(path: str) -> int:
    with open(path) as f:
        spec = json.load(f)
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    x = torch.as_tensor(np.load(spec["x"])).float()
    weights = [np.load(p).astype(np.float32) for p in spec["weights"]]
    model = cnn(weights, spec["strides"], float(spec["beta"]), float(spec["c"]), float(spec["threshold"]),
                int(spec["padding"]))
    res = {"versions": {"torch": torch.__version__, "nngeometry": version("nngeometry"),
                        "asdfghjkl": version("asdfghjkl")}}
    wn = int(spec.get("warmup_n", 16))
    for m in spec["methods"]:
        record(res, m, spec["out"], lambda: timed(m, model, x, wn, spec["out"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
