"""The gradient-flow ops against their pure-torch references (float64, fresh random inputs, odd sizes)."""
import math
import warnings

import pytest
import torch

from ntk_fast.ops import flow as ops
from ntk_fast.ops import reference as ref
from ntk_fast.ops._loader import native

pytestmark = pytest.mark.skipif(not native("flow_step"), reason="extension not built")
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
@pytest.mark.parametrize("loss", ["softhinge", "qhinge", "hinge", "mse"])
@pytest.mark.parametrize("alpha", [0.01, 1.0, 30.0])
def test_flow_loss(K, n, loss, alpha):
    gen = torch.Generator().manual_seed(n + K)
    f, f0, Fp = (torch.randn(K, n, generator=gen, dtype=torch.float64) for _ in range(3))
    f = f0 + f / alpha                      # F = O(1): both sides of the margin
    y = torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1
    if loss == "mse":                       # real-valued targets
        y = torch.randn(n, generator=gen, dtype=torch.float64)
    got = ops.flow_loss(f, f0, y, Fp, alpha, 20.0, loss)
    want = ref.flow_loss(f, f0, y, Fp, alpha, 20.0, loss)
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
    for loss in ("softhinge", "qhinge", "hinge", "mse"):
        torch.library.opcheck(torch.ops.ntk_fast.flow_loss, (f, torch.zeros_like(f), y, torch.zeros_like(f), 2.0, 20.0,
                                                             loss))
    with pytest.raises(RuntimeError, match="loss must be 'softhinge', 'qhinge', 'hinge' or 'mse', got 'huber'"):
        torch.ops.ntk_fast.flow_loss(f, torch.zeros_like(f), y, torch.zeros_like(f), 2.0, 20.0, "huber")


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
    from ntk_fast.ops import _loader
    monkeypatch.setattr(_loader, "_disabled", {"flow_grad_stats": "test"})
    monkeypatch.setattr(_loader, "_warned", set())
    g, gp = torch.randn(2, 9, dtype=torch.float64), torch.randn(2, 9, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="reference"):
        a = ops.flow_grad_stats(g, gp)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.flow_grad_stats(g, gp)
    torch.testing.assert_close(a, ref.flow_grad_stats(g, gp))


def _act_inputs(shape, dtype, gen):
    z = torch.randn(*shape, generator=gen, dtype=torch.float64).mul_(4.0)
    flat = z.view(-1)
    extremes = torch.tensor([0.0, -0.0, 30.0, -30.0, 200.0, -200.0, 1e-8, -1e-8], dtype=torch.float64)
    m = min(flat.numel(), extremes.numel())
    flat[:m] = extremes[:m]
    return z.to(dtype)


@pytest.mark.parametrize("shape", [(1,), (7,), (2000, 100), (3, 17, 33), (0, 5)])
@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_softplus_act(shape, keep, dtype, gen):
    beta, c = 5.0, 1.40438 / math.sqrt(100)
    z = _act_inputs(shape, dtype, gen)
    a, s = z.clone(), (torch.full_like(z, float("nan")) if keep else None)
    ops.softplus_act(a, s, beta, c)
    ra, rs = z.double().clone(), torch.empty_like(z, dtype=torch.float64)
    ref.softplus_act(ra, rs, beta, c)
    tol = dict(rtol=1e-14, atol=1e-300) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-30)  # exp: rel. error ~ |beta z| ulp
    assert torch.isfinite(a).all()                            # no overflow at beta z = 1000 in float32 either
    torch.testing.assert_close(a.double(), ra, **tol)
    if keep:
        torch.testing.assert_close(s.double(), rs, **tol)


def test_softplus_act_matches_the_net_activation(gen):
    # a = sigma(z)/sqrt(h), s = sigma'(z)/sqrt(h) of FCNet's softplus
    from ntk_fast.models.fc import activation_and_derivative, activation_normaliser
    beta, h = 5.0, 37
    sig, dsig = activation_and_derivative("softplus", beta)
    z = _act_inputs((65, h), torch.float64, gen)
    a, s = z.clone(), torch.empty_like(z)
    ops.softplus_act(a, s, beta, activation_normaliser("softplus", beta) / math.sqrt(h))
    torch.testing.assert_close(a, sig(z) / math.sqrt(h), rtol=1e-14, atol=1e-300)
    torch.testing.assert_close(s, dsig(z) / math.sqrt(h), rtol=1e-14, atol=1e-300)


def test_softplus_act_nan_and_inf():
    z = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0], dtype=torch.float64)
    s = torch.empty_like(z)
    ops.softplus_act(z, s, 2.0, 1.0)
    assert math.isnan(z[0]) and math.isnan(s[0])
    assert z[1] == float("inf") and s[1] == 1.0
    assert z[2] == 0.0 and s[2] == 0.0
    assert abs(z[3].item() - math.log1p(math.exp(2.0)) / 2.0) < 1e-15


def test_softplus_act_opcheck_and_errors():
    z = torch.randn(4, 9, dtype=torch.float64)
    torch.library.opcheck(torch.ops.ntk_fast.softplus_act, (z.clone(), torch.empty_like(z), 5.0, 0.3))
    with pytest.raises(ValueError, match="beta"):
        ops.softplus_act(z.clone(), None, 0.0, 1.0)
    with pytest.raises(ValueError, match="s must be"):
        ops.softplus_act(z.clone(), torch.empty(4, 8, dtype=torch.float64), 5.0, 1.0)
    with pytest.raises(ValueError, match="s must be"):
        ops.softplus_act(z.clone(), torch.empty(4, 9, dtype=torch.float32), 5.0, 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        ops.softplus_act(z.t(), None, 5.0, 1.0)
    with pytest.raises(ValueError, match="float32 or float64"):
        ops.softplus_act(z.to(torch.int64), None, 5.0, 1.0)


def test_softplus_act_every_cpu_path():
    # the AVX-512, AVX2 and scalar paths (NTK_FAST_ACT_ISA caps the path; each one this CPU has is checked)
    import subprocess
    import sys
    code = ("import torch, math; from ntk_fast.ops import flow as ops, reference as ref\n"
            "g = torch.Generator().manual_seed(3)\n"
            "for dt in (torch.float64, torch.float32):\n"
            "    z = (torch.randn(1001, 37, generator=g, dtype=torch.float64) * 4).to(dt)\n"
            "    z.view(-1)[:4] = torch.tensor([0.0, 200.0, -200.0, 30.0])\n"
            "    a, s = z.clone(), torch.empty_like(z); ops.softplus_act(a, s, 5.0, 0.7)\n"
            "    ra, rs = z.double().clone(), torch.empty(z.shape, dtype=torch.float64)\n"
            "    ref.softplus_act(ra, rs, 5.0, 0.7)\n"
            "    tol = 1e-14 if dt == torch.float64 else 1e-5\n"
            "    torch.testing.assert_close(a.double(), ra, rtol=tol, atol=1e-30)\n"
            "    torch.testing.assert_close(s.double(), rs, rtol=tol, atol=1e-30)\n"
            "print('ok')\n")
    for isa in ("scalar", "avx2", "native"):
        env = dict(__import__("os").environ, NTK_FAST_ACT_ISA=isa)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and out.stdout.strip() == "ok", (isa, out.stderr[-2000:])
