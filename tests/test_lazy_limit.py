"""The lazy limit: at large alpha sqrt(h) the trained network's test outputs follow the frozen-kernel
solver run with the NTK at initialisation, and the gap shrinks as alpha grows; at small alpha it does not."""
import math

import pytest
import torch

import ntk_fast


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny problems: OpenMP hand-offs between threads would dominate (and vary with the machine's load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(1)
    d, n, m = 8, 40, 60
    x = torch.randn(n + m, d, generator=g, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True) * math.sqrt(d)
    teacher = torch.randn(d, generator=g, dtype=torch.float64)
    y = torch.sign(x @ teacher + 0.5 * torch.sin(3 * x[:, 0]))
    return x[:n], y[:n], x[n:], y[n:]


def gap(problem, alpha, h=64, L=2):
    x, y, xt, yt = problem
    net = ntk_fast.FCNet(x.shape[1], h, L, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    kern = ntk_fast.frozen_kernel_run(net, x, y, xt, yt, progress=False)      # Theta at initialisation
    res = ntk_fast.train(net, x, y, alpha, x_test=xt, y_test=yt, progress=False, kernel_points=0)
    assert res.status == "converged"
    f_net = res.outputs["test"][0]
    f_ker = kern.F_test[0]
    return ((f_net - f_ker).norm() / f_ker.norm()).item()


def test_trainer_approaches_frozen_kernel_as_alpha_grows(problem):
    h = 64
    gaps = {a: gap(problem, a / math.sqrt(h), h) for a in (1.0, 30.0, 1000.0)}   # keys: alpha sqrt(h)
    print(gaps)
    assert gaps[1000.0] < 0.03                      # within a few percent deep in the lazy regime
    assert gaps[1000.0] < gaps[30.0] / 5            # and the gap shrinks as alpha grows (about 1/alpha)
    assert gaps[1.0] > 0.2                          # at alpha sqrt(h) ~ 1 the kernel moves: no agreement
