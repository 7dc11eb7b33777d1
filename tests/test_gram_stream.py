"""Panel logic of ntk_fast.ntk.stream on the CPU (float64, against the plain reference)."""
import numpy as np
import pytest
import torch

import ntk_fast._C  # noqa: F401  (registers the ops)
from ntk_fast.ntk.stream import default_panel_rows, gram_streamed


def _features(n, fans_in, fans_out, gen, dtype=torch.float64):
    A = [torch.randn(n, f, generator=gen, dtype=dtype) for f in fans_in]
    D = [torch.randn(n, f, generator=gen, dtype=dtype) for f in fans_out]
    return A, D


def _reference(A1, D1, A2, D2, scales):
    out = torch.zeros(A1[0].shape[0], A2[0].shape[0], dtype=torch.float64)
    for a1, d1, a2, d2, s in zip(A1, D1, A2, D2, scales):
        out += s * (a1.double() @ a2.double().T) * (d1.double() @ d2.double().T)
    return out


FANS_IN, FANS_OUT = [7, 13, 13], [13, 13, 1]
SCALES = [0.5, 1.0, 2.0]


@pytest.mark.parametrize("n,panel", [(1, 1), (37, 5), (37, 37), (37, 100), (64, 16), (50, 7)])
def test_symmetric_panels(n, panel):
    gen = torch.Generator().manual_seed(n * 1000 + panel)
    A, D = _features(n, FANS_IN, FANS_OUT, gen)
    ref = _reference(A, D, A, D, SCALES)
    out = torch.full((n, n), float("nan"), dtype=torch.float64)
    res = gram_streamed(A, D, scales=SCALES, out=out, panel_rows=panel)
    assert res is out
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(out, out.T)


@pytest.mark.parametrize("n1,n2,panel", [(1, 5, 1), (23, 41, 4), (41, 23, 41), (30, 30, 8)])
def test_nonsymmetric_panels(n1, n2, panel):
    gen = torch.Generator().manual_seed(n1 * 100 + n2 + panel)
    A1, D1 = _features(n1, FANS_IN, FANS_OUT, gen)
    A2, D2 = _features(n2, FANS_IN, FANS_OUT, gen)
    ref = _reference(A1, D1, A2, D2, SCALES)
    out = gram_streamed(A1, D1, A2, D2, SCALES, panel_rows=panel)
    assert out.shape == (n1, n2) and out.dtype == torch.float64 and out.device.type == "cpu"
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_strided_out_and_dtype_conversion():
    gen = torch.Generator().manual_seed(3)
    A, D = _features(29, FANS_IN, FANS_OUT, gen)
    ref = _reference(A, D, A, D, SCALES)
    big = torch.full((29, 58), float("nan"), dtype=torch.float64)
    out = big[:, ::2]  # non-contiguous out
    gram_streamed(A, D, scales=SCALES, out=out, panel_rows=6)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert torch.isnan(big[:, 1::2]).all()
    out32 = torch.empty(29, 29, dtype=torch.float32)
    gram_streamed(A, D, scales=SCALES, out=out32, panel_rows=10)
    torch.testing.assert_close(out32.double(), ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())


def test_memmap_out(tmp_path):
    gen = torch.Generator().manual_seed(4)
    n = 45
    A, D = _features(n, FANS_IN, FANS_OUT, gen)
    ref = _reference(A, D, A, D, SCALES)
    path = tmp_path / "gram.npy"
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float64, shape=(n, n))
    gram_streamed(A, D, scales=SCALES, out=torch.from_numpy(mm), panel_rows=7, progress=True)
    mm.flush()
    del mm
    back = np.load(path)
    np.testing.assert_allclose(back, ref.numpy(), rtol=1e-12, atol=1e-12)


def test_default_scales_and_panel_rows():
    gen = torch.Generator().manual_seed(5)
    A, D = _features(20, FANS_IN, FANS_OUT, gen)
    ref = _reference(A, D, A, D, [1.0] * 3)
    torch.testing.assert_close(gram_streamed(A, D), ref, rtol=1e-12, atol=1e-12)
    assert default_panel_rows(1000, 1000, 8, torch.device("cpu")) == 512
    assert default_panel_rows(10, 1000, 8, torch.device("cpu")) == 10


def test_errors():
    gen = torch.Generator().manual_seed(6)
    A, D = _features(10, FANS_IN, FANS_OUT, gen)
    with pytest.raises(ValueError, match="both a2 and d2"):
        gram_streamed(A, D, a2=A)
    with pytest.raises(ValueError, match="scales"):
        gram_streamed(A, D, scales=[1.0])
    with pytest.raises(ValueError, match="out must have shape"):
        gram_streamed(A, D, out=torch.empty(10, 9, dtype=torch.float64))
    with pytest.raises(ValueError, match="panel_rows"):
        gram_streamed(A, D, panel_rows=0)
    with pytest.raises(ValueError, match="precision"):
        gram_streamed(A, D, precision="fast")
    with pytest.raises(TypeError, match="list"):
        gram_streamed(A[0], D)
