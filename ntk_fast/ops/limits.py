"""Thin wrapper of the op ``ntk_fast::limit_kernels`` (csrc/limits/limits_cpu.cpp, limits_cuda.cu): native kernel
when the extension has it for the inputs' device, else the pure-torch reference (ops/reference_limits.py, one
warning on the CPU).  Arguments are
checked by the caller (``ntk_fast.limits.limit_kernels``); the semantics are in reference_limits.py."""
from __future__ import annotations

from typing import Tuple

import torch

from ntk_fast.ops._loader import native, register_fake, registered, use_reference
from ntk_fast.ops.reference_limits import limit_kernels_ref
from ntk_fast.ops.selfcheck import native_on

OP = "limit_kernels"


@register_fake(OP)
def _limit_kernels_fake(x1, x2, q1, q2, table, nodes, weights, symmetric, L, activation, beta, c, bias, block=0):
    n2 = x1.shape[0] if symmetric else x2.shape[0]
    return x1.new_empty((x1.shape[0], n2)), x1.new_empty((x1.shape[0], n2))


def limit_kernels_op(x1: torch.Tensor, x2: torch.Tensor, q1: torch.Tensor, q2: torch.Tensor, table: torch.Tensor,
                     nodes: torch.Tensor, weights: torch.Tensor, symmetric: bool, L: int, activation: str,
                     beta: float, c: float, bias: float, block: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(nngp, ntk), each (n1, n2) in x1's dtype; see reference_limits.py for the recursion."""
    args = (x1, x2, q1, q2, table, nodes, weights, bool(symmetric), int(L), str(activation), float(beta),
            float(c), float(bias), int(block))
    if (x1.device.type == "cpu" or _has_kernel(x1.device.type)) and native_on(OP, x1.device):
        return torch.ops.ntk_fast.limit_kernels(*args)
    if x1.device.type == "cpu" or (registered(OP) and not native(OP)):   # a CPU-only build on CUDA: silent
        use_reference(OP)
    return limit_kernels_ref(*args)


def _has_kernel(device_type: str) -> bool:
    """True when the loaded library registers a kernel of the op for this device (CUDA builds only)."""
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"ntk_fast::{OP}", device_type.upper()))
    except (RuntimeError, AttributeError):
        return False
