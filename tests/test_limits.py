"""Infinite-width kernels of FCNet (ntk_fast.limit_kernels): recursion, closed forms, quadrature, tables,
the compiled op, and the convergence of the empirical NTK to the limit."""
import math

import numpy as np
import pytest
import torch

import ntk_fast
from ntk_fast.limits.quadrature import bivariate_expectations, normal_rule, resolve_activation
from ntk_fast.limits.tabulated import build_tables
from ntk_fast.ops import _loader
from ntk_fast.ops.limits import limit_kernels_op
from ntk_fast.ops.reference_limits import limit_kernels_ref, relu_maps, table_maps

D = torch.float64
HAVE_OP = _loader.native("limit_kernels")
needs_op = pytest.mark.skipif(not HAVE_OP, reason="ntk_fast._C without limit_kernels")


def points(n, d, seed, sphere=False):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=D)
    if sphere:
        x = x / x.norm(dim=1, keepdim=True) * math.sqrt(d)
    return x


# ------------------------------------------------------------------ slow independent reference

def slow_pair(x, y, L, act, bias, m=160):
    """Propagate the full 2 x 2 covariance of (z(x), z(y)) and the 2 x 2 NTK through the layers; expectations
    over the 2-D Gaussian by a dense tensor-product trapezoid grid through the covariance's symmetric square
    root (independent of the library's parametrisation)."""
    d = x.numel()
    X = torch.stack([x, y])
    S = X @ X.t() / d
    T = S + bias ** 2
    z = torch.linspace(-9.5, 9.5, m, dtype=D)
    w = torch.exp(-0.5 * z * z)
    w = w / w.sum()
    Z = torch.stack(torch.meshgrid(z, z, indexing="ij")).reshape(2, -1)        # (2, m^2)
    W = (w[:, None] * w[None, :]).reshape(-1)
    for _ in range(L):
        ev, V = torch.linalg.eigh(S)
        U = (V * ev.clamp_min(0).sqrt()) @ V.t() @ Z                           # samples of N(0, S) on the grid
        f, g = act.sigma(U), act.dsigma(U)
        S_new = (f * W) @ f.t()
        Sd = (g * W) @ g.t()
        S, T = S_new, S_new + bias ** 2 + Sd * T
    return S[0, 1].item(), T[0, 1].item(), T[0, 0].item()


@pytest.mark.parametrize("activation,L,bias", [("softplus", 1, 0.0), ("softplus", 2, 0.5), ("tanh", 3, 0.3)])
def test_matches_slow_recursion(activation, L, bias):
    x1, x2 = points(4, 11, 0), points(3, 11, 1) * 1.3
    X = torch.cat([x1, x2])
    S, T = ntk_fast.limit_kernels(X, L=L, activation=activation, bias=bias, quad_tol=1e-9)
    Sx, Tx = ntk_fast.limit_kernels(x1, x2, L=L, activation=activation, bias=bias, quad_tol=1e-9)
    act = resolve_activation(activation, 5.0)
    tol = 1e-8      # (ReLU is checked against its closed form below: a grid is only O(step) across the kink)
    for i in range(4):
        for j in range(3):
            s, t, tii = slow_pair(x1[i], x2[j], L, act, bias)
            for a, b in ((S[i, 4 + j], s), (Sx[i, j], s), (T[i, 4 + j], t), (Tx[i, j], t)):
                assert abs(a.item() - b) < tol * (1 + abs(b))
        assert abs(T[i, i].item() - tii) < tol * (1 + tii)
    assert torch.equal(S, S.t()) and torch.equal(T, T.t())


def test_relu_closed_form():
    """L = 1 and L = 2 ReLU against the arc-cosine formulas written out (Cho & Saul degree 0 and 1)."""
    x = points(6, 5, 2) * torch.linspace(0.5, 2.0, 6, dtype=D)[:, None]
    for L in (1, 2):
        S, T = ntk_fast.limit_kernels(x, L=L, activation="relu", bias=0.3)
        xn = x.numpy()
        s = xn @ xn.T / 5
        t = s + 0.09
        for _ in range(L):
            q = np.diag(s)
            rho = np.clip(s / np.sqrt(np.outer(q, q)), -1, 1)
            np.fill_diagonal(rho, 1.0)
            th = np.arccos(rho)
            s = np.sqrt(np.outer(q, q)) * (np.sin(th) + (np.pi - th) * np.cos(th)) / np.pi
            t = s + 0.09 + t * (np.pi - th) / np.pi
        np.testing.assert_allclose(S.numpy(), s, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(T.numpy(), t, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("activation", ["softplus", "tanh"])
def test_expectations_vs_monte_carlo(activation):
    """E[sigma(u) sigma(v)] and E[sigma'(u) sigma'(v)] by quadrature against 4e5 Monte-Carlo samples:
    within 5 standard errors (about 1e-2 relative)."""
    act = resolve_activation(activation, 5.0)
    g = torch.Generator().manual_seed(3)
    q1 = torch.tensor([1.0, 0.5, 2.0, 1.0], dtype=D)
    q2 = torch.tensor([1.0, 1.5, 0.7, 1.0], dtype=D)
    rho = torch.tensor([0.3, -0.6, 0.95, 1.0], dtype=D)
    x, w = normal_rule(120, "trapezoid")
    e, ed = bivariate_expectations(act, q1, q2, rho, x, w)
    N = 400_000
    for k in range(4):
        z1, z2 = torch.randn(N, generator=g, dtype=D), torch.randn(N, generator=g, dtype=D)
        u = q1[k].sqrt() * z1
        v = q2[k].sqrt() * (rho[k] * z1 + (1 - rho[k] ** 2).clamp_min(0).sqrt() * z2)
        for val, ref in ((e[k], act.sigma(u) * act.sigma(v)), (ed[k], act.dsigma(u) * act.dsigma(v))):
            se = ref.std().item() / math.sqrt(N)
            assert abs(val.item() - ref.mean().item()) < 5 * se


def test_quadrature_rules_agree():
    act = resolve_activation("softplus", 5.0)
    q = torch.tensor([1.0, 0.8], dtype=D)
    rho = torch.tensor([0.9, -0.4], dtype=D)
    a = bivariate_expectations(act, q, q, rho, *normal_rule(150, "trapezoid"))
    b = bivariate_expectations(act, q, q, rho, *normal_rule(320, "hermite"))
    for u, v in zip(a, b):
        assert torch.allclose(u, v, rtol=0, atol=1e-9)


# ------------------------------------------------------------------ tabulated maps

def test_table_interpolation_error_relu():
    """The ReLU maps tabulated in t = sqrt(1 - rho), s = sqrt(1 + rho) and interpolated: <= 1e-7 of the
    map's scale everywhere, including correlations within 1e-12 of +-1 (sqrt singularities)."""
    act = resolve_activation("relu")
    tab = build_tables(act, torch.ones(1, dtype=D), 1024, torch.empty(0), torch.empty(0))[0]
    t = torch.cat([torch.linspace(-1, 1, 200_001, dtype=D), 1 - torch.logspace(-12, -1, 200, dtype=D),
                   -1 + torch.logspace(-12, -1, 200, dtype=D)])
    e, ed = table_maps(tab, t)
    one = torch.ones_like(t)
    E, Ed = relu_maps(one, one, t, act.c)
    assert (e - E).abs().max() <= 1e-7 * E.abs().max()
    assert (ed - Ed).abs().max() <= 1e-7 * Ed.abs().max()


@pytest.mark.parametrize("activation", ["relu", "softplus"])
def test_tabulated_matches_exact(activation):
    x = points(9, 6, 4, sphere=True)
    x[1] = x[0] + 1e-7 * x[2]                          # a near-duplicate: correlation 1 - O(1e-14)
    x[1] = x[1] / x[1].norm() * math.sqrt(6)
    a = ntk_fast.limit_kernels(x, L=3, activation=activation, method="tabulated", bias=0.2)
    b = ntk_fast.limit_kernels(x, L=3, activation=activation, method="exact", quad_tol=1e-9, bias=0.2)
    for u, v in zip(a, b):
        # ReLU near-duplicates: the exact map itself moves by ~sqrt(rounding of rho) = 1e-8 there.
        assert (u - v).abs().max() <= 1e-7 * v.abs().max()


# ------------------------------------------------------------------ finite width -> limit

def test_empirical_ntk_approaches_limit():
    """Relative Frobenius error of FCNet's empirical NTK (mean over 4 seeds) at h = 125, 500, 2000.  Theory:
    fluctuations of order 1/sqrt(h), so err * sqrt(h) should stay roughly constant: the fitted log-log slope
    must lie in [-0.8, -0.3] (statistical; 4 seeds x 3 widths keep it within these bounds for these seeds)."""
    x = points(6, 5, 5, sphere=True)
    for activation, L, bias in (("softplus", 2, 0.0), ("relu", 1, 0.5)):
        _, T = ntk_fast.limit_kernels(x, L=L, activation=activation, bias=bias)
        hs = [125, 500, 2000]
        errs = []
        for h in hs:
            e = []
            for seed in range(4):
                net = ntk_fast.FCNet(5, h, L, activation=activation, bias=bias, dtype=D,
                                     generator=torch.Generator().manual_seed(100 + seed))
                e.append(((ntk_fast.empirical_ntk(net, x) - T).norm() / T.norm()).item())
            errs.append(np.mean(e))
        slope = np.polyfit(np.log(hs), np.log(errs), 1)[0]
        assert -0.8 <= slope <= -0.3, (activation, errs, slope)
        assert errs[-1] < 0.1


# ------------------------------------------------------------------ the op

def op_args(mode, symmetric, dtype):
    x1, x2 = points(13, 7, 6).to(dtype), points(9, 7, 7).to(dtype)
    L = 2
    name = "relu" if mode == "relu" else ("tanh" if mode == "tanh" else "softplus")
    act = resolve_activation(name, 5.0)
    nodes, weights = normal_rule(40, "trapezoid") if name != "relu" else (torch.empty(0, dtype=D),) * 2
    if mode == "table":
        x1 = x1 / x1.norm(dim=1, keepdim=True) * math.sqrt(7)
        x2 = x2 / x2.norm(dim=1, keepdim=True) * math.sqrt(7)
        table = build_tables(act, torch.ones(L, dtype=D), 64, nodes, weights)
    else:
        table = torch.empty(0, dtype=D)
    q1 = torch.rand(L, 13, dtype=D) + 0.5
    q2 = torch.rand(L, 9, dtype=D) + 0.5
    q1[0] = x1.double().pow(2).sum(1) / 7
    q2[0] = x2.double().pow(2).sum(1) / 7
    return (x1, x1 if symmetric else x2, q1, q1 if symmetric else q2, table, nodes, weights, symmetric, L, name,
            5.0, act.c, 0.3, 4)


@needs_op
@pytest.mark.parametrize("mode", ["relu", "softplus", "tanh", "table"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_op_matches_reference(mode, symmetric, dtype):
    args = op_args(mode, symmetric, dtype)
    a = torch.ops.ntk_fast.limit_kernels(*args)
    b = limit_kernels_ref(*args)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    for u, v in zip(a, b):
        assert u.dtype == dtype
        assert torch.allclose(u, v, rtol=tol, atol=tol)


@needs_op
def test_opcheck():
    torch.library.opcheck(torch.ops.ntk_fast.limit_kernels.default, op_args("table", False, D),
                          test_utils=("test_schema", "test_faketensor"))


@needs_op
def test_compile_fullgraph():
    args = op_args("relu", True, D)

    def f(x1, q1):
        s, t = limit_kernels_op(x1, x1, q1, q1, *args[4:])
        return s + 2 * t

    got = torch.compile(f, fullgraph=True, backend="eager")(args[0], args[2])
    s, t = limit_kernels_ref(*args)
    assert torch.allclose(got, s + 2 * t, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ API

def test_custom_activation_matches_named():
    x = points(5, 4, 8)
    c = ntk_fast.activation_normaliser("tanh")
    a = ntk_fast.limit_kernels(x, L=2, activation="tanh", quad_tol=1e-10)
    b = ntk_fast.limit_kernels(x, L=2, activation=lambda z: c * torch.tanh(z), quad_tol=1e-10)
    for u, v in zip(a, b):
        assert torch.allclose(u, v, rtol=1e-9, atol=1e-10)


def test_float32_and_bias_true():
    x = points(5, 4, 9)
    a = ntk_fast.limit_kernels(x.float(), L=2, activation="relu", bias=True)
    b = ntk_fast.limit_kernels(x, L=2, activation="relu", bias=1.0)
    assert a[1].dtype == torch.float32
    assert torch.allclose(a[1].double(), b[1], rtol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(x1=torch.randn(3)), "x1 must be a 2-D"),
    (dict(x1=torch.ones(3, 2, dtype=torch.int64)), "x1 must be float32 or float64"),
    (dict(x1=torch.randn(0, 2)), "x1 must be a 2-D"),
    (dict(x1=torch.tensor([[1.0, float("nan")]])), "x1 has non-finite"),
    (dict(x1=torch.randn(3, 2), x2=torch.randn(3, 4)), "x2 must have 2 columns"),
    (dict(x1=torch.randn(3, 2), x2=torch.randn(3, 2, dtype=D)), "x2 is torch.float64"),
    (dict(x1=torch.randn(3, 2), L=0), "L must be an int >= 1"),
    (dict(x1=torch.randn(3, 2), activation="gelu"), "activation must be one of"),
    (dict(x1=torch.randn(3, 2), beta=-1.0), "beta must be"),
    (dict(x1=torch.randn(3, 2), bias=-0.5), "bias must be"),
    (dict(x1=torch.randn(3, 2), method="magic"), "method must be one of"),
    (dict(x1=torch.randn(3, 2), method="tabulated"), "needs inputs of one norm"),
    (dict(x1=torch.randn(3, 2), quad_tol=0.0), "quad_tol must be > 0"),
])
def test_bad_input(kwargs, match):
    kwargs = dict(kwargs)
    x1 = kwargs.pop("x1")
    kwargs.setdefault("L", 2)
    with pytest.raises(ValueError, match=match):
        ntk_fast.limit_kernels(x1, **kwargs)
