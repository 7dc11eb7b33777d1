"""Byte estimates of what the public entry points allocate (used with :func:`ntk_fast.guards.require_memory`).

Each estimate counts the result, the features and the main temporaries (e = bytes per element):

* empirical_ntk, structured path: features n sum_l (p_l + k q_l) e per point set (p_l = fan_in + 1 with a bias,
  q_l = fan_out) and the result n1 n2 k^2 e when ``out`` is None (mode "full" with k > 1 writes it directly:
  the gram_full op keeps only per-thread tiles; a result on another device adds one row panel of block_size
  rows, default max(64, n1 / 8));
  jacobian path: two Jacobian blocks 2 b k P e, their contraction b^2 k^2 e, and the result when ``out`` is None.
* train: per net, weights, gradients (two buffers each) and w0 (5 P), momentum (2 P when tau > 0), outputs
  (2 n) and the forward activations (about 3 n h (L + 1)).
* kernel_flow: the solver's copy of Theta (packed upper triangle, or a contiguous copy when K_train is not
  contiguous) plus about 12 vectors of E n entries.
* kernel_regression: K + (ridge + jitter) I, the identity and the Cholesky factor (3 n^2) plus the right-hand
  sides and predictions.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ntk_fast.ntk.panels import default_full_rows

__all__ = ["empirical_ntk_bytes", "train_bytes", "kernel_flow_bytes", "kernel_regression_bytes", "NTK_WAY_OUT"]

NTK_WAY_OUT = ("Ways out: pass out= a numpy memmap on disk (e.g. torch.from_numpy(numpy.lib.format.open_memmap("
               "'gram.npy', mode='w+', dtype=..., shape=...))) together with block_size= (rows per panel); use "
               "mode='trace' instead of the (n1, n2, k, k) 'full' Gram; or split the Gram over processes/GPUs "
               "with the distributed Gram (ntk_fast.distributed).")


def _feature_width(model: nn.Module, k: int) -> int:
    """sum_l (fan_in_l + 1 + k fan_out_l) over the weight matrices that require grad (an upper bound)."""
    w = 0
    for p in model.parameters():
        if p.requires_grad and p.dim() == 2:
            w += p.shape[1] + 1 + k * p.shape[0]
    return max(w, 1)


def empirical_ntk_bytes(model: nn.Module, n1: int, n2: Optional[int], k: int, mode: str, structured: bool,
                        block_size: Optional[int], out_given: bool, esize: int, out_elsewhere: bool = False) -> float:
    """Bytes empirical_ntk allocates on the features' device for x1 (n1 points) and x2 (n2 points, None:
    x2 = x1); ``out_elsewhere``: ``out`` is on another device (staged by row panels)."""
    sym = n2 is None
    m2 = n1 if sym else n2
    full = mode == "full" and k > 1
    result = 0 if out_given else (n1 if mode == "diagonal" else n1 * m2 * (k * k if full else 1))
    if structured:
        feats = (n1 + (0 if sym else m2)) * _feature_width(model, k)
        rows = min(n1, block_size or default_full_rows(n1))
        panel = rows * m2 * k * k if (full and out_elsewhere) else 0       # one staged row panel
        return float(esize) * (feats + panel + result)
    P = sum(p.numel() for p in model.parameters() if p.requires_grad)
    b = block_size or max(1, min(n1, int(256e6 // max(1, k * P * esize))))
    b = min(b, max(n1, m2))
    return float(esize) * (2 * b * k * P + b * b * k * k + result)


def train_bytes(K: int, P: int, n: int, h: int, L: int, tau: float, esize: int) -> float:
    """Bytes of the trainer's buffers for K nets of P weights on n points (width h, L hidden layers)."""
    return float(esize) * K * (5 * P + (2 * P if tau > 0 else 0) + 2 * n + 3 * n * h * (L + 1))


def kernel_flow_bytes(K_train: torch.Tensor, E: int, packed: bool, block: int) -> float:
    """Bytes of kernel_flow's copy of Theta and its per-problem vectors."""
    from ntk_fast.ops.packed import packed_size
    n = K_train.shape[-1]
    EK = K_train.shape[0] if K_train.dim() == 3 else 1
    if packed:
        theta = EK * packed_size(n, block)
    else:
        theta = 0 if K_train.is_contiguous() else EK * n * n
    return float(K_train.element_size()) * (theta + 12 * E * n)


def kernel_regression_bytes(n: int, E: int, m: int, esize: int) -> float:
    """Bytes of kernel_regression's factorisation and outputs."""
    return float(esize) * (3 * n * n + 4 * E * n + E * m)
