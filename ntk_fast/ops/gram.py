"""The structured Gram op ``ntk_fast::gram`` (and its ``.out`` overload): checks, fakes, fallback.

    out[i, j] = sum_l s_l (D1_l[i] . D2_l[j]) (A1_l[i] . A2_l[j])         a1[l] (n1, p_l), d1[l] (n1, q_l)

With a2 = d2 = None the Gram of (a1, d1) with itself: only the upper tiles are computed and mirrored
(n^2 sum_l (p_l + q_l) flops instead of twice that) and the result is exactly symmetric.
Reference: :func:`ntk_fast.ops.reference.gram_reference`.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch

from ntk_fast.ops._loader import register_fake, use_reference
from ntk_fast.ops.checks import check_feature_list
from ntk_fast.ops.reference import gram_reference
from ntk_fast.ops.selfcheck import native_on

PRECISIONS = ("highest", "tf32")
CUDA_TILE = 128   # the CUDA kernel's float32 tile edge (csrc/gram/gram_cuda.cu); streamed panels are multiples of it


@register_fake("gram")
def _gram_fake(a1, d1, a2, d2, scales, block=0, precision="highest"):
    n2 = a1[0].shape[0] if a2 is None else a2[0].shape[0]
    return a1[0].new_empty((a1[0].shape[0], n2))


@register_fake("gram.out")
def _gram_out_fake(a1, d1, a2, d2, scales, block, precision, *, out):
    return None


def _check_list(name: str, ts, n_layers: Optional[int], rows: Optional[int], like: Optional[torch.Tensor]
                ) -> List[torch.Tensor]:
    return check_feature_list("gram", name, ts, "2-D (points x features)", n_layers, rows, like)


def _check_out(out, n1: int, n2: int, like: torch.Tensor) -> None:
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (n1, n2):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"gram: out must be a tensor of shape ({n1}, {n2}), got {shape}")
    if out.dtype != like.dtype:
        raise ValueError(f"gram: out has dtype {out.dtype}, expected {like.dtype} like the features")
    if out.device != like.device:
        raise ValueError(f"gram: out is on {out.device} but the features are on {like.device}; for GPU features "
                         "and a host (or memory-mapped) out use ntk_fast.gram_streamed")


def gram(a1: Sequence[torch.Tensor], d1: Sequence[torch.Tensor],
         a2: Optional[Sequence[torch.Tensor]] = None, d2: Optional[Sequence[torch.Tensor]] = None,
         scales: Optional[Sequence[float]] = None, *, out: Optional[torch.Tensor] = None, block: int = 0,
         precision: str = "highest") -> torch.Tensor:
    """Fused structured Gram  out[i, j] = sum_l s_l (D1_l[i] . D2_l[j]) (A1_l[i] . A2_l[j]).

    Shapes: a1[l] (n1, p_l), d1[l] (n1, q_l); a2[l] (n2, p_l), d2[l] (n2, q_l); out (n1, n2) on the
    features' device.  a2 = d2 = None: symmetric Gram of (a1, d1) (half the flops).  ``out`` may be any
    preallocated (n1, n2) tensor of the features' dtype and device, e.g. ``torch.from_numpy(np.memmap(...))``.
    Cost: 2 n1 n2 sum_l (p_l + q_l) flops (n^2 sum_l (p_l + q_l) symmetric); memory: the output only.
    Traceable by ``torch.compile(fullgraph=True)`` (the NaN checks are skipped while compiling).
    """
    if (a2 is None) != (d2 is None):
        raise ValueError("gram: pass both a2 and d2, or neither (symmetric Gram)")
    a1 = _check_list("a1", a1, None, None, None)
    like, n1, L = a1[0], a1[0].shape[0], len(a1)
    d1 = _check_list("d1", d1, L, n1, like)
    n2 = n1
    if a2 is not None:
        a2 = _check_list("a2", a2, L, None, like)
        n2 = a2[0].shape[0]
        d2 = _check_list("d2", d2, L, n2, like)
        for l in range(L):
            if a2[l].shape[1] != a1[l].shape[1]:
                raise ValueError(f"gram: a2[{l}] has {a2[l].shape[1]} features, expected {a1[l].shape[1]} like a1[{l}]")
            if d2[l].shape[1] != d1[l].shape[1]:
                raise ValueError(f"gram: d2[{l}] has {d2[l].shape[1]} features, expected {d1[l].shape[1]} like d1[{l}]")
    try:
        scales = [1.0] * L if scales is None else [float(s) for s in scales]
    except (TypeError, ValueError):
        raise ValueError(f"gram: scales must be a list of numbers, got {scales!r}") from None
    if not all(math.isfinite(s) for s in scales):
        raise ValueError(f"gram: scales must be finite, got {scales}")
    if len(scales) != L:
        raise ValueError(f"gram: scales must have {L} entries (one per layer), got {len(scales)}")
    if precision not in PRECISIONS:
        raise ValueError(f"gram: precision must be one of {PRECISIONS}, got {precision!r}")
    if not isinstance(block, int) or block < 0:
        raise ValueError(f"gram: block must be an int >= 0 (0 = automatic), got {block!r}")
    if out is not None:
        _check_out(out, n1, n2, like)
    if not native_on("gram", like.device):
        use_reference("gram")
        res = gram_reference(a1, d1, a2, d2, scales)
        return res if out is None else out.copy_(res)
    if out is None:
        return torch.ops.ntk_fast.gram(a1, d1, a2, d2, scales, block, precision)
    torch.ops.ntk_fast.gram.out(a1, d1, a2, d2, scales, block, precision, out=out)
    return out
