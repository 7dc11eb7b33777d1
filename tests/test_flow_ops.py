"""The gradient-flow ops against their pure-torch references (float64, fresh random inputs, odd sizes)."""
import math
import warnings

import pytest
import torch

from ntk_fast import _flow_ops as ops
from ntk_fast import reference_flow as ref

pytestmark = pytest.mark.skipif(not ops.have_extension(), reason="extension not built")
SIZES = [(1, 1), (1, 8193), (3, 12347), (2, 40001)]


@pytest.mark.parametrize("K,P", SIZES)
@pytest.mark.parametrize("tau", [0.0, 0.37])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_flow_step(K, P, tau, dtype):
    gen = torch.Generator().manual_seed(K * 7 + P)
    w, g, v = (torch.randn(K, P, generator=gen, dtype=dtype) for _ in range(3))
    dt = torch.rand(K, generator=gen, dtype=dtype) * 3
    dt[0] = 0.0
    w_out, v_out = ops.flow_step(w, g, dt, tau, v)
    w_ref, v_ref = torch.empty_like(w), torch.empty_like(w)
    ref.flow_step(w, g, v, dt, tau, w_ref, v_ref)
    tol = 0 if dtype == torch.float64 and tau == 0 else (1e-14 if dtype == torch.float64 else 1e-5)
    torch.testing.assert_close(w_out, w_ref, rtol=tol, atol=tol)
    assert torch.equal(w_out[0], w[0]) or tau > 0      # dt = 0 freezes a net exactly
    if tau > 0:
        torch.testing.assert_close(v_out, v_ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("K,P", SIZES)
def test_flow_grad_stats(K, P):
    gen = torch.Generator().manual_seed(P)
    g, gp = torch.randn(K, P, generator=gen, dtype=torch.float64), torch.randn(K, P, generator=gen, dtype=torch.float64)
    out = ops.flow_grad_stats(g, gp)
    assert out.shape == (K, 2) and out.dtype == torch.float64
    torch.testing.assert_close(out, ref.flow_grad_stats(g, gp), rtol=1e-13, atol=0)
    g32, gp32 = g.float(), gp.float()
    torch.testing.assert_close(ops.flow_grad_stats(g32, gp32), ref.flow_grad_stats(g32, gp32), rtol=1e-12, atol=0)


def test_flow_grad_stats_thread_independent():
    g, gp = torch.randn(2, 100_003, dtype=torch.float64), torch.randn(2, 100_003, dtype=torch.float64)
    nt = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = ops.flow_grad_stats(g, gp)
        torch.set_num_threads(max(2, nt))
        b = ops.flow_grad_stats(g, gp)
    finally:
        torch.set_num_threads(nt)
    assert torch.equal(a, b)


@pytest.mark.parametrize("K,n", [(1, 1), (1, 2049), (3, 4097), (2, 77)])
@pytest.mark.parametrize("loss", ["softhinge", "qhinge"])
@pytest.mark.parametrize("alpha", [0.01, 1.0, 30.0])
def test_flow_loss(K, n, loss, alpha):
    gen = torch.Generator().manual_seed(n + K)
    f, f0, Fp = (torch.randn(K, n, generator=gen, dtype=torch.float64) for _ in range(3))
    f = f0 + f / alpha                      # F = O(1): both sides of the margin
    y = torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1
    got = ops.flow_loss(f, f0, y, Fp, alpha, 20.0, loss)
    want = ref.flow_loss(f, f0, y, Fp, alpha, 20.0, ref.LOSS_KINDS[loss])
    for name, a, b in zip(("F", "r", "loss", "nd", "dout"), got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        if a.dtype == torch.long:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-300, msg=name)


def test_flow_loss_nonfinite():
    f = torch.zeros(2, 5, dtype=torch.float64)
    f[1, 3] = math.nan
    F, r, loss, nd, dout = ops.flow_loss(f, torch.zeros_like(f), torch.ones(5, dtype=torch.float64),
                                         torch.zeros_like(f), 1.0)
    assert math.isfinite(loss[0]) and math.isfinite(dout[0])
    assert math.isnan(loss[1]) and math.isnan(dout[1])


def test_flow_loss_large_margin_stable():
    # far beyond the margin the soft hinge underflows gracefully; far below it is linear
    f = torch.tensor([[1e3, -1e3]], dtype=torch.float64)
    F, r, loss, nd, dout = ops.flow_loss(f, torch.zeros_like(f), torch.ones(2, dtype=torch.float64),
                                         torch.zeros_like(f), 1.0)
    assert torch.isfinite(r).all() and torch.isfinite(loss).all()
    torch.testing.assert_close(loss, torch.tensor([(1001.0 + 0.0) / 2], dtype=torch.float64))
    assert nd.item() == 1


def test_opcheck():
    w, g, v = (torch.randn(2, 33, dtype=torch.float64) for _ in range(3))
    dt = torch.rand(2, dtype=torch.float64)
    torch.library.opcheck(torch.ops.ntk_fast.flow_step, (w, g, v, dt, 0.5, torch.empty_like(w), torch.empty_like(w)))
    torch.library.opcheck(torch.ops.ntk_fast.flow_grad_stats, (w, g))
    y = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    f = torch.randn(2, 3, dtype=torch.float64)
    torch.library.opcheck(torch.ops.ntk_fast.flow_loss, (f, torch.zeros_like(f), y, torch.zeros_like(f), 2.0, 20.0, 0))


def test_bad_inputs():
    w = torch.randn(2, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="dt"):
        ops.flow_step(w, w, torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="g must be"):
        ops.flow_step(w, w.float(), torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="tau"):
        ops.flow_step(w, w, torch.ones(2, dtype=torch.float64), tau=-1.0)
    with pytest.raises(ValueError, match="alpha"):
        ops.flow_loss(w, w, torch.ones(5, dtype=torch.float64), w, 0.0)
    with pytest.raises(ValueError, match="y must"):
        ops.flow_loss(w, w, torch.ones(4, dtype=torch.float64), w, 1.0)


def test_fallback_warns_once(monkeypatch):
    monkeypatch.setattr(ops, "_HAVE_EXT", False)
    monkeypatch.setattr(ops, "_warned", False)
    g, gp = torch.randn(2, 9, dtype=torch.float64), torch.randn(2, 9, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="reference"):
        a = ops.flow_grad_stats(g, gp)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.flow_grad_stats(g, gp)
    torch.testing.assert_close(a, ref.flow_grad_stats(g, gp))
