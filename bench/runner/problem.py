"""The benchmark problem: the paper's FC net and its inputs, its dimensions, and each method's cost models.

Cost models (documented in docs/benchmarks.md), with P = sum_l p_l q_l weights, S = sum_l (p_l + q_l) the
width of the structured features and F(n) = 2 n P + 2 n (P - d h) the flops of one forward and one backward
pass over n points:
    ntk_fast          F(n) + n^2 S            (fused Gram op, symmetric half)
    reference         F(n) + 2 n^2 S          (per-layer Grams, full)
    func_jacobian     5 b P per Jacobian block + 2 b^2 P per upper block pair
    func_ntvp         F(n) + 8 n^2 P
    brute_force       groups x 6 n P + 2 n^2 P
Memory models are rough peak bytes, used only to decide whether a size is attempted.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import List, Sequence

import torch

GROUP_BYTES = 2e9   # the paper's reference code caps the Jacobian of a parameter group at 2e9 bytes


@dataclass
class Dims:
    """Dimensions of the benchmark's FC net: input d, width h, L hidden layers, element size in bytes."""
    d: int
    h: int
    L: int
    esize: int

    @property
    def fans(self):
        return [(self.d, self.h)] + [(self.h, self.h)] * (self.L - 1) + [(self.h, 1)]

    @property
    def P(self) -> int:        # number of weights
        return sum(p * q for p, q in self.fans)

    @property
    def S(self) -> int:        # sum_l (fan_in + fan_out): width of the structured features
        return sum(p + q for p, q in self.fans)

    def F(self, n: float) -> float:
        """Flops of the structured features: forward 2 n P, backward deltas 2 n (P - d h)."""
        return 2.0 * n * self.P + 2.0 * n * (self.P - self.d * self.h)


def param_groups(sizes: Sequence[int], n: int, esize: int, cap: float = GROUP_BYTES) -> List[List[int]]:
    """Greedy groups of consecutive parameter tensors whose n-point Jacobian fits ``cap`` bytes."""
    groups, cur, cur_size = [], [], 0
    for i, s in enumerate(sizes):
        if cur and (cur_size + s) * n * esize > cap:
            groups.append(cur)
            cur, cur_size = [], 0
        cur.append(i)
        cur_size += s
    if cur:
        groups.append(cur)
    return groups


def jac_block(dims: Dims, opts: dict) -> int:
    """Points per Jacobian block of func_jacobian (--jac-block, else about 0.5 GB of Jacobian)."""
    if opts.get("jac_block"):
        return int(opts["jac_block"])
    return max(1, int(opts.get("jac_block_bytes", 5e8) // (dims.P * dims.esize)))


def ntvp_block(dims: Dims, n: int, opts: dict) -> int:
    """Columns per vmap of func_ntvp (--ntvp-block, else about 0.5 GB of intermediates)."""
    if opts.get("ntvp_block"):
        return int(opts["ntvp_block"])
    per_col = dims.esize * (3.0 * dims.P + 6.0 * n * dims.h * dims.L)
    return max(1, min(n, int(5e8 // per_col)))


def flops_model(method: str, dims: Dims, n: int, opts: dict) -> float:
    """Counted flops of one Gram evaluation by ``method`` at n points (module docstring)."""
    P, S, F = dims.P, dims.S, dims.F(n)
    if method == "ntk_fast":
        return F + float(n) * n * S
    if method in ("reference", "neural_tangents"):
        return F + 2.0 * n * n * S
    if method == "func_jacobian":
        b = min(n, jac_block(dims, opts))
        B = math.ceil(n / b)
        return 5.0 * b * P * (B + B * (B - 1) / 2) + 2.0 * b * b * P * B * (B + 1) / 2
    if method == "func_ntvp":
        return F + 8.0 * n * n * P
    if method == "nngeometry":
        b = min(n, opts.get("peer_block") or n)
        B = math.ceil(n / b)
        return F * (B + 3) / 2 + float(n) * n * S
    if method == "asdl":
        b = min(n, opts.get("peer_block") or n)
        B = math.ceil(n / b)
        return F * B + 2.0 * n * n * S
    if method == "brute_force":
        G = len(param_groups([p * q for p, q in dims.fans], n, dims.esize))
        return G * 6.0 * n * P + 2.0 * n * n * P
    raise ValueError(method)


def memory_model(method: str, dims: Dims, n: int, opts: dict) -> float:
    """Rough peak bytes of one Gram evaluation, used only to decide whether a size is attempted."""
    e, P, S, hL = dims.esize, dims.P, dims.S, dims.h * dims.L
    feats = e * n * S
    if method == "ntk_fast":
        return feats + e * n * n
    if method == "reference":
        return feats + 3.0 * e * n * n
    if method == "func_jacobian":
        b = min(n, jac_block(dims, opts))
        return e * n * n + 4.0 * e * b * P
    if method == "func_ntvp":
        m = ntvp_block(dims, n, opts)
        return e * n * n + 3.0 * e * m * P + 6.0 * e * m * n * hL
    if method == "neural_tangents":
        return 8.0 * e * n * n + 4.0 * feats
    if method in ("nngeometry", "asdl"):
        return 5.0 * e * n * n + 3.0 * feats
    if method == "brute_force":
        return e * n * n + min(GROUP_BYTES, e * n * P) + 2 * e * P
    raise ValueError(method)


def make_problem(n: int, d: int, h: int, L: int, beta: float, dtype, seed: int):
    """(x, x64, net, net64): n Gaussian points of norm sqrt(d) (the paper's preprocessing) and the paper's FC net
    (softplus beta), in ``dtype`` and in float64 with the same weights."""
    from ntk_fast.models.fc import FCNet
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x = x * (math.sqrt(d) / x.norm(dim=1, keepdim=True))
    net64 = FCNet(d, h, L, activation="softplus", beta=beta, dtype=torch.float64,
                  generator=torch.Generator().manual_seed(seed + 1))
    net = copy.deepcopy(net64).to(dtype)
    return x.to(dtype), x, net, net64
