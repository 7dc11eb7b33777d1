"""Argument checks shared by the op wrappers (errors name the op and the argument)."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float64)


def compiling() -> bool:
    """True while torch.compile traces: checks that read tensor data are skipped then."""
    return torch.compiler.is_compiling()


def all_finite(t: torch.Tensor, chunk_elems: int = 1 << 18) -> bool:
    """True when t has no NaN or inf; checked in row chunks so that the temporary mask stays small."""
    if t.numel() <= chunk_elems or t.dim() == 0:
        return bool(torch.isfinite(t).all())
    rows = max(1, chunk_elems // max(1, t[0].numel()))
    return all(bool(torch.isfinite(t[i:i + rows]).all()) for i in range(0, t.shape[0], rows))


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
