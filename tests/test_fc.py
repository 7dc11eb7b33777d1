"""FCNet: normaliser by quadrature, parameterisation, features vs autograd."""
import math

import pytest
import torch

from ntk_fast import FCNet, activation_normaliser


def test_softplus_normaliser_matches_reference_constants():
    # values of the paper's reference code (docs/design.md section 6), exact quadrature
    assert activation_normaliser("softplus", 5.0) == pytest.approx(1.40438, abs=5e-6)
    assert activation_normaliser("softplus", 1.0) == pytest.approx(1.04187, abs=5e-6)
    assert activation_normaliser("softplus", 10.0) == pytest.approx(1.41289, abs=5e-6)
    assert activation_normaliser("relu") == math.sqrt(2.0)
    assert activation_normaliser("softplus", 1e4) == pytest.approx(math.sqrt(2.0), rel=1e-3)


@pytest.mark.parametrize("activation", ["softplus", "relu", "tanh"])
def test_unit_second_moment(activation):
    g = torch.Generator().manual_seed(0)
    net = FCNet(3, 4, 1, activation=activation, dtype=torch.float64)
    z = torch.randn(2_000_000, generator=g, dtype=torch.float64)
    assert net.sigma(z).pow(2).mean().item() == pytest.approx(1.0, abs=5e-3)


def test_forward_formula(gen):
    net = FCNet(5, 7, 2, k=2, dtype=torch.float64, generator=gen)
    x = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    W = [w.detach() for w in net.weights]
    a = x / math.sqrt(5)
    for l in range(2):
        a = net.sigma(a @ W[l].T) / math.sqrt(7)
    assert torch.allclose(net(x), a @ W[2].T, rtol=1e-14, atol=0)
    assert FCNet(5, 7, 2, dtype=torch.float64)(x).shape == (4,)


def test_features_give_gradients(gen):
    """df/dW_l = D_l^T A_l per point (checked on the batch sum)."""
    net = FCNet(6, 8, 3, bias=0.2, dtype=torch.float64, generator=gen)
    x = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    A, D = net.features(x)
    net(x).sum().backward()
    for l in range(4):
        assert torch.allclose(net.weights[l].grad, D[l].T @ A[l][:, :-1], rtol=1e-12, atol=1e-14)
        assert torch.allclose(net.biases[l].grad, 0.2 * D[l].sum(0), rtol=1e-12, atol=1e-14)


def test_generator_reproducible():
    a = FCNet(4, 6, 2, generator=torch.Generator().manual_seed(7))
    b = FCNet(4, 6, 2, generator=torch.Generator().manual_seed(7))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_bad_arguments():
    with pytest.raises(ValueError, match="h must be a positive int"):
        FCNet(4, 0, 2)
    with pytest.raises(ValueError, match="activation must be one of"):
        FCNet(4, 5, 2, activation="swish")


@pytest.mark.parametrize("activation", ["softplus", "relu", "tanh"])
def test_functional_net_over_weight_stacks(gen, activation):
    """fc_forward / fc_features / fc_backward over (K, out, in) stacks equal K separate FCNets; fc_backward equals
    autograd; the fused activation (the trainer's) equals the plain one to rounding."""
    from ntk_fast.models.fc import fc_activation, fc_backward, fc_features, fc_forward
    K, d, h, L, n = 3, 5, 9, 3, 7
    nets = [FCNet(d, h, L, activation=activation, dtype=torch.float64, generator=gen) for _ in range(K)]
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    Ws = [torch.stack([m.weights[l].detach() for m in nets]) for l in range(L + 1)]
    a0 = x / math.sqrt(d)
    act = fc_activation(activation, 5.0, h)
    out, acts, ss = fc_forward(Ws, a0, act, keep=True)
    assert out.shape == (K, n, 1) and len(acts) == L + 1 and len(ss) == L
    fused, _, _ = fc_forward(Ws, a0, fc_activation(activation, 5.0, h, fused=True))
    torch.testing.assert_close(fused, out, rtol=1e-13, atol=1e-15)
    A, D = fc_features(Ws, a0, act)
    r = torch.randn(K, n, generator=gen, dtype=torch.float64)
    G = [torch.empty_like(W) for W in Ws]
    fc_backward(Ws, acts, ss, r, G)
    for k, m in enumerate(nets):
        torch.testing.assert_close(out[k, :, 0], m(x), rtol=1e-13, atol=1e-15)
        Ak, Dk = m.features(x)
        for l in range(L + 1):
            torch.testing.assert_close(A[l][k], Ak[l], rtol=1e-13, atol=1e-15)
            torch.testing.assert_close(D[l][k], Dk[l], rtol=1e-13, atol=1e-15)
        (m(x) * r[k]).sum().backward()
        for l in range(L + 1):
            torch.testing.assert_close(G[l][k], m.weights[l].grad, rtol=1e-12, atol=1e-14)
