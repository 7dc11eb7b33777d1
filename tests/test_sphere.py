"""ntk_fast.sphere and ntk_fast.spectrum: harmonics against closed forms, the field sampler's spectrum
(statistical test), spectrum tools, the model mapping, predictors, and a smoke run of the learning-curve script."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ntk_fast.guards.memory import MemoryBudgetError
from ntk_fast.sphere import (check_on_sphere, degree_coefficients, field_covariance, fit_exponent, gegenbauer,
                             gegenbauer_nodes, harmonic_dim, predicted_exponents, sample_field, sample_sphere,
                             target_power)
from ntk_fast.models.fc import FCNet
from ntk_fast.ntk.empirical import empirical_ntk
from ntk_fast.sphere.predictors import (_forward, _grads, _ntk_trace, alpha_for_xi, entk_regression, fit_net,
                                        make_net, ntk_inf_regression)
from ntk_fast.spectrum import (degree_power, gram_degree_content, gram_eigh, gram_topk, kernel_degree_spectrum,
                               kernel_target_alignment, mode_projections)

special = pytest.importorskip("scipy.special")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def circle(n):
    th = 2 * math.pi * torch.arange(n, dtype=torch.float64) / n
    return torch.stack([th.cos(), th.sin()], 1), th


@pytest.mark.parametrize("d", [2, 3, 5, 7])
def test_gegenbauer_against_scipy(d):
    t = torch.rand(37, dtype=torch.float64) * 2 - 1
    P = gegenbauer(12, d, t)
    for k in range(13):
        if d == 2:
            ref = np.cos(k * np.arccos(t.numpy()))
        else:
            lam = (d - 2) / 2
            ref = special.eval_gegenbauer(k, lam, t.numpy()) / special.eval_gegenbauer(k, lam, 1.0)
        np.testing.assert_allclose(P[k].numpy(), ref, rtol=1e-10, atol=1e-12)
    assert torch.allclose(gegenbauer(40, d, torch.ones(1, dtype=torch.float64)), torch.ones(41, 1, dtype=torch.float64))


@pytest.mark.parametrize("d", [2, 3, 4, 6])
def test_harmonic_dims_count_polynomials(d):
    # harmonics of degree <= K span the restrictions of polynomials of degree <= K: C(K+d-1, d-1) + C(K+d-2, d-1)
    for K in (0, 1, 5, 9):
        total = sum(harmonic_dim(k, d) for k in range(K + 1))
        assert total == math.comb(K + d - 1, d - 1) + (math.comb(K + d - 2, d - 1) if K >= 1 else 0)


@pytest.mark.parametrize("d", [2, 3, 5])
def test_degree_coefficients_closed_forms(d):
    a2 = degree_coefficients(lambda t: t ** 2, d, 5, order=8)          # t^2 = 1/d + (d-1)/d P_2
    assert torch.allclose(a2, torch.tensor([1 / d, 0, 2 / (d * (d + 2)), 0, 0, 0], dtype=torch.float64), atol=1e-14)
    a3 = degree_coefficients(lambda t: t ** 3, d, 5, order=8)          # a_1 = E[t^4] = 3 / (d (d + 2))
    assert abs(float(a3[1]) - 3 / (d * (d + 2))) < 1e-14 and float(a3[[0, 2, 4, 5]].abs().max()) < 1e-14
    # reconstruction of a smooth kernel from its coefficients
    a = kernel_degree_spectrum(torch.exp, d, 30)
    t = torch.linspace(-1, 1, 11, dtype=torch.float64)
    N = torch.tensor([float(harmonic_dim(k, d)) for k in range(31)], dtype=torch.float64)
    assert torch.allclose((a[:, None] * N[:, None] * gegenbauer(30, d, t)).sum(0), t.exp(), atol=1e-12)


def test_field_covariance_against_direct_sum():
    g = torch.Generator().manual_seed(1)
    x = sample_sphere(23, 4, g)
    c = target_power(4, 0.7, 9)
    C = field_covariance(x, c)
    t = (x @ x.T).clamp(-1, 1).numpy()
    geg = special.eval_gegenbauer
    ref = sum(float(c[k]) * harmonic_dim(k, 4) * geg(k, 1.0, t) / geg(k, 1.0, 1) for k in range(10))
    np.testing.assert_allclose(C.numpy(), ref, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("d,nu", [(3, 1.5), (2, 0.75)])
def test_sampled_field_has_the_intended_spectrum(d, nu):
    """Degree-k power of M draws on n fixed points, p_k = N_k / n^2 f^T P_k f (P_k = P_k(x_i . x_j)):
    (1) its mean over draws against the exact expectation N_k / n^2 tr(P_k C): z-score < 5 with
        Var p_k = 2 (N_k / n^2)^2 tr((P_k C)^2) / M (Gaussian quadratic form);
    (2) the intended power: the off-diagonal part U = N_k / (n (n - 1)) sum_{i != j} C_ij P_k(x_i . x_j) is an
        unbiased (degenerate U-statistic) estimate of c_k N(k, d) over uniform points, with
        Var U ~ 2 Var_t(N_k C(t) P_k(t)) / (n (n - 1)) (Gauss-Jacobi in t): |U - c_k N_k| < 5 sd."""
    g = torch.Generator().manual_seed(7)
    n, M = 300, 3000
    x = sample_sphere(n, d, g)
    fs = sample_field(x, nu, M, g)
    assert fs.jitter == 0.0 and fs.tail < 1e-5
    kmax = 4
    p = degree_power(x, fs.values, kmax).mean(0)
    c = target_power(d, nu, fs.k_max)
    C = field_covariance(x, c)
    P = gegenbauer(kmax, d, (x @ x.T).clamp(-1, 1))
    tq, wq = gegenbauer_nodes(d, 400)
    tq, wq = torch.from_numpy(tq), torch.from_numpy(wq)
    Nall = torch.tensor([float(harmonic_dim(j, d)) for j in range(fs.k_max + 1)], dtype=torch.float64)
    Ct = (c[:, None] * Nall[:, None] * gegenbauer(fs.k_max, d, tq)).sum(0)
    Pq = gegenbauer(kmax, d, tq)
    for k in range(1, kmax + 1):
        Nk = harmonic_dim(k, d)
        PC = P[k] @ C
        mean = Nk / n ** 2 * float(PC.diagonal().sum())
        sd = Nk / n ** 2 * math.sqrt(2 * float((PC * PC.T).sum()) / M)
        assert abs(float(p[k]) - mean) < 5 * sd, (k, float(p[k]), mean, sd)
        A = P[k] * C
        U = Nk / (n * (n - 1)) * float(A.sum() - A.diagonal().sum())
        h2 = float((wq * (Nk * Ct * Pq[k]) ** 2).sum()) - (float(c[k]) * Nk) ** 2
        sdU = math.sqrt(2 * h2 / (n * (n - 1)))
        assert abs(U - float(c[k]) * Nk) < 5 * sdU, (k, U, float(c[k]) * Nk, sdU)
    assert abs(float(p[0])) < 0.05 * float(p[1])                       # no constant mode


def test_field_bad_input(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = sample_sphere(10, 3, g)
    with pytest.raises(ValueError, match="not on the sphere"):
        sample_field(2 * x, 1.0)
    with pytest.raises(ValueError, match="nu_t"):
        sample_field(x, 0.0)
    with pytest.raises(ValueError, match="nu_t"):
        sample_field(x, -1.0)
    with pytest.raises(ValueError, match="non-finite"):
        check_on_sphere(torch.full((3, 3), float("nan")))
    monkeypatch.setenv("NTK_FAST_MEMORY_LIMIT", "1M")
    with pytest.raises(MemoryBudgetError, match="sample_field"):
        sample_field(sample_sphere(400, 3, g), 1.0)


def test_gram_eigh_and_topk_low_rank(tmp_path):
    g = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(157, 5, generator=g, dtype=torch.float64))
    lam = torch.tensor([9.0, 4.0, 2.5, 1.0, 0.3], dtype=torch.float64)
    K = Q @ torch.diag(lam) @ Q.T
    ev, V = gram_eigh(K, 6)
    assert torch.allclose(ev[:5], lam, atol=1e-12) and abs(float(ev[5])) < 1e-12
    assert torch.allclose((V[:, :5].T @ Q).abs().sum(1), torch.ones(5, dtype=torch.float64), atol=1e-9)
    np.save(tmp_path / "K.npy", K.numpy())
    l2, V2 = gram_topk(str(tmp_path / "K.npy"), 3, block=20)
    np.testing.assert_allclose(l2, lam[:3].numpy(), rtol=1e-10)
    assert np.allclose(np.abs(V2.T @ V[:, :3].numpy()), np.eye(3), atol=1e-8)
    with pytest.raises(ValueError, match="k must"):
        gram_topk(K.numpy(), 157)


def test_degree_tools_exact_on_equispaced_circle():
    x, th = circle(64)                                     # exact quadrature for trigonometric degree < 64
    K = (x @ x.T) ** 2                                     # cos^2 = 1/2 + cos(2 theta) / 2
    gk = gram_degree_content(K, x, 5)
    assert torch.allclose(gk, torch.tensor([0.5, 0, 0.5, 0, 0, 0], dtype=torch.float64), atol=1e-13)
    p = degree_power(x, torch.cos(3 * th), 5)            # cos(3 theta) = Y_3 / sqrt(2): power 1/2 in degree 3
    assert torch.allclose(p, torch.tensor([0, 0, 0, 0.5, 0, 0], dtype=torch.float64), atol=1e-13)


def test_alignment_and_mode_projections():
    g = torch.Generator().manual_seed(4)
    y = torch.randn(50, generator=g, dtype=torch.float64)
    assert abs(kernel_target_alignment(torch.outer(y, y), y) - 1) < 1e-12
    assert abs(kernel_target_alignment(torch.eye(50, dtype=torch.float64), y) - 1 / math.sqrt(50)) < 1e-12
    A = torch.randn(50, 50, generator=g, dtype=torch.float64)
    _, V = gram_eigh(A @ A.T)
    pr = mode_projections(V, y, torch.ones(50, dtype=torch.float64))
    assert torch.allclose(pr.sum(1), torch.ones(2, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("xi", [0, 1])
def test_fcnet_is_the_slides_net(xi):
    """F = alpha (f - f0) of FCNet(L=1, relu) at alpha_for_xi is the slides' f_xi (feature: up to alpha f0)."""
    d, h = 4, 37
    net = make_net(d, h, 0)
    W0, W1 = [w.detach().clone() for w in net.weights]
    u = sample_sphere(9, d, torch.Generator().manual_seed(1))
    f0 = net(u * math.sqrt(d)).detach()
    with torch.no_grad():
        for w in net.weights:
            w.add_(0.3 * torch.randn_like(w))
    f = net(u * math.sqrt(d)).detach()
    a = alpha_for_xi(xi, h)
    F = a * (f - f0)
    th, w = net.weights[0].detach(), net.weights[1].detach()[0]
    slides = h ** -(1 - xi / 2) * ((w * torch.relu(u @ th.T)).sum(1) - xi * (W1[0] * torch.relu(u @ W0.T)).sum(1))
    assert torch.allclose(F + (1 - xi) * a * f0, slides, atol=1e-12)


def test_predictors_lazy_net_follows_entk_and_errors():
    d, n, m, h = 3, 24, 40, 64
    g = torch.Generator().manual_seed(5)
    u = sample_sphere(n + m, d, g)
    y = sample_field(u, 2.0, 1, g).values[0]
    net = make_net(d, h, 0)
    r = entk_regression(net, u[:n], y[:n], u[n:])
    o = fit_net(make_net(d, h, 0), u[:n], y[:n], u[n:], 1e4, K0=r["K"], eta=1.0, max_steps=4000, max_wall=60)
    assert o["train_mse"] < 1e-5 * float((y[:n] ** 2).mean())
    assert float((o["pred"] - r["pred"]).norm() / r["pred"].norm()) < 0.05
    p_inf = ntk_inf_regression(u[:n], y[:n], u[n:])
    assert float(((p_inf - y[n:]) ** 2).mean()) < float((y[n:] ** 2).mean())   # learns something
    with pytest.raises(ValueError, match="u_test"):
        ntk_inf_regression(u[:n], y[:n], 3 * u[n:])
    with pytest.raises(ValueError, match="xi"):
        alpha_for_xi(2, 10)


def _perturbed_study_net(d, h, seed):
    net = make_net(d, h, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in list(net.weights) + list(net.biases):
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net


def test_fit_net_forward_gradients_and_trace():
    """The hand-written forward, gradients and NTK trace of fit_net against FCNet, autograd and empirical_ntk
    (float64, perturbed weights and nonzero biases, odd sizes)."""
    d, h, n = 3, 37, 11
    net = _perturbed_study_net(d, h, 2)
    u = sample_sphere(n, d, torch.Generator().manual_seed(3))
    x = u * math.sqrt(d)
    P = [net.weights[0], net.biases[0], net.weights[1], net.biases[1]]
    b, c = net.bias_scale, math.sqrt(2.0 / h)
    a0 = x / math.sqrt(d)
    f, a, m = _forward([p.detach() for p in P], a0, b, c)
    assert torch.allclose(f, net(x).detach(), rtol=1e-13, atol=1e-13)
    gvec = torch.randn(n, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    auto = torch.autograd.grad((gvec * net(x)).sum(), P)
    mine = _grads([p.detach() for p in P], a0, a, m, gvec, b, c)
    for ga, gm in zip(auto, mine):
        assert ga.shape == gm.shape and torch.allclose(ga, gm, rtol=1e-12, atol=1e-13)
    q = a0.pow(2).sum(1) + b * b
    tr = _ntk_trace([p.detach() for p in P], a, m, q, b, c)
    assert abs(tr - float(empirical_ntk(net, x).diagonal().sum())) < 1e-10 * tr


@pytest.mark.parametrize("xi", [1, 0])
def test_fit_net_stops_at_the_stated_loss(xi):
    """fit_net stops at the first step whose train mse <= target_mse: one step fewer does not reach it; the
    returned test predictions are those of the net trained in place; the feature regime (xi = 0) stays stable
    while its kernel grows (the step shrinks)."""
    d, h, n, m = 5, 48, 19, 13
    g = torch.Generator().manual_seed(6)
    u = sample_sphere(n + m, d, g)
    y = sample_field(u, 1.5, 1, g).values[0]
    target = 1e-3 * float((y[:n] ** 2).mean())
    alpha = alpha_for_xi(xi, h)
    net = make_net(d, h, 1)
    f0_test = net(u[n:] * math.sqrt(d)).detach()
    o = fit_net(net, u[:n], y[:n], u[n:], alpha, target_mse=target, max_steps=20000, max_wall=60)
    assert o["status"] == "reached" and o["train_mse"] <= target and o["steps"] > 1
    assert torch.allclose(o["pred"], alpha * (net(u[n:] * math.sqrt(d)).detach() - f0_test), rtol=1e-12, atol=1e-14)
    early = fit_net(make_net(d, h, 1), u[:n], y[:n], u[n:], alpha, target_mse=target, max_steps=o["steps"] - 1)
    assert early["status"] == "max_steps" and early["train_mse"] > target
    if xi == 0:
        assert o["lr_last"] < 0.5 * o["lr"]                      # the kernel grew, the step followed it
    plain = fit_net(make_net(d, h, 1), u[:n], y[:n], u[n:], alpha, momentum=0.0, target_mse=target, max_steps=3)
    assert plain["status"] == "max_steps" and plain["steps"] == 3


def test_fit_net_lazy_limit_momentum_and_plain_gd_reach_the_entk_interpolant():
    """Deep in the lazy regime (alpha sqrt(h) = 1e5) plain GD and heavy ball (mu = 0.9) both end at the eNTK
    interpolant (the iterates stay in w0 + span of the gradients); heavy ball in ~10x fewer steps."""
    d, h, n, m = 5, 48, 19, 13
    g = torch.Generator().manual_seed(6)
    u = sample_sphere(n + m, d, g)
    y = sample_field(u, 1.5, 1, g).values[0]
    ref = entk_regression(make_net(d, h, 1), u[:n], y[:n], u[n:])["pred"]
    steps = {}
    for mu in (0.0, 0.9):
        o = fit_net(make_net(d, h, 1), u[:n], y[:n], u[n:], 1e5 / math.sqrt(h), momentum=mu, target_mse=1e-10,
                    max_steps=20000)
        assert o["status"] == "reached" and float((o["pred"] - ref).norm() / ref.norm()) < 1e-4
        steps[mu] = o["steps"]
    assert steps[0.9] < steps[0.0] / 4


def test_fit_net_bad_input():
    d, n = 3, 7
    u = sample_sphere(n + 2, d, torch.Generator().manual_seed(0))
    y = torch.zeros(n, dtype=torch.float64)
    for kw, name in ((dict(momentum=1.0), "momentum"), (dict(target_mse=-1.0), "target_mse"), (dict(eta=0.0), "eta")):
        with pytest.raises(ValueError, match=name):
            fit_net(make_net(d, 8, 0), u[:n], y, u[n:], 1.0, **kw)
    with pytest.raises(ValueError, match="net"):
        fit_net(FCNet(d, 8, 1, activation="relu", dtype=torch.float64), u[:n], y, u[n:], 1.0)


def test_entk_on_the_circle_has_rank_3_per_activation_cell():
    """d = 2: between two neighbouring kink angles of the net at initialisation (B_0 = 0: kinks where W_0j . u = 0)
    every gradient feature is a + b cos theta + c sin theta, so the eNTK of points in one cell has rank 3 (the
    cause of the ill-conditioned eNTK regression in d = 2, experiments/sphere_entk_circle.py)."""
    h = 9
    net = make_net(2, h, 3)
    w = net.weights[0].detach()
    phi = torch.atan2(w[:, 1], w[:, 0])
    kinks = torch.remainder(torch.cat([phi + math.pi / 2, phi - math.pi / 2]), 2 * math.pi).sort().values
    gaps = torch.diff(torch.cat([kinks, kinks[:1] + 2 * math.pi]))
    j = int(gaps.argmax())
    th = kinks[j] + gaps[j] * torch.linspace(0.1, 0.9, 6, dtype=torch.float64)
    u = torch.stack([th.cos(), th.sin()], 1)
    e = torch.linalg.eigvalsh(empirical_ntk(net, u * math.sqrt(2)))
    assert float(e[-3] / e[-1]) > 1e-8 and float(e[-4].abs() / e[-1]) < 1e-13, e


def _load_experiment(name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "experiments", name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_heavy_ball_step_count_of_the_linear_model():
    """experiments/sphere_gd_steps.py: the closed form r(t) = c1 z1^t + c2 z2^t of the scalar heavy-ball recursion
    r(t+1) = (1 + mu - h) r(t) - mu r(t-1), r(0) = 1, r(1) = 1 - h equals the recursion run step by step, for
    complex roots (h > (1 - sqrt(mu))^2) and real ones (the slow modes); steps_needed (first t where the bound
    sum_k p_k (|c1| |z1|^t + |c2| |z2|^t)^2 falls to the target) is at or just above the recursion's first t."""
    m = _load_experiment("sphere_gd_steps")
    mu, target = 0.9, 1e-4
    h = np.array([1.0, 0.3, 1e-2, 1e-4])
    p = np.array([0.5, 0.3, 0.1, 0.01])
    prev, cur, traj = np.ones(4), 1 - h, [np.ones(4), 1 - h]
    for _ in range(20000):
        prev, cur = cur, (1 + mu - h) * cur - mu * prev
        traj.append(cur)
    traj = np.array(traj)
    z1, z2, c1, c2 = m.mode_coeffs(h, mu)
    for t in (0, 1, 5, 50, 500, 5000):
        assert np.allclose(np.real(c1 * z1 ** t + c2 * z2 ** t), traj[t], rtol=1e-9, atol=1e-12), t
        assert abs(m.exact_mse(t, p, h, mu) - float((p * traj[t] ** 2).sum())) < 1e-12
    mse = (p * traj ** 2).sum(1)
    t_sim = int(np.argmax(mse <= target))
    assert mse[t_sim] <= target and 1000 < t_sim < 20000     # the h = 1e-4 mode sets it: ~ (1 - mu) / h ln(..)
    t = m.steps_needed(p, h, mu, target)
    assert t_sim <= t <= 1.05 * t_sim + 2, (t, t_sim)
    assert m.steps_needed(p, h, 0.0, target) > 5 * t        # plain GD: ~1 / (1 - mu) = 10 times slower


def test_exponents():
    assert predicted_exponents(5, 4.0) == {"lazy": 2.0, "feature": 1.75}
    assert predicted_exponents(2, 0.5) == {"lazy": 1.0, "feature": 1.0}
    ns = [32, 64, 128, 256]
    e = np.array([[3.0 * n ** -1.3 for n in ns], [2.0 * n ** -1.3 for n in ns]])
    fit = fit_exponent(ns, e)
    assert abs(fit["beta"] - 1.3) < 1e-12 and fit["beta_err"] < 1e-12
    with pytest.raises(ValueError):
        predicted_exponents(3, 0.0)


def test_learning_curve_script_smoke(tmp_path):
    pytest.importorskip("matplotlib")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    args = [sys.executable, os.path.join(ROOT, "experiments", "sphere_learning_curves.py"),
            "--ds", "2", "3", "--nus", "1.0", "--log2-ns", "3", "5", "--draws", "2", "--m-test", "40",
            "--h", "16", "--steps", "30", "--net-log2-max", "4", "--out", str(tmp_path)]
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads((tmp_path / "sphere_learning_curves.json").read_text())
    for c in out["curves"]:
        for info in c["draws"]:
            assert [s["n"] for s in info["spectral"]] == [8, 32]
            first = info["spectral"][0]
            assert set(first["degree_power_error"]) == {"ntk_inf", "entk", "lazy_net", "feature_net"}
            assert first["k_c"] == (4 if c["d"] == 2 else 2)        # 1 + 2 + 2 + 2 + 2 >= 8; 1 + 3 + 5 >= 8
            for r in info["nets"]:                                  # every run stopped for a recorded reason
                assert r["status"] in ("reached", "max_steps", "max_wall") and r["steps"] <= 30
    r = subprocess.run(args + ["--spectral-only"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]           # reproduces the recorded errors (else it raises)
    again = json.loads((tmp_path / "sphere_learning_curves.json").read_text())
    s0, s1 = out["curves"][0]["draws"][0]["spectral"][1], again["curves"][0]["draws"][0]["spectral"][1]
    assert np.allclose(s0["degree_power_error"]["ntk_inf"], s1["degree_power_error"]["ntk_inf"], rtol=1e-8)
    assert [(c["d"], c["nu_t"]) for c in out["curves"]] == [(2, 1.0), (3, 1.0)]
    for c in out["curves"]:
        assert set(c["fits"]) == {"ntk_inf", "entk", "lazy_net", "feature_net"}
        assert len(c["errors"]["ntk_inf"][0]) == 3 and len(c["errors"]["lazy_net"][0]) == 2
        assert all(np.isfinite(c["fits"][k]["beta"]) for k in c["fits"])
        assert c["predicted"] == predicted_exponents(c["d"], 1.0)
    assert (tmp_path / "sphere_learning_curves.png").stat().st_size > 1000
    md = (tmp_path / "sphere_learning_curves.md").read_text()
    assert "| d | nu_t |" in md and "Target: train mse <= 0.0001 C(1)." in md and "not reached" in md


def test_degree_power_unbiased():
    """unbiased=True is the off-diagonal U-statistic (against a direct sum) and is unbiased for the true degree
    power of a fixed function: f = P_3(x . e) has power 1 / N(3, d) in degree 3 and none elsewhere."""
    d, n, reps = 5, 41, 400
    g = torch.Generator().manual_seed(11)
    e = sample_sphere(1, d, g)[0]
    x = sample_sphere(n, d, g)
    v = gegenbauer(3, d, x @ e)[3]
    P = gegenbauer(4, d, (x @ x.T).clamp(-1, 1))
    off = torch.stack([(P[k] * torch.outer(v, v)).sum() - (P[k].diagonal() * v * v).sum() for k in range(5)])
    N = torch.tensor([float(harmonic_dim(k, d)) for k in range(5)], dtype=torch.float64)
    assert torch.allclose(degree_power(x, v, 4, unbiased=True), N * off / (n * (n - 1)), rtol=1e-10, atol=1e-14)
    est = torch.stack([degree_power(xs, gegenbauer(3, d, xs @ e)[3], 4, unbiased=True)
                       for xs in (sample_sphere(n, d, g) for _ in range(reps))])
    mean, se = est.mean(0), est.std(0) / math.sqrt(reps)
    truth = torch.tensor([0, 0, 0, 1 / harmonic_dim(3, d), 0], dtype=torch.float64)
    assert bool(((mean - truth).abs() < 5 * se + 1e-12).all()), (mean, truth, se)
    biased = degree_power(x, v, 4)          # the plain estimate carries the diagonal N_k / n mean(v^2)
    assert float(biased[2]) > 0.5 * float(N[2]) / n * float((v * v).mean())
    with pytest.raises(ValueError, match="n >= 2"):
        degree_power(x[:1], v[:1], 2, unbiased=True)
