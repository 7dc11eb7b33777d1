"""Per-layer correlation maps for equal-norm inputs, tabulated once and interpolated.

When every input has the same norm (the paper's inputs lie on the sphere of radius sqrt(d)), the variance
q_l is one number per layer and Sigma_{l+1}(x, x') depends on the entry only through rho = Sigma_l / q_l:

    E_l(rho) = E[sigma(u) sigma(v)],   Edot_l(rho) = E[sigma'(u) sigma'(v)],   Var u = Var v = q_l, corr rho.

Each map is tabulated at K + 1 points of t = sqrt(1 - rho) (rho >= 0) and of s = sqrt(1 + rho) (rho <= 0),
t, s = j / K, and read back by four-point Lagrange interpolation (``ops.reference_limits.table_maps``).
The change of variable removes the sqrt(1 -+ rho) singularities of the ReLU maps at rho = +-1
(arccos(1 - t^2) = 2 arcsin(t / sqrt 2) is analytic in t), and is harmless for smooth activations.
Error (measured against the closed form, K = 256): 1.4e-10 for ReLU (docs/limits.md); for quadrature
activations the table inherits the quadrature error (``table_tol``, default 1e-10).
Cost: 2 (K + 1) expectations per distinct q_l, once (m^2 evaluations each), then O(1) per entry and layer.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

from ntk_fast.ops._loader import native
from ntk_fast.ops.limits import OP
from ntk_fast.limits.quadrature import Activation, bivariate_expectations
from ntk_fast.ops.reference_limits import relu_maps


def table_grid(K: int) -> torch.Tensor:
    """(2, K + 1) correlations of the table rows: rho = 1 - t^2 and rho = s^2 - 1 for t, s = j / K."""
    g = torch.arange(K + 1, dtype=torch.float64) / K
    return torch.stack([1.0 - g * g, g * g - 1.0])


def _expectations_by_op(act: Activation, q: float, rho: torch.Tensor, nodes: torch.Tensor, weights: torch.Tensor
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(E, Edot) at correlations rho and variance q through the compiled op's quadrature (C++, parallel).

    One op call with L = 1 between x = sqrt(2 q) (1, 0) and y_k = sqrt(2 q) (rho_k, sqrt(1 - rho_k^2)) (d = 2, so
    Sigma_0 = q rho_k) and bias b^2 = 2 q + 1: nngp = E, ntk = E + b^2 + Edot (q rho + b^2), whence Edot with a
    divisor q rho + b^2 >= q + 1 (no cancellation near rho = 0 or -1)."""
    r, b2 = math.sqrt(2.0 * q), 2.0 * q + 1.0
    x = torch.tensor([[r, 0.0]], dtype=torch.float64)
    y = torch.stack([r * rho, r * (1.0 - rho * rho).clamp_min(0.0).sqrt()], dim=1)
    qa = torch.full((1, 1), q, dtype=torch.float64)
    qb = torch.full((1, rho.numel()), q, dtype=torch.float64)
    e, t = torch.ops.ntk_fast.limit_kernels(x, y, qa, qb, torch.empty(0, dtype=torch.float64), nodes, weights,
                                            False, 1, act.name, act.beta, act.c, math.sqrt(b2), 0)
    return e[0], (t[0] - e[0] - b2) / (q * rho + b2)


def build_tables(act: Activation, q_layers: torch.Tensor, K: int, nodes: torch.Tensor, weights: torch.Tensor
                 ) -> torch.Tensor:
    """(L, 4, K + 1) float64: for each layer [E(1 - t^2), Edot(1 - t^2), E(s^2 - 1), Edot(s^2 - 1)]."""
    if not isinstance(K, int) or K < 3:
        raise ValueError(f"limit_kernels: table_size must be an int >= 3, got {K!r}")
    rho = table_grid(K).reshape(-1)
    L = q_layers.numel()
    out = torch.empty((L, 4, K + 1), dtype=torch.float64)
    done = {}
    for l in range(L):
        key = float(q_layers[l])
        same = [k for k in done if abs(k - key) <= 1e-13 * abs(key)]
        if same:                            # FCNet's normalised activations keep q = 1 on the sphere: one table
            out[l] = out[done[same[0]]]
            continue
        done[key] = l
        q = torch.full_like(rho, key)
        if act.name == "relu":
            e, ed = relu_maps(q, q, rho, act.c)
        elif act.native and native(OP):
            e, ed = _expectations_by_op(act, key, rho, nodes, weights)
        else:
            e, ed = bivariate_expectations(act, q, q, rho, nodes, weights)
        e, ed = e.reshape(2, K + 1), ed.reshape(2, K + 1)
        out[l, 0], out[l, 1], out[l, 2], out[l, 3] = e[0], ed[0], e[1], ed[1]
    return out
