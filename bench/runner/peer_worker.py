"""PyTorch peers of the side-by-side benchmark (nngeometry, ASDL), usable in-process or as a subprocess.

The runner (bench/runner/case.py) imports :func:`torch_sequential` and :func:`peer_kernel_fn` from here
when the peers are importable next to ntk_fast; otherwise it runs this file as a script with another Python
(a venv holding the peers and the same torch):

    PYTHON bench/runner/peer_worker.py SPEC.json

SPEC.json: {"method": "nngeometry" | "asdl", "dtype": "float32", "beta": 5.0, "c": 1.40438..,
"data": "problem.npz" (x and W0..WL, torch orientation (out, in)), "out": folder,
"ramp": {"sizes", "flops", "fits", "budget", "warmup", "repeats"} (see ramp.ramp_measure), "block": null}.
It writes out/result.json ({"n", "times", "peak_bytes", "reason", "trace", "kernel", "versions"}) and the
kernel at the measured size as out/K_<n>.npy.  This file imports only numpy, torch and the peer (never ntk_fast), so that it runs in any
environment with torch.

The network is the paper's FC net written as an ordinary nn.Sequential: Scale(1/sqrt(d)), Linear(d, h),
Softplus(beta), Scale(c/sqrt(h)), Linear(h, h), ..., Linear(h, 1), all without bias, with the weights of
ntk_fast.FCNet (standard Gaussians).  Because the 1/sqrt(fan_in) factors sit in parameter-free modules, the
gradients with respect to the Linear weights, and hence the NTK, are exactly those of FCNet.
"""
from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import torch
from torch import nn

try:
    from .ramp import fix_malloc, ramp_measure, timed_with_peak  # noqa: F401
except ImportError:                       # run as a script: this folder is sys.path[0]
    from ramp import fix_malloc, ramp_measure, timed_with_peak  # noqa: F401


class Scale(nn.Module):
    """Multiply by a constant (no parameters: invisible to the peers' layer collections)."""

    def __init__(self, s: float):
        super().__init__()
        self.s = float(s)

    def forward(self, x):
        return x * self.s

    def extra_repr(self) -> str:
        return f"{self.s:.6g}"


def torch_sequential(weights, beta: float, c: float, dtype=torch.float32) -> nn.Sequential:
    """The FC net with the given weights [(h, d), (h, h), ..., (1, h)] (torch orientation) as nn.Sequential."""
    layers = [Scale(1.0 / math.sqrt(weights[0].shape[1]))]
    for l, w in enumerate(weights):
        w = torch.as_tensor(np.asarray(w)).to(dtype)
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
        layers.append(lin)
        if l < len(weights) - 1:
            layers.append(nn.Softplus(beta=beta, threshold=40.0))   # exact to e^-40; default 20 linearises
            layers.append(Scale(c / math.sqrt(w.shape[0])))
    return nn.Sequential(*layers)


def peer_available(method: str) -> bool:
    try:
        if method == "nngeometry":
            import nngeometry  # noqa: F401
        elif method == "asdl":
            import asdl  # noqa: F401
        else:
            return False
        return True
    except Exception:
        return False


def peer_version(method: str) -> str:
    from importlib import metadata
    try:
        return metadata.version({"nngeometry": "nngeometry", "asdl": "asdfghjkl"}[method])
    except Exception:
        return "?"


def peer_kernel_fn(method: str, model: nn.Module, x: torch.Tensor, block=None):
    """A no-argument callable returning the (n, n) empirical NTK of ``model`` on x by the peer library.

    nngeometry: ``GramMatrix(model, loader, representation=FMatDense)`` (per-layer (X X^T) o (G G^T) over
    lower-triangle blocks of ``block`` points; the whole kernel in one block by default).
    ASDL: ``asdl.kernel.batch(empirical_class_wise_hadamard_ntk, model, x, batch_size=block)``
    (class-wise Hadamard NTK, upper-triangle blocks; one block by default).
    """
    n = x.shape[0]
    bs = n if not block else int(block)
    if method == "nngeometry":
        from nngeometry.object import FMatDense
        try:
            from nngeometry.gram import GramMatrix
        except ImportError:                      # older releases
            from nngeometry.metrics import GramMatrix
        from torch.utils.data import DataLoader, TensorDataset

        def fn():
            loader = DataLoader(TensorDataset(x), batch_size=bs, shuffle=False)
            G = GramMatrix(model=model, loader=loader, representation=FMatDense)
            return G.to_torch().reshape(n, n) if hasattr(G, "to_torch") else G.get_dense_tensor().reshape(n, n)
        return fn
    if method == "asdl":
        from asdl.kernel import batch, empirical_class_wise_hadamard_ntk
        if n % bs:
            raise ValueError(f"asdl: the block size {bs} must divide n={n}")

        def fn():
            return batch(empirical_class_wise_hadamard_ntk, model, x, batch_size=bs)[:, :, 0]
        return fn
    raise ValueError(f"unknown peer {method!r}")


# ------------------------------------------------------------------------------------------ script

def main(spec_path: str) -> int:
    fix_malloc()
    with open(spec_path) as f:
        spec = json.load(f)
    method = spec["method"]
    dtype = getattr(torch, spec["dtype"])
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    data = np.load(spec["data"])
    nl = sum(1 for k in data.files if k.startswith("W"))
    weights = [data[f"W{l}"] for l in range(nl)]
    x_all = torch.as_tensor(data["x"]).to(dtype)
    model = torch_sequential(weights, spec["beta"], spec["c"], dtype)
    r = spec["ramp"]
    m, times, peak, K, reason, trace = ramp_measure(
        lambda m: peer_kernel_fn(method, model, x_all[:m].contiguous(), spec.get("block")),
        r["sizes"], r["flops"], r["fits"], r["budget"], r["warmup"], r["repeats"])
    out = {"versions": {"torch": torch.__version__, method: peer_version(method)},
           "n": m, "times": times, "peak_bytes": peak, "reason": reason, "trace": trace}
    if spec.get("save", True):
        path = os.path.join(spec["out"], f"K_{m}.npy")
        np.save(path, K.detach().double().numpy().reshape(m, m))
        out["kernel"] = path
    with open(os.path.join(spec["out"], "result.json"), "w") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
