"""The benchmark's methods: their names and labels, and the in-process ones as no-argument callables.

Every method returns the same (n, n) kernel Theta(x_i, x_j) = sum_p df(x_i)/dw_p df(x_j)/dw_p of the same
net at the same points; the peers that need their own environment run in subprocesses (subprocess_runner.py).
"""
from __future__ import annotations

import torch

from .problem import Dims, jac_block, ntvp_block, param_groups

ALL_METHODS = ("ntk_fast", "reference", "func_jacobian", "func_ntvp", "neural_tangents", "nngeometry", "asdl",
               "brute_force")
IN_PROCESS = ("ntk_fast", "reference", "func_jacobian", "func_ntvp", "brute_force")
PEERS = ("nngeometry", "asdl")          # PyTorch peers: in-process when importable, else the peers venv
LABELS = {
    "ntk_fast": "ntk_fast (features + fused Gram op)",
    "reference": "plain torch structured (per-layer Grams)",
    "func_jacobian": "torch.func Jacobian contraction (blocked)",
    "func_ntvp": "torch.func NTK-vector products (vjp+jvp)",
    "neural_tangents": "neural-tangents structured derivatives (jit)",
    "nngeometry": "nngeometry GramMatrix (FMatDense)",
    "asdl": "ASDL class-wise Hadamard NTK",
    "brute_force": "reference-code style brute force (backward per point)",
}


def brute_force_fn(net, x):
    """One backward pass per point, J (n x P_group) stored densely, K += J J^T per parameter group."""
    params = [p for p in net.parameters() if p.requires_grad]
    n = x.shape[0]

    def fn():
        K = torch.zeros(n, n, dtype=x.dtype)
        for group in param_groups([p.numel() for p in params], n, x.element_size()):
            ps = [params[i] for i in group]
            J = torch.empty(n, sum(p.numel() for p in ps), dtype=x.dtype)
            for i in range(n):
                out = net(x[i:i + 1]).sum()
                gs = torch.autograd.grad(out, ps)
                J[i] = torch.cat([g.reshape(-1) for g in gs])
            K += J @ J.T
            del J
        return K
    return fn


def func_jacobian_fn(net, x, block: int):
    """torch.func per-sample Jacobians in row blocks of ``block`` points; upper block pairs contracted and
    mirrored (column blocks recomputed, so at most two blocks are held)."""
    from ntk_fast.ops.reference import per_sample_jacobian
    n = x.shape[0]

    def jac(i):
        return per_sample_jacobian(net, x[i:i + block]).reshape(min(block, n - i), -1)

    def fn():
        with torch.no_grad():
            K = torch.empty(n, n, dtype=x.dtype)
            starts = list(range(0, n, block))
            for a, i in enumerate(starts):
                Ji = jac(i)
                K[i:i + Ji.shape[0], i:i + Ji.shape[0]] = Ji @ Ji.T
                for j in starts[a + 1:]:
                    Jj = jac(j)
                    blk = Ji @ Jj.T
                    K[i:i + Ji.shape[0], j:j + Jj.shape[0]] = blk
                    K[j:j + Jj.shape[0], i:i + Ji.shape[0]] = blk.T
                    del Jj
            return K
    return fn


def func_ntvp_fn(net, x, block: int):
    """NTK-vector products: column K e_j = J (J^T e_j) by a vjp then a jvp, ``block`` columns per vmap."""
    from torch.func import functional_call, jvp, vjp, vmap
    n = x.shape[0]
    params = {k: v.detach() for k, v in net.named_parameters()}

    def f(p):
        return functional_call(net, p, (x,)).reshape(n)

    def fn():
        _, vjp_fn = vjp(f, params)

        def column(v):
            (ct,) = vjp_fn(v)
            return jvp(f, (params,), (ct,))[1]
        K = torch.empty(n, n, dtype=x.dtype)
        for i in range(0, n, block):
            m = min(block, n - i)
            E = torch.zeros(m, n, dtype=x.dtype)
            E[torch.arange(m), i + torch.arange(m)] = 1.0
            K[:, i:i + m] = vmap(column)(E).T
        return K
    return fn


def make_in_process(method: str, net, x, dims: Dims, opts: dict):
    """A no-argument callable computing the Gram of ``net`` on ``x`` by ``method`` in this process."""
    from ntk_fast import empirical_ntk
    from ntk_fast.ops.reference import gram_reference
    if method == "ntk_fast":
        return lambda: empirical_ntk(net, x)
    if method == "reference":
        def fn():
            A, D = net.features(x)
            return gram_reference(A, D)
        return fn
    if method == "func_jacobian":
        return func_jacobian_fn(net, x, min(x.shape[0], jac_block(dims, opts)))
    if method == "func_ntvp":
        return func_ntvp_fn(net, x, ntvp_block(dims, x.shape[0], opts))
    if method == "brute_force":
        return brute_force_fn(net, x)
    if method in PEERS:
        from .peer_worker import peer_kernel_fn
        return peer_kernel_fn(method, opts["seq_model"], x, opts.get("peer_block"))
    raise ValueError(method)
