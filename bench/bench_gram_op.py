"""The fused Gram op ``ntk_fast.gram`` (symmetric case) against the plain-torch reference, on given features.

Features are random (n, fan_in) / (n, fan_out) matrices of the paper's net (d=784, L=3): the op's cost does
not depend on their values.  extra_info carries the counted flops, n^2 sum_l (fan_in + fan_out).
"""
import pytest
import torch

import ntk_fast
from ntk_fast.ntk.empirical import fcnet_fans, gram_flops
from ntk_fast.ops.reference import gram_reference

from ntkbench_util import DEVICES, DTYPES, sync

D_IN, L = 784, 3


def _features(n, h, dtype, device):
    g = torch.Generator().manual_seed(0)
    fans = fcnet_fans(D_IN, h, L)
    A = [torch.randn(n, p, generator=g, dtype=dtype).to(device) for p, _ in fans]
    D = [torch.randn(n, q, generator=g, dtype=dtype).to(device) for _, q in fans]
    return fans, A, D


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("h", [256, 1024])
@pytest.mark.parametrize("n", [256, 1024])
@pytest.mark.parametrize("impl", ["op", "reference"])
def test_gram(benchmark, impl, n, h, dtype, device):
    fans, A, D = _features(n, h, DTYPES[dtype], device)
    benchmark.group = f"gram n={n} h={h} {dtype} {device}"
    benchmark.extra_info["flops"] = gram_flops(fans, n)
    if impl == "op":
        fn = lambda: ntk_fast.gram(A, D)                      # noqa: E731
    else:
        fn = lambda: gram_reference(A, D)                     # noqa: E731

    def run():
        K = fn()
        sync(device)
        return K
    K = benchmark(run)
    assert K.shape == (n, n)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_gram_out_panels(benchmark, dtype):
    """The op writing into a preallocated output (the path of empirical_ntk(out=..., block_size=...))."""
    n, h = 1024, 512
    fans, A, D = _features(n, h, DTYPES[dtype], "cpu")
    out = torch.empty(n, n, dtype=DTYPES[dtype])
    benchmark.extra_info["flops"] = gram_flops(fans, n)
    benchmark(lambda: ntk_fast.gram(A, D, out=out))
