"""Pure-torch references (simple, slow, float64-safe) for the extension ops and the NTK paths.

* ``gram_reference``: the op ``ntk_fast::gram`` written as per-layer matmuls and Hadamard products,

      out = sum_l s_l (D1_l D2_l^T) o (A1_l A2_l^T)            (n1 x n2)

  It materialises two n1 x n2 matrices per layer; cost 2 n1 n2 sum_l (fan_in_l + fan_out_l) flops.
* ``jacobian_ntk_reference``: the empirical NTK of any module by full per-sample Jacobians (torch.func)
  and one contraction, Theta[i, j, c, c'] = sum_p J[i, c, p] J[j, c', p].  Memory n k P.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from torch import nn


def gram_reference(a1: Sequence[torch.Tensor], d1: Sequence[torch.Tensor],
                   a2: Optional[Sequence[torch.Tensor]] = None, d2: Optional[Sequence[torch.Tensor]] = None,
                   scales: Optional[Sequence[float]] = None) -> torch.Tensor:
    """sum_l scales[l] * (d1[l] @ d2[l].T) * (a1[l] @ a2[l].T); a2/d2 default to a1/d1."""
    a2 = a1 if a2 is None else a2
    d2 = d1 if d2 is None else d2
    scales = [1.0] * len(a1) if scales is None else scales
    out = None
    for s, a, d, b, e in zip(scales, a1, d1, a2, d2):
        term = (d @ e.T) * (a @ b.T) * s
        out = term if out is None else out + term
    return out


def _trainable(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}


def per_sample_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """J[i, c, p] = d f_c(x_i) / d w_p over the parameters that require grad: shape (n, k, P)."""
    from torch.func import functional_call, jacrev, vmap

    params = _trainable(model)
    fixed = {k: v for k, v in model.named_parameters() if not v.requires_grad}
    fixed.update(dict(model.named_buffers()))

    def f(p, xi):
        out = functional_call(model, {**p, **fixed}, (xi.unsqueeze(0),))
        return out.reshape(-1)

    jac = vmap(jacrev(f), in_dims=(None, 0))(params, x)          # dict name -> (n, k, *shape)
    n = x.shape[0]
    return torch.cat([j.reshape(n, j.shape[1], -1) for j in jac.values()], dim=2)


def jacobian_ntk_reference(model: nn.Module, x1: torch.Tensor, x2: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Full empirical NTK (n1, n2, k, k) by Jacobian contraction (no blocking)."""
    j1 = per_sample_jacobian(model, x1)
    j2 = j1 if x2 is None else per_sample_jacobian(model, x2)
    return torch.einsum("icp,jdp->ijcd", j1, j2)
