"""The op ``ntk_fast::gram_full`` (and ``.out``): the structured NTK Gram with outputs and tokens.

    out[i, j, c, c'] = sum_l s_l sum_{t, t'} (A1_l[i, t] . A2_l[j, t']) (D1_l[i, c, t] . D2_l[j, c', t'])

a[l] (n, T_l, p_l): the layer's input per token; d[l] (n, k, T_l, q_l): the signal back-propagated to its
output, per model output c and token; out (n1, n2, k, k).  Special cases:

* T_l = 1: the Hadamard identity with the A products shared by the k x k output pairs ("full" mode);
* T_l > 1: the token-pair form (a Linear layer applied to every token of a sequence);
* a = ones (n, 1, 1), d = per-sample gradients (n, k, 1, P): the Gram of materialised gradients;
* w[l] (k, q_l) given: the layer is factored, d[l] (n, 1, 1, q_l) = s and D[i, c] = s_i o w_c (the layer below a
  linear readout: s its activation slopes, w the readout weight).  Then D1_ic . D2_jc' = sum_m (s1_i o s2_j)_m
  w_cm w_c'm is symmetric in (c, c') and the CPU kernel forms only the k(k+1)/2 pairs c <= c' (rounded up to
  a multiple of 8): n1 n2 q_l (k(k+1)/2 + 1) multiply-adds instead of n1 n2 k^2 q_l (k >= 5; smaller k and the
  CUDA kernel use the dense D = s o w).

Cost: n1 n2 sum_l T_l^2 (p_l + k^2 q_l) multiply-adds (half of it, plus the diagonal tiles, with a2 = d2 = None,
which computes the upper tiles and mirrors them: the result is exactly symmetric); memory: the output and per
thread three tiles.  Reference: :func:`ntk_fast.ops.reference.gram_full_reference`.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch

from ntk_fast.ops._loader import register_fake, use_reference
from ntk_fast.ops.checks import all_finite, check_feature_list, check_no_grad, compiling
from ntk_fast.ops.reference import gram_full_reference
from ntk_fast.ops.selfcheck import native_on

OP = "gram_full"


def factored_pairs(k: int) -> int:
    """kp: the (c, c') pairs a factored layer forms per point pair on the CPU, k(k+1)/2 rounded up to a multiple
    of 8 (an odd count ran 1.5x slower in BLAS); the kernel uses the dense D = s o w when kp >= k^2."""
    return (k * (k + 1) // 2 + 7) // 8 * 8


def _outputs(d1, w) -> int:
    """k: the rows of w[0] when layer 0 is factored, else d1[0]'s outputs."""
    return w[0].shape[0] if w is not None and w[0] is not None else d1[0].shape[1]


@register_fake("gram_full")
def _gram_full_fake(a1, d1, a2, d2, scales, block=0, w=None):
    n2 = a1[0].shape[0] if a2 is None else a2[0].shape[0]
    k = _outputs(d1, w)
    return a1[0].new_empty((a1[0].shape[0], n2, k, k))


@register_fake("gram_full.out")
def _gram_full_out_fake(a1, d1, a2, d2, scales, block, w=None, *, out):
    return None


def _check_list(name: str, ts, dim: int, n_layers: Optional[int], rows: Optional[int],
                like: Optional[torch.Tensor]) -> List[torch.Tensor]:
    what = "3-D (points, tokens, features)" if dim == 3 else "4-D (points, outputs, tokens, features)"
    return check_feature_list("gram_full", name, ts, what, n_layers, rows, like)


def _check_factors(w, a1, d1, like: torch.Tensor) -> Optional[List[Optional[torch.Tensor]]]:
    """w: None, or one entry per layer, None or a finite (k, q_l) tensor like a1[0] (k shared)."""
    if w is None:
        return None
    if not isinstance(w, (list, tuple)) or len(w) != len(a1):
        raise ValueError(f"gram_full: w must be None or a list of {len(a1)} entries (one per layer, None for a "
                         f"dense layer), got {type(w).__name__} of length {len(w) if hasattr(w, '__len__') else '?'}")
    k = None
    for l, f in enumerate(w):
        if f is None:
            continue
        q = d1[l].shape[3]
        if not isinstance(f, torch.Tensor) or f.dim() != 2 or f.shape[1] != q or (k is not None and f.shape[0] != k):
            got = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
            raise ValueError(f"gram_full: w[{l}] must be a ({'k' if k is None else k}, {q}) tensor (outputs x "
                             f"features of d1[{l}]), got {got}")
        if f.dtype != like.dtype or f.device != like.device:
            raise ValueError(f"gram_full: w[{l}] is {f.dtype} on {f.device}, expected {like.dtype} on {like.device} "
                             f"like a1[0]")
        check_no_grad("gram_full", f"w[{l}]", f)
        if not compiling() and not all_finite(f):
            raise ValueError(f"gram_full: w[{l}] contains NaN or inf")
        k = f.shape[0]
    return list(w)


def _check_layers(a1, d1, a2, d2, w) -> None:
    k = _outputs(d1, w)
    for l in range(len(a1)):
        T, p, q = a1[l].shape[1], a1[l].shape[2], d1[l].shape[3]
        if w is not None and w[l] is not None:
            if T != 1 or d1[l].shape[1] != 1 or d2[l].shape[1] != 1 or w[l].shape[0] != k:
                raise ValueError(f"gram_full: the factored layer {l} (w[{l}] given) needs one token and d1/d2 of "
                                 f"shape (n, 1, 1, q) and w[{l}] with {k} rows, got a1 {tuple(a1[l].shape)}, d1 "
                                 f"{tuple(d1[l].shape)}, d2 {tuple(d2[l].shape)}, w {tuple(w[l].shape)}")
        elif d1[l].shape[1] != k or d2[l].shape[1] != k:
            raise ValueError(f"gram_full: d1[{l}] and d2[{l}] must have {k} outputs like d1[0], got "
                             f"{d1[l].shape[1]} and {d2[l].shape[1]}")
        if (a2[l].shape[1], d1[l].shape[2], d2[l].shape[2]) != (T, T, T):
            raise ValueError(f"gram_full: layer {l} has {T} tokens in a1 but a2, d1, d2 have "
                             f"{a2[l].shape[1]}, {d1[l].shape[2]}, {d2[l].shape[2]}")
        if a2[l].shape[2] != p or d2[l].shape[3] != q:
            raise ValueError(f"gram_full: layer {l}: a2/d2 have {a2[l].shape[2]}/{d2[l].shape[3]} features, "
                             f"expected {p}/{q} like a1/d1")


def gram_full(a1: Sequence[torch.Tensor], d1: Sequence[torch.Tensor],
              a2: Optional[Sequence[torch.Tensor]] = None, d2: Optional[Sequence[torch.Tensor]] = None,
              scales: Optional[Sequence[float]] = None, *, out: Optional[torch.Tensor] = None,
              block: int = 0, w: Optional[Sequence[Optional[torch.Tensor]]] = None) -> torch.Tensor:
    """out[i, j, c, c'] = sum_l s_l sum_{t, t'} (A1_l[i, t] . A2_l[j, t']) (D1_l[i, c, t] . D2_l[j, c', t']).

    Shapes: a1[l] (n1, T_l, p_l), d1[l] (n1, k, T_l, q_l), a2[l] (n2, T_l, p_l), d2[l] (n2, k, T_l, q_l);
    out (n1, n2, k, k) on the features' device, any strides (e.g. a memory-mapped array or a view of a larger
    tensor).  a2 = d2 = None: symmetric (upper tiles only, exactly symmetric).  ``block``: points per tile
    (0 = automatic).  ``w``: None, or per layer None or a factor (k, q_l): then d[l] is (n, 1, 1, q_l) = s and
    D[i, c] = s_i o w_c (k(k+1)/2 products per point pair on the CPU, see the module docstring).  Cost n1 n2 sum_l T_l^2 (p_l + k^2 q_l) multiply-adds (halved when symmetric; on the CPU
    a layer with T_l = 1 whose d rows are exactly the unit vectors, d[l][i, c, 0] = e_c, costs n1 n2 p_l: its
    D product, delta_cc', is not formed).  Traceable by
    ``torch.compile(fullgraph=True)`` (the NaN checks are skipped while compiling).
    """
    if (a2 is None) != (d2 is None):
        raise ValueError("gram_full: pass both a2 and d2, or neither (symmetric Gram)")
    a1 = _check_list("a1", a1, 3, None, None, None)
    like, n1, L = a1[0], a1[0].shape[0], len(a1)
    d1 = _check_list("d1", d1, 4, L, n1, like)
    if a2 is not None:
        a2 = _check_list("a2", a2, 3, L, None, like)
        d2 = _check_list("d2", d2, 4, L, a2[0].shape[0], like)
    w = _check_factors(w, a1, d1, like)
    _check_layers(a1, d1, a1 if a2 is None else a2, d1 if d2 is None else d2, w)
    n2, k = (n1 if a2 is None else a2[0].shape[0]), _outputs(d1, w)
    try:
        scales = [1.0] * L if scales is None else [float(s) for s in scales]
    except (TypeError, ValueError):
        raise ValueError(f"gram_full: scales must be a list of numbers, got {scales!r}") from None
    if len(scales) != L or not all(math.isfinite(s) for s in scales):
        raise ValueError(f"gram_full: scales must be {L} finite numbers (one per layer), got {scales}")
    if not isinstance(block, int) or block < 0:
        raise ValueError(f"gram_full: block must be an int >= 0 (0 = automatic), got {block!r}")
    if out is not None and (not isinstance(out, torch.Tensor) or tuple(out.shape) != (n1, n2, k, k)
                            or out.dtype != like.dtype or out.device != like.device):
        got = (tuple(out.shape), out.dtype, str(out.device)) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"gram_full: out must be a ({n1}, {n2}, {k}, {k}) {like.dtype} tensor on {like.device}, "
                         f"got {got}")
    if not native_on(OP, like.device):
        use_reference(OP)
        res = gram_full_reference(a1, d1, a2, d2, scales, w)
        return res if out is None else out.copy_(res)
    if out is None:
        return torch.ops.ntk_fast.gram_full(a1, d1, a2, d2, scales, block, w)
    torch.ops.ntk_fast.gram_full.out(a1, d1, a2, d2, scales, block, w, out=out)
    return out
