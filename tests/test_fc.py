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
