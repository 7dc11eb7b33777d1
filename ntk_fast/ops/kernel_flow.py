"""The frozen-kernel op ``ntk_fast::kernel_flow_step``: checks, fake, fallback to
:func:`ntk_fast.ops.reference.kernel_flow_step_ref` (which specifies it).  Packed layout:
:mod:`ntk_fast.ops.packed`.
"""
from __future__ import annotations

from typing import Tuple

import torch

from ntk_fast.dynamics.losses import check_loss
from ntk_fast.ops._loader import register_fake, use_reference
from ntk_fast.ops.packed import packed_size
from ntk_fast.ops.reference import kernel_flow_step_ref
from ntk_fast.ops.selfcheck import native_on


@register_fake("kernel_flow_step")
def _kernel_flow_step_fake(theta, y, f, g, r, c, dt, active, loss, beta, packed_block=0, block=0):
    torch._check(f.dim() == 2, lambda: "kernel_flow_step: f must be 2-D")
    stats = f.new_empty((f.shape[0], 7), dtype=torch.float64)
    return (torch.empty_like(f), torch.empty_like(f), torch.empty_like(f), torch.empty_like(f), stats)


def check_flow_step_args(theta: torch.Tensor, y: torch.Tensor, f: torch.Tensor, g: torch.Tensor, r: torch.Tensor,
                         c: torch.Tensor, dt: torch.Tensor, active: torch.Tensor, loss: str,
                         packed_block: int) -> None:
    """Raise ValueError naming the argument when shapes, dtypes or devices do not fit."""
    check_loss(loss, "kernel_flow_step")
    if not isinstance(f, torch.Tensor) or f.dim() != 2:
        raise ValueError(f"kernel_flow_step: f must be a 2-D tensor (E, n), got "
                         f"{tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__}")
    if f.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"kernel_flow_step: f must be float32 or float64, got {f.dtype}")
    E, n = f.shape
    for name, t in (("y", y), ("g", g), ("r", r), ("c", c)):
        if t.shape != f.shape or t.dtype != f.dtype or t.device != f.device:
            raise ValueError(f"kernel_flow_step: {name} must be {f.dtype} {tuple(f.shape)} on {f.device}, got "
                             f"{t.dtype} {tuple(t.shape)} on {t.device}")
    if dt.shape != (E,) or dt.dtype != f.dtype or dt.device != f.device:
        raise ValueError(f"kernel_flow_step: dt must be {f.dtype} ({E},), got {dt.dtype} {tuple(dt.shape)}")
    if active.shape != (E,) or active.dtype != torch.bool or active.device != f.device:
        raise ValueError(f"kernel_flow_step: active must be bool ({E},), got {active.dtype} {tuple(active.shape)}")
    if theta.dtype != f.dtype or theta.device != f.device:
        raise ValueError(f"kernel_flow_step: theta must be {f.dtype} on {f.device}, got {theta.dtype} on "
                         f"{theta.device}")
    if packed_block:
        P = packed_size(n, packed_block)
        if theta.shape not in ((P,), (E, P)):
            raise ValueError(f"kernel_flow_step: packed theta (block {packed_block}) must have shape ({P},) or "
                             f"({E}, {P}), got {tuple(theta.shape)}")
    elif theta.shape not in ((n, n), (E, n, n)):
        raise ValueError(f"kernel_flow_step: theta must have shape ({n}, {n}) or ({E}, {n}, {n}), got "
                         f"{tuple(theta.shape)}")


def kernel_flow_step(theta: torch.Tensor, y: torch.Tensor, f: torch.Tensor, g: torch.Tensor, r: torch.Tensor,
                     c: torch.Tensor, dt: torch.Tensor, active: torch.Tensor, loss: str = "softhinge",
                     beta: float = 20.0, packed_block: int = 0, block: int = 0, check: bool = True
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One attempt of the frozen-kernel flow for E problems: returns (f', r', g', c', stats).

    f' = f - dt g;  r' = dl/dF(f', y);  c' = c + dt r / n;  g' = Theta r' / n;
    stats (E, 7) float64 = [|g|^2, |g'|^2, |g - g'|^2, dt max|g|, min(y o f'), mean l(f', y), max|g'|].
    theta: (n, n) shared by all problems or (E, n, n), symmetric (only its upper triangle is read), or the
    tile-packed upper triangle ((P,) or (E, P)) when packed_block > 0.
    Cost: one read of the upper half of each Theta, 2 E n^2 flops.
    """
    if check:
        check_flow_step_args(theta, y, f, g, r, c, dt, active, loss, packed_block)
    if native_on("kernel_flow_step", f.device):
        return torch.ops.ntk_fast.kernel_flow_step(theta, y, f, g, r, c, dt, active, loss, float(beta),
                                                   int(packed_block), int(block))
    use_reference("kernel_flow_step")
    return kernel_flow_step_ref(theta, y, f, g, r, c, dt, active, loss, beta, packed_block, block)
