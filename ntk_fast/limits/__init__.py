"""Infinite-width (h -> infinity) NNGP and NTK of FCNet: ``limit_kernels``.  Maths in docs/limits.md.

Modules: quadrature.py (Gaussian expectations, order selection), recursion.py (per-point variances),
tabulated.py (equal-norm correlation maps); the per-entry recursion is the op ``ntk_fast::limit_kernels``
(ops/limits.py, reference in ops/reference_limits.py).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple, Union

import torch

from ntk_fast.limits.quadrature import Activation, choose_order, normal_rule, resolve_activation, RULES
from ntk_fast.limits.recursion import layer_variances
from ntk_fast.limits.tabulated import build_tables
from ntk_fast.ops.limits import limit_kernels_op
from ntk_fast.ops.reference_limits import limit_kernels_ref

METHODS = ("auto", "exact", "tabulated")
EQUAL_NORM_RTOL = 1e-12


def _check_x(name: str, x, d: Optional[int] = None, ref: Optional[torch.Tensor] = None) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        what = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"limit_kernels: {name} must be a 2-D tensor (n, d) with n, d >= 1, got {what}")
    if x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"limit_kernels: {name} must be float32 or float64, got {x.dtype}")
    if ref is not None:
        if x.shape[1] != ref.shape[1]:
            raise ValueError(f"limit_kernels: {name} must have {ref.shape[1]} columns like x1, got {tuple(x.shape)}")
        if x.dtype != ref.dtype or x.device != ref.device:
            raise ValueError(f"limit_kernels: {name} is {x.dtype} on {x.device} but x1 is {ref.dtype} on {ref.device}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"limit_kernels: {name} has non-finite entries (NaN or inf)")


def _bias_scale(bias) -> float:
    b = (1.0 if bias else 0.0) if isinstance(bias, bool) else bias
    if not isinstance(b, (int, float)) or not math.isfinite(b) or b < 0:
        raise ValueError(f"limit_kernels: bias must be False/True or a finite scale >= 0, got {bias!r}")
    return float(b)


def _equal_norms(q0: torch.Tensor) -> bool:
    lo, hi = float(q0.min()), float(q0.max())
    return hi - lo <= EQUAL_NORM_RTOL * hi


def limit_kernels(x1: torch.Tensor, x2: Optional[torch.Tensor] = None, *, L: int,
                  activation: Union[str, Callable, Tuple[Callable, Callable]] = "softplus", beta: float = 5.0,
                  bias: Union[bool, float] = False, method: str = "auto", quad_tol: float = 1e-8,
                  table_tol: float = 1e-10, rule: str = "trapezoid", table_size: int = 256,
                  block: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Infinite-width kernels (nngp, ntk) of ``FCNet(d, h, L, activation=..., beta=..., bias=...)`` as h -> inf.

    Args:
        x1: (n1, d); x2: (n2, d) or None (x1 with itself: the symmetric half is computed and mirrored).
        L: hidden layers (>= 1), as in FCNet.  activation: FCNet's normalised "softplus" (beta), "relu",
            "tanh"; or any elementwise torch function (derivative by autograd) or a pair (sigma, dsigma),
            used as given.  bias: FCNet's bias scale b (False = 0, True = 1): zero-initialised biases add
            nothing to the NNGP and b^2 per layer to the NTK (docs/limits.md).
        method: "exact" (per entry: ReLU closed form or quadrature), "tabulated" (equal-norm inputs only:
            per-layer correlation maps interpolated), "auto" (tabulated for non-ReLU equal-norm inputs).
        quad_tol: absolute error of the per-entry expectations (chooses the quadrature order);
            table_tol: the same for the tables.  rule: "trapezoid" or "hermite".  table_size: K.
        block: tile edge of the op (0 = automatic).
    Returns:
        nngp = Sigma(x1, x2) = E[f(x1) f(x2)] and ntk = Theta(x1, x2), each (n1, n2) in x1's dtype.
    Cost: O(n1 n2 (d + L)) for ReLU and tables, O(n1 n2 (d + L m^2)) by per-entry quadrature; memory: the
    outputs plus O((n1 + n2) L) (and the tables, 4 L (K + 1) numbers).
    """
    _check_x("x1", x1)
    if x2 is not None:
        _check_x("x2", x2, ref=x1)
    if not isinstance(L, int) or isinstance(L, bool) or L < 1:
        raise ValueError(f"limit_kernels: L must be an int >= 1, got {L!r}")
    if method not in METHODS:
        raise ValueError(f"limit_kernels: method must be one of {METHODS}, got {method!r}")
    if rule not in RULES:
        raise ValueError(f"limit_kernels: rule must be one of {RULES}, got {rule!r}")
    b = _bias_scale(bias)
    act = resolve_activation(activation, beta)
    d = x1.shape[1]
    q01 = x1.to(torch.float64).pow(2).sum(1).cpu() / d
    q02 = q01 if x2 is None else x2.to(torch.float64).pow(2).sum(1).cpu() / d
    equal = _equal_norms(torch.cat([q01, q02]))
    if method == "tabulated" and not equal:
        raise ValueError("limit_kernels: method='tabulated' needs inputs of one norm (x1 and x2 rows with equal "
                         "|x|); use method='exact'")
    tabulate = method == "tabulated" or (method == "auto" and equal and act.name != "relu")
    tol = table_tol if tabulate else quad_tol
    probe = [min(float(q01.min()), float(q02.min())), max(float(q01.max()), float(q02.max()))]
    if act.name == "relu":
        nodes = weights = torch.empty(0, dtype=torch.float64)
    else:
        nodes, weights = normal_rule(choose_order(act, probe, tol, rule), rule)
    qa = layer_variances(act, q01, L, nodes, weights)
    qb = qa if x2 is None else layer_variances(act, q02, L, nodes, weights)
    table = (build_tables(act, qa[:, 0], table_size, nodes, weights) if tabulate
             else torch.empty(0, dtype=torch.float64))
    dev = x1.device
    qa, qb, table, nd, wt = (t.to(dev) for t in (qa, qb, table, nodes, weights))
    x2_ = x1 if x2 is None else x2
    if act.native or tabulate:
        return limit_kernels_op(x1, x2_, qa, qb, table, nd, wt, x2 is None, L, act.name, act.beta, act.c, b, block)
    return limit_kernels_ref(x1, x2_, qa, qb, table, nd, wt, x2 is None, L, act.name, act.beta, act.c, b, block,
                             sigma=act.sigma, dsigma=act.dsigma)


__all__ = ["limit_kernels", "Activation", "resolve_activation", "choose_order", "normal_rule", "METHODS"]
