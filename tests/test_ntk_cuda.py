"""empirical_ntk on the GPU against the same call on the CPU (marked ``cuda``): every mode and method, float64
and float32, one call, row panels (block_size) and a host numpy-memmap ``out`` filled panel by panel from GPU
features.  Skipped without a GPU; ``NTK_FAST_CUDA_TESTS_ON_CPU=1`` runs the same code on the CPU (to check
the tests themselves on a machine without a GPU).

Tolerance, relative to max |CPU result|: 1e-11 in float64, 5e-5 in float32 (different summation orders on the
two devices; docs/cuda.md).
"""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from torch import nn

import ntk_fast

DEV = "cpu" if os.environ.get("NTK_FAST_CUDA_TESTS_ON_CPU") else "cuda"
pytestmark = [pytest.mark.cuda] if DEV == "cuda" else []
TOL = {torch.float64: 1e-11, torch.float32: 5e-5}


def _model(kind: str, dtype: torch.dtype) -> nn.Module:
    gen = torch.Generator().manual_seed(17)
    if kind == "fcnet":
        return ntk_fast.FCNet(7, 12, 2, bias=True, dtype=dtype, generator=gen)
    if kind == "fcnet_k3":
        return ntk_fast.FCNet(7, 12, 2, k=3, dtype=dtype, generator=gen)
    torch.manual_seed(17)
    return nn.Sequential(nn.Linear(7, 10), nn.Softplus(), nn.Linear(10, 9), nn.Tanh(), nn.Linear(9, 2)).to(dtype)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    assert got.shape == want.shape
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", ["fcnet", "fcnet_k3", "seq"])
@pytest.mark.parametrize("method", ["structured", "jacobian"])
@pytest.mark.parametrize("mode", ["full", "trace", "diagonal"])
def test_device_matches_cpu(tmp_path, mode, method, kind, dtype):
    cpu_model = _model(kind, dtype)
    dev_model = copy.deepcopy(cpu_model).to(DEV)
    gen = torch.Generator().manual_seed(3)
    x1 = torch.randn(37, 7, generator=gen, dtype=dtype)
    x2 = torch.randn(19, 7, generator=gen, dtype=dtype)
    for other in ((None,) if mode == "diagonal" else (None, x2)):
        want = ntk_fast.empirical_ntk(cpu_model, x1, other, mode=mode, method=method)
        dx2 = None if other is None else other.to(DEV)
        got = ntk_fast.empirical_ntk(dev_model, x1.to(DEV), dx2, mode=mode, method=method)
        assert got.device.type == DEV and got.dtype == dtype
        assert _rel(got, want) <= TOL[dtype]
        panels = ntk_fast.empirical_ntk(dev_model, x1.to(DEV), dx2, mode=mode, method=method, block_size=8)
        assert _rel(panels, want) <= TOL[dtype]
        # A host memmap out, written panel by panel from the device.
        path = tmp_path / f"k_{mode}_{method}_{kind}_{other is None}.npy"
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(str(dtype).split(".")[1]),
                                       shape=tuple(want.shape))
        ntk_fast.empirical_ntk(dev_model, x1.to(DEV), dx2, mode=mode, method=method, block_size=8,
                               out=torch.from_numpy(mm))
        mm.flush()
        del mm
        assert _rel(torch.from_numpy(np.load(path)), want) <= TOL[dtype]
