"""The only place that calls the extension ntk_fast._C.

Each wrapper checks its inputs (errors name the argument, its shape and what was expected), then calls
the registered op, or, when the extension could not be loaded, the pure-torch reference of
``ntk_fast/reference.py`` (with a warning shown once).
"""
from __future__ import annotations

import warnings
from typing import List, Optional, Sequence

import torch

from ntk_fast.ops.reference import gram_reference

try:
    from ntk_fast import _C

    HAS_EXTENSION = True
    _IMPORT_ERROR: Optional[BaseException] = None
except ImportError as exc:  # pragma: no cover - exercised by a test that hides the module
    HAS_EXTENSION = False
    _IMPORT_ERROR = exc

_warned = False


def _warn_fallback() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"ntk_fast: the compiled extension ntk_fast._C could not be loaded ({_IMPORT_ERROR}); "
                      "using the slow pure-torch reference. Reinstall with "
                      "`pip install --no-build-isolation -e .` to build it.", RuntimeWarning, stacklevel=3)


def extension_available() -> bool:
    return HAS_EXTENSION


if HAS_EXTENSION:
    @torch.library.register_fake("ntk_fast::gram")
    def _gram_fake(a1, d1, a2, d2, scales, symmetric, block=0, precision="highest"):
        n2 = a1[0].shape[0] if symmetric else a2[0].shape[0]
        return a1[0].new_empty((a1[0].shape[0], n2))

    @torch.library.register_fake("ntk_fast::gram_out")
    def _gram_out_fake(a1, d1, a2, d2, scales, symmetric, block, precision, out):
        return None


PRECISIONS = ("highest", "tf32")


def all_finite(t: torch.Tensor, chunk_elems: int = 1 << 18) -> bool:
    """True when t has no NaN or inf; checked in row chunks so that the temporary mask stays small."""
    if t.numel() <= chunk_elems or t.dim() == 0:
        return bool(torch.isfinite(t).all())
    rows = max(1, chunk_elems // max(1, t[0].numel()))
    return all(bool(torch.isfinite(t[i:i + rows]).all()) for i in range(0, t.shape[0], rows))


def _check_feature_list(name: str, ts, n_layers: Optional[int], rows: Optional[int], dtype, device) -> List[torch.Tensor]:
    if not isinstance(ts, (list, tuple)) or len(ts) == 0:
        raise ValueError(f"gram: {name} must be a non-empty list of 2-D tensors, got {type(ts).__name__}")
    if n_layers is not None and len(ts) != n_layers:
        raise ValueError(f"gram: {name} must hold {n_layers} layers (one per layer of a1), got {len(ts)}")
    out = []
    for l, t in enumerate(ts):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"gram: {name}[{l}] must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"gram: {name}[{l}] must be 2-D (points x features), got shape {tuple(t.shape)}")
        if t.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"gram: {name}[{l}] must be float32 or float64, got {t.dtype}")
        if dtype is not None and t.dtype != dtype:
            raise ValueError(f"gram: {name}[{l}] has dtype {t.dtype}, expected {dtype} like a1[0] (mixed dtypes)")
        if device is not None and t.device != device:
            raise ValueError(f"gram: {name}[{l}] is on {t.device}, expected {device} like a1[0] (mixed devices)")
        if rows is not None and t.shape[0] != rows:
            raise ValueError(f"gram: {name}[{l}] has {t.shape[0]} rows, expected {rows}")
        if not all_finite(t):
            raise ValueError(f"gram: {name}[{l}] contains NaN or inf")
        out.append(t)
    return out


def gram(a1: Sequence[torch.Tensor], d1: Sequence[torch.Tensor],
         a2: Optional[Sequence[torch.Tensor]] = None, d2: Optional[Sequence[torch.Tensor]] = None,
         scales: Optional[Sequence[float]] = None, *, out: Optional[torch.Tensor] = None, block: int = 0,
         precision: str = "highest") -> torch.Tensor:
    """Fused structured Gram  out[i, j] = sum_l s_l (D1_l[i] . D2_l[j]) (A1_l[i] . A2_l[j]).

    Shapes: a1[l] (n1, p_l), d1[l] (n1, q_l); a2[l] (n2, p_l), d2[l] (n2, q_l); out (n1, n2).
    With a2 = d2 = None the Gram of (a1, d1) with itself is computed on the upper tiles only and
    mirrored (n^2 sum_l (p_l + q_l) flops instead of twice that).  ``out`` may be any preallocated
    (n1, n2) tensor of the features' dtype, e.g. ``torch.from_numpy(np.memmap(...))``.
    """
    if (a2 is None) != (d2 is None):
        raise ValueError("gram: pass both a2 and d2, or neither (symmetric Gram)")
    a1 = _check_feature_list("a1", a1, None, None, None, None)
    dtype, device, n1, L = a1[0].dtype, a1[0].device, a1[0].shape[0], len(a1)
    d1 = _check_feature_list("d1", d1, L, n1, dtype, device)
    symmetric = a2 is None
    if not symmetric:
        a2 = _check_feature_list("a2", a2, L, None, dtype, device)
        n2 = a2[0].shape[0]
        d2 = _check_feature_list("d2", d2, L, n2, dtype, device)
        for l in range(L):
            if a2[l].shape[1] != a1[l].shape[1]:
                raise ValueError(f"gram: a2[{l}] has {a2[l].shape[1]} features, expected {a1[l].shape[1]} like a1[{l}]")
            if d2[l].shape[1] != d1[l].shape[1]:
                raise ValueError(f"gram: d2[{l}] has {d2[l].shape[1]} features, expected {d1[l].shape[1]} like d1[{l}]")
    else:
        n2 = n1
    scales = [1.0] * L if scales is None else [float(s) for s in scales]
    if len(scales) != L:
        raise ValueError(f"gram: scales must have {L} entries (one per layer), got {len(scales)}")
    if precision not in PRECISIONS:
        raise ValueError(f"gram: precision must be one of {PRECISIONS}, got {precision!r}")
    if not isinstance(block, int) or block < 0:
        raise ValueError(f"gram: block must be an int >= 0 (0 = automatic), got {block!r}")
    if out is not None:
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (n1, n2):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"gram: out must be a tensor of shape ({n1}, {n2}), got {shape}")
        if out.dtype != dtype:
            raise ValueError(f"gram: out has dtype {out.dtype}, expected {dtype} like the features")
        if out.device != device and not (device.type == "cuda" and out.device.type == "cpu"):
            raise ValueError(f"gram: out is on {out.device}, expected {device} like the features")

    if not HAS_EXTENSION:
        _warn_fallback()
        res = gram_reference(a1, d1, a2, d2, scales)
        if out is None:
            return res
        out.copy_(res)
        return out
    a2l = [] if symmetric else list(a2)
    d2l = [] if symmetric else list(d2)
    if out is None:
        return torch.ops.ntk_fast.gram(list(a1), list(d1), a2l, d2l, scales, symmetric, block, precision)
    if out.device != device:  # GPU features, CPU out (maybe a memmap): row panels double-buffered to the host
        from ntk_fast.ntk.stream import gram_streamed
        return gram_streamed(list(a1), list(d1), None if symmetric else list(a2), None if symmetric else list(d2),
                             scales, out, precision=precision)
    torch.ops.ntk_fast.gram_out(list(a1), list(d1), a2l, d2l, scales, symmetric, block, precision, out)
    return out
