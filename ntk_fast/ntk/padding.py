"""Pad feature matrices once for the CUDA Gram kernel, before they are cut into row panels.

The CUDA kernel reads each feature matrix (n, k) with 16-byte loads, so it needs rows that are contiguous,
16-byte aligned and a multiple of 16 bytes wide; the op copies any matrix that is not (zero columns
appended: ``k -> kp = max(v, ceil(k / v) v)`` with ``v = 16 / itemsize`` values per 16 bytes, which leaves
every dot product, hence the Gram, unchanged).  Callers that call the op once per row panel would pay that
copy per panel, and the symmetric panel loop passes all rows below the panel each time (``a[r0:]``):
``O(n^2 / panel_rows * k)`` copied values in all, tens of TB at n = 1M.  Padding once up front costs one
copy of the features, ``n * kp * itemsize`` bytes; every row slice of a padded matrix then satisfies the
kernel's conditions (row stride ``kp * itemsize`` is a multiple of 16 bytes) and goes to the kernel as is.

CPU features are left alone: the CPU kernel has no such requirement.
"""
from __future__ import annotations

from typing import List, Sequence

import torch

__all__ = ["padded_width", "needs_padding", "pad_features"]


def padded_width(k: int, itemsize: int) -> int:
    """Width the CUDA kernel reads: k rounded up to a positive multiple of 16 bytes (csrc/gram/gram_plan.h)."""
    vec = 16 // itemsize
    return max(vec, -(-k // vec) * vec)


def needs_padding(t: torch.Tensor) -> bool:
    """True when the CUDA Gram kernel would copy t: not contiguous, not 16-byte aligned, or a width that is
    not a positive multiple of 16 bytes (the same test as ``prepare`` in csrc/gram/gram_cuda.cu)."""
    return (padded_width(t.shape[1], t.element_size()) != t.shape[1] or not t.is_contiguous()
            or t.data_ptr() % 16 != 0)


def pad_features(ts: Sequence[torch.Tensor], *, always: bool = False) -> List[torch.Tensor]:
    """Each (n, k) tensor as the kernel reads it: unchanged when it already qualifies, else a contiguous
    (n, padded_width(k)) copy with zero columns k.. appended.

    Only CUDA tensors are padded unless ``always`` (used by the CPU tests).  Cost: one copy of each
    padded matrix.
    """
    out = []
    for t in ts:
        if (t.device.type != "cuda" and not always) or not needs_padding(t):
            out.append(t)
            continue
        n, k = t.shape
        kp = padded_width(k, t.element_size())
        p = torch.empty((n, kp), dtype=t.dtype, device=t.device)
        p[:, k:].zero_()
        p[:, :k].copy_(t)
        out.append(p)
    return out
