"""Training dynamics: the trainer's fused step and activation ops, one training run, the frozen-kernel step op, one kernel run.

Every case calls the package's API directly (ntk_fast.ops.flow, ntk_fast.ops.kernel_flow, ntk_fast.dynamics):
a change of that API fails them, as it should.
"""
import math

import pytest
import torch

import ntk_fast
from ntk_fast.ntk.empirical import fcnet_fans

from ntkbench_util import DEVICES, DTYPES, paper_inputs, paper_net, sync

D_IN, L = 784, 3


def _labels(n, device, dtype):
    g = torch.Generator().manual_seed(3)
    return (torch.randint(0, 2, (n,), generator=g) * 2 - 1).to(dtype=dtype, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("h", [256, 1024])
@pytest.mark.parametrize("K", [1, 8])
def test_flow_step(benchmark, K, h, dtype, device):
    """One trial step w' = w - dt g of K nets with P = d h + (L-1) h^2 + h weights each (one memory pass)."""
    from ntk_fast.ops import flow as ops
    dt_ = DTYPES[dtype]
    P = sum(p * q for p, q in fcnet_fans(D_IN, h, L))
    w = torch.randn(K, P, dtype=dt_, device=device)
    g = torch.randn(K, P, dtype=dt_, device=device)
    out = torch.empty_like(w)
    dt = torch.full((K,), 0.1, dtype=dt_, device=device)
    benchmark.group = f"flow_step K={K} h={h} {dtype} {device}"
    benchmark.extra_info["bytes"] = 3 * K * P * w.element_size()

    def run():
        ops.flow_step(w, g, dt, w_out=out)
        sync(device)
    benchmark(run)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("impl", ["softplus_act", "torch ops"])
def test_softplus_act(benchmark, impl, dtype, device):
    """A hidden layer's activation, a = sigma(z)/sqrt(h) and s = sigma'(z)/sqrt(h), on (n, h) = (2000, 1000):
    the fused op (one pass) against the torch ops it replaced (softplus, sigmoid and three scalings)."""
    from ntk_fast.ops.flow import softplus_act
    dt_ = DTYPES[dtype]
    z0 = torch.randn(2000, 1000, dtype=dt_, device=device)
    z, s = torch.empty_like(z0), torch.empty_like(z0)
    beta, c = 5.0, 1.40438 / math.sqrt(1000)
    benchmark.group = f"softplus layer 2000x1000 {dtype} {device}"
    benchmark.extra_info["elements"] = z0.numel()

    def run():
        z.copy_(z0)
        if impl == "softplus_act":
            softplus_act(z, s, beta, c)
        else:
            torch.nn.functional.softplus(z, beta=beta, threshold=20.0).mul_(c)
            torch.mul(z, beta).sigmoid_().mul_(c)
        sync(device)
    benchmark(run)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("n", [1024, 4096])
@pytest.mark.parametrize("E", [1, 8])
def test_kernel_flow_step(benchmark, E, n, dtype, device):
    """One attempt of the frozen-kernel flow on E problems: one read of the upper half of Theta (n x n)."""
    from ntk_fast.ops.kernel_flow import kernel_flow_step
    dt_ = DTYPES[dtype]
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, 64, generator=g, dtype=dt_)
    theta = (X @ X.T / 64).to(device)
    y = _labels(n, device, dt_).expand(E, n).contiguous()
    f = torch.zeros(E, n, dtype=dt_, device=device)
    r = torch.zeros_like(f)
    gr = torch.zeros_like(f)
    c = torch.zeros_like(f)
    dt = torch.full((E,), 0.1, dtype=dt_, device=device)
    active = torch.ones(E, dtype=torch.bool, device=device)
    benchmark.group = f"kernel_flow_step E={E} n={n} {dtype} {device}"
    benchmark.extra_info["flops"] = 2.0 * E * n * n
    benchmark.extra_info["bytes_theta_half"] = n * (n + 1) / 2 * theta.element_size()

    def run():
        res = kernel_flow_step(theta, y, f, gr, r, c, dt, active)
        sync(device)
        return res
    benchmark(run)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("h", [128, 512])
def test_training_run(benchmark, h, dtype):
    """A short training run of the paper's net by the trainer (n=256, 25 accepted steps, soft hinge)."""
    from ntk_fast.dynamics.trainer import train
    n, dt_ = 256, DTYPES[dtype]
    x = paper_inputs(n, D_IN, dt_, "cpu")
    y = _labels(n, "cpu", dt_)
    alpha = 1.0 / math.sqrt(h)
    benchmark.group = f"training n={n} h={h} {dtype}"

    def setup():
        return (paper_net(D_IN, h, L, dt_, "cpu"), x, y, alpha), {}

    def run(net, x, y, alpha):
        return train(net, x, y, alpha, max_steps=25, progress=False, kernel_points=0)
    benchmark.pedantic(run, setup=setup, rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("n", [512, 2048])
def test_kernel_run(benchmark, n, dtype):
    """A frozen-kernel run by the solver (ntk_fast.dynamics.solver) on the Gram of the paper's net, bounded steps."""
    from ntk_fast.dynamics.solver import kernel_flow
    dt_ = DTYPES[dtype]
    x = paper_inputs(n, D_IN, dt_, "cpu")
    y = _labels(n, "cpu", dt_)
    theta = ntk_fast.empirical_ntk(paper_net(D_IN, 256, L, dt_, "cpu"), x)
    benchmark.group = f"kernel run n={n} {dtype}"
    benchmark.pedantic(lambda: kernel_flow(theta, y, max_steps=200, progress=False),
                       rounds=3, warmup_rounds=1)
