"""Helpers shared by the bench/bench_*.py suites."""
from __future__ import annotations

import math

import pytest
import torch

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
from ntk_fast.data import DTYPES  # noqa: E402,F401  (re-exported to the suites)


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def paper_inputs(n: int, d: int, dtype, device, seed: int = 0) -> torch.Tensor:
    """Gaussian points rescaled to norm sqrt(d) (the paper's preprocessing)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x = x * (math.sqrt(d) / x.norm(dim=1, keepdim=True))
    return x.to(dtype=dtype, device=device)


def paper_net(d: int, h: int, L: int, dtype, device, seed: int = 1):
    import ntk_fast
    return ntk_fast.FCNet(d, h, L, activation="softplus", beta=5.0, dtype=dtype, device=device,
                          generator=torch.Generator().manual_seed(seed))
