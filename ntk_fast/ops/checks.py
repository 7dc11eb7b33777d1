"""Argument checks shared by the op wrappers (errors name the op and the argument)."""
from __future__ import annotations

from typing import List, Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.float64)


def compiling() -> bool:
    """True while torch.compile traces: checks that read tensor data are skipped then."""
    return torch.compiler.is_compiling()


def all_finite(t: torch.Tensor, chunk_elems: int = 1 << 18) -> bool:
    """True when t has no NaN or inf; checked in row chunks so that the temporary mask stays small.  A meta
    tensor (shapes only, no data) has nothing to check."""
    if t.device.type == "meta":
        return True
    if t.numel() <= chunk_elems or t.dim() == 0:
        return bool(torch.isfinite(t).all())
    rows = max(1, chunk_elems // max(1, t[0].numel()))
    return all(bool(torch.isfinite(t[i:i + rows]).all()) for i in range(0, t.shape[0], rows))


def check_no_grad(op: str, label: str, t: torch.Tensor) -> None:
    """The ops have no backward: an input that requires grad (with grad mode on) is a clear error."""
    if t.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{op}: {label} requires grad, but the op has no backward: pass {label}.detach() (for a "
                         f"Gram to differentiate, ntk_fast.ops.reference has plain-torch ones)")


def check_like(t, name: str, like: torch.Tensor, op: str) -> None:
    """t must be a contiguous tensor with like's shape, dtype and device."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.shape != like.shape or t.dtype != like.dtype or t.device != like.device:
        raise ValueError(f"{op}: {name} must be {like.dtype} of shape {tuple(like.shape)} on {like.device}, "
                         f"got {t.dtype} of shape {tuple(t.shape)} on {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous")


def check_float_2d(t, name: str, op: str, what: str = "nets x entries") -> None:
    """t must be a contiguous 2-D float32/float64 tensor."""
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{op}: {name} must be a 2-D tensor ({what}), got {got}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: {name} must be float32 or float64, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous")


def check_feature_list(op: str, name: str, ts, what: str, n_layers: Optional[int], rows: Optional[int],
                       like: Optional[torch.Tensor]) -> List[torch.Tensor]:
    """ts must be a non-empty list (n_layers long when given) of float32/float64 tensors of the rank that
    ``what`` describes (e.g. "2-D (points x features)"), with ``rows`` rows and like's dtype and device (the
    first tensor sets rows and like when None), and no NaN or inf (skipped while compiling)."""
    dim = int(what.split("-", 1)[0])
    if not isinstance(ts, (list, tuple)) or len(ts) == 0:
        raise ValueError(f"{op}: {name} must be a non-empty list of {dim}-D tensors, got {type(ts).__name__}")
    if n_layers is not None and len(ts) != n_layers:
        raise ValueError(f"{op}: {name} must hold {n_layers} layers (one per layer of a1), got {len(ts)}")
    for l, t in enumerate(ts):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: {name}[{l}] must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != dim:
            raise ValueError(f"{op}: {name}[{l}] must be {what}, got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{op}: {name}[{l}] must be float32 or float64, got {t.dtype}")
        if like is not None and t.dtype != like.dtype:
            raise ValueError(f"{op}: {name}[{l}] has dtype {t.dtype}, expected {like.dtype} like a1[0] (mixed dtypes)")
        if like is not None and t.device != like.device:
            raise ValueError(f"{op}: {name}[{l}] is on {t.device}, expected {like.device} like a1[0] (mixed devices)")
        if rows is not None and t.shape[0] != rows:
            raise ValueError(f"{op}: {name}[{l}] has {t.shape[0]} rows, expected {rows}")
        check_no_grad(op, f"{name}[{l}]", t)
        if not compiling() and not all_finite(t):
            raise ValueError(f"{op}: {name}[{l}] contains NaN or inf")
        if l == 0:   # the layers of one list share dtype, device and points (a1[0] sets them for a1)
            like = t if like is None else like
            rows = t.shape[0] if rows is None else rows
    return list(ts)
