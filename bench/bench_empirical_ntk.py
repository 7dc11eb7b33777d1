"""End to end: ``ntk_fast.empirical_ntk`` of the paper's net (d=784, L=3, softplus beta=5, no bias) from x,
i.e. one forward + one backward pass for the features and the fused Gram, against the plain-torch structured
reference (same features, per-layer Grams) and, at small n, the torch.func Jacobian path.
"""
import pytest
import torch

import ntk_fast
from ntk_fast.ntk.empirical import fcnet_fans, gram_flops
from ntk_fast.ops.reference import gram_reference

from ntkbench_util import DEVICES, DTYPES, paper_inputs, paper_net, sync

D_IN, L = 784, 3


def _flops(n, h):
    fans = fcnet_fans(D_IN, h, L)
    P = sum(p * q for p, q in fans)
    return gram_flops(fans, n) + 2 * n * P + 2 * n * (P - D_IN * h)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("h", [256, 1024])
@pytest.mark.parametrize("n", [256, 1024])
@pytest.mark.parametrize("impl", ["ntk_fast", "reference"])
def test_empirical_ntk(benchmark, impl, n, h, dtype, device):
    net = paper_net(D_IN, h, L, DTYPES[dtype], device)
    x = paper_inputs(n, D_IN, DTYPES[dtype], device)
    benchmark.group = f"empirical_ntk n={n} h={h} {dtype} {device}"
    benchmark.extra_info["flops"] = _flops(n, h)

    def run():
        if impl == "ntk_fast":
            K = ntk_fast.empirical_ntk(net, x)
        else:
            A, D = net.features(x)
            K = gram_reference(A, D)
        sync(device)
        return K
    K = benchmark(run)
    assert K.shape == (n, n)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_empirical_ntk_jacobian_path(benchmark, dtype):
    """The generic torch.func path (method='jacobian') at a small size, for scale."""
    n, h = 64, 256
    net = paper_net(D_IN, h, L, DTYPES[dtype], "cpu")
    x = paper_inputs(n, D_IN, DTYPES[dtype], "cpu")
    benchmark.group = f"empirical_ntk n={n} h={h} {dtype} cpu (jacobian)"
    K = benchmark.pedantic(lambda: ntk_fast.empirical_ntk(net, x, method="jacobian"), rounds=2, warmup_rounds=0)
    assert K.shape == (n, n)
