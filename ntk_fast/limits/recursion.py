"""The per-point part of the infinite-width recursion: the layer variances q_l(x) = Sigma_l(x, x).

    q_0(x) = |x|^2 / d,     q_{l+1}(x) = E[sigma(sqrt(q_l(x)) z)^2],  z ~ N(0, 1)

(for FCNet's normalised activations q_{l+1} = 1 whenever q_l = 1, i.e. on the sphere of radius sqrt(d);
for ReLU q_{l+1} = c^2 q_l / 2 = q_l exactly).  Cost O(n L m).
"""
from __future__ import annotations

import torch

from ntk_fast.limits.quadrature import Activation, second_moment


def layer_variances(act: Activation, q0: torch.Tensor, L: int, nodes: torch.Tensor, weights: torch.Tensor
                    ) -> torch.Tensor:
    """(L, n) float64: row l is q_l for l = 0 .. L-1 (the variances entering the L activation layers)."""
    q = torch.empty((L, q0.numel()), dtype=torch.float64)
    q[0] = q0.to(torch.float64).reshape(-1)
    for l in range(1, L):
        if act.name == "relu":
            q[l] = act.c * act.c / 2.0 * q[l - 1]
        else:
            q[l] = second_moment(act, q[l - 1], nodes, weights)
    return q
