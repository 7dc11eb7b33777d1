"""CUDA kernels of the trainer and the solver against their references and the CPU path (marked ``cuda``).

flow_step, flow_grad_stats, flow_loss, softplus_act and kernel_flow_step on the GPU against the pure-torch
references in float64 (and float32 where the trainer uses it), then the trainer (with and without the CUDA
graph) and the frozen-kernel solver on the GPU against the same runs on the CPU.  Skipped without a GPU;
``bash bench/gpu_all.sh OUTDIR`` runs them.  ``NTK_FAST_CUDA_TESTS_ON_CPU=1`` runs the same code on the CPU
(to check the tests themselves on a machine without a GPU).
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from ntk_fast.ops import flow as ops
from ntk_fast.ops import kernel_flow as _kernel_ops
from ntk_fast.ops import reference as ref
from ntk_fast.ops._loader import native
from ntk_fast.models.fc import FCNet
from ntk_fast.dynamics.trainer import train
from ntk_fast.dynamics.solver import kernel_flow
from ntk_fast.ops.reference import kernel_flow_step_ref
from ntk_fast.ops.packed import pack_symmetric

DEV = "cpu" if os.environ.get("NTK_FAST_CUDA_TESTS_ON_CPU") else "cuda"
pytestmark = ([pytest.mark.cuda] if DEV == "cuda" else []) + [
    pytest.mark.skipif(not native("flow_step"), reason="extension not built")]
D = torch.float64


def rnd(*shape, seed, dtype=D):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("K,P", [(1, 1), (3, 12347), (2, 40001)])
@pytest.mark.parametrize("tau", [0.0, 0.37])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_flow_step_and_stats(K, P, tau, dtype):
    w, g, v = (rnd(K, P, seed=s, dtype=dtype) for s in (1, 2, 3))
    dt = torch.rand(K, generator=torch.Generator().manual_seed(4), dtype=dtype)
    w_ref, v_ref = torch.empty_like(w), torch.empty_like(w)
    ref.flow_step(w, g, v, dt, tau, w_ref, v_ref)
    wo, vo = ops.flow_step(w.to(DEV), g.to(DEV), dt.to(DEV), tau, v.to(DEV) if tau > 0 else None)
    tol = dict(rtol=1e-14, atol=1e-14) if dtype == D else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(wo.cpu(), w_ref, **tol)
    if tau > 0:
        torch.testing.assert_close(vo.cpu(), v_ref, **tol)
    st = ops.flow_grad_stats(g.to(DEV), w.to(DEV))
    assert st.dtype == D and st.device.type == DEV
    torch.testing.assert_close(st.cpu(), ref.flow_grad_stats(g, w), rtol=1e-12 if dtype == D else 1e-5, atol=0.0)


@pytest.mark.parametrize("K,n", [(1, 1), (1, 2049), (3, 4097)])
@pytest.mark.parametrize("loss", ["softhinge", "qhinge"])
def test_flow_loss(K, n, loss):
    f, f0, Fp = rnd(K, n, seed=5), rnd(K, n, seed=6), rnd(K, n, seed=7)
    y = torch.where(rnd(n, seed=8) > 0, 1.0, -1.0).to(D)
    want = ref.flow_loss(f, f0, y, Fp, 0.7, 20.0, loss)
    got = ops.flow_loss(f.to(DEV), f0.to(DEV), y.to(DEV), Fp.to(DEV), 0.7, 20.0, loss)
    for a, b, name in zip(got, want, ("F", "r", "loss", "nd", "dout")):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-12, atol=1e-14, msg=name)


@pytest.mark.parametrize("shape", [(1,), (2000, 100), (3, 17, 33)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_softplus_act(shape, dtype):
    z = (rnd(*shape, seed=9) * 4).to(dtype)
    flat = z.view(-1)
    flat[: min(4, flat.numel())] = torch.tensor([0.0, 200.0, -200.0, 30.0], dtype=dtype)[: min(4, flat.numel())]
    a, s = z.to(DEV, copy=True), torch.empty(shape, dtype=dtype, device=DEV)
    ops.softplus_act(a, s, 5.0, 0.3)
    ra, rs = z.double().clone(), torch.empty(shape, dtype=D)
    ref.softplus_act(ra, rs, 5.0, 0.3)
    tol = dict(rtol=1e-14, atol=1e-300) if dtype == D else dict(rtol=2e-5, atol=1e-30)  # fast-math exp in float32
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a.cpu().double(), ra, **tol)
    torch.testing.assert_close(s.cpu().double(), rs, **tol)


@pytest.mark.parametrize("E,n,per_problem,pb,loss", [
    (1, 1, False, 0, "softhinge"), (3, 301, False, 0, "qhinge"), (5, 130, True, 0, "mse"),
    (3, 301, False, 64, "softhinge"), (2, 77, True, 64, "softhinge"), (17, 93, False, 64, "qhinge")])
def test_kernel_flow_step(E, n, per_problem, pb, loss):
    A = rnd(*((E, n, n + 3) if per_problem else (n, n + 3)), seed=n)
    K = A @ A.mT / n
    theta = pack_symmetric(K, pb) if pb else K
    g = torch.Generator().manual_seed(E + n)
    y = torch.randint(0, 2, (E, n), generator=g).to(D) * 2 - 1
    f, gg, r, c = (rnd(E, n, seed=s) for s in (11, 12, 13, 14))
    dt = torch.rand(E, generator=g, dtype=D)
    active = torch.rand(E, generator=g) < 0.7
    active[0] = True
    want = kernel_flow_step_ref(theta, y, f, gg, r, c, dt, active, loss, 20.0, pb)
    args = [t.to(DEV) for t in (theta, y, f, gg, r, c, dt, active)]
    got = _kernel_ops.kernel_flow_step(*args, loss=loss, beta=20.0, packed_block=pb)
    for a, b, name in zip(got, want, ("f", "r", "g", "c", "stats")):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-12, atol=1e-13, msg=name)


def _problem(n=48, d=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=D)
    x = x * math.sqrt(d) / x.norm(dim=1, keepdim=True)
    y = torch.where(x[:, 0] + 0.3 * x[:, 1] > 0, 1.0, -1.0).to(D)
    return x, y


@pytest.mark.parametrize("graph", [True, False])
@pytest.mark.parametrize("K", [1, 3])
def test_trainer_on_gpu_matches_cpu(graph, K):
    x, y = _problem()
    nets = [FCNet(10, 16, 2, dtype=D, generator=torch.Generator().manual_seed(20 + k)) for k in range(K)]
    cpu = train(nets if K > 1 else nets[0], x, y, 1.0, max_steps=40, progress=False, kernel_points=0)
    gnets = [FCNet(10, 16, 2, dtype=D, device=DEV, generator=torch.Generator().manual_seed(20 + k))
             for k in range(K)]
    gpu = train(gnets if K > 1 else gnets[0], x.to(DEV), y.to(DEV), 1.0, max_steps=40, progress=False,
                kernel_points=0, use_cuda_graph=graph)
    assert gpu.statuses == cpu.statuses
    for k in range(K):
        assert gpu.final[k]["attempts"] == cpu.final[k]["attempts"]
        for a, b in zip(gpu.nets[k].weights, cpu.nets[k].weights):
            torch.testing.assert_close(a.detach().cpu(), b.detach(), rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(gpu.outputs["train"].cpu(), cpu.outputs["train"], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("packed", [False, True])
def test_solver_on_gpu_matches_cpu(packed):
    x, y = _problem(120, seed=3)
    K = torch.exp(-torch.cdist(x, x) ** 2 / 20)
    cpu = kernel_flow(K, y, progress=False, max_steps=300)
    gpu = kernel_flow(K.to(DEV), y.to(DEV), progress=False, max_steps=300, packed=packed,
                      block=64 if packed else None)
    assert gpu.statuses == cpu.statuses and int(gpu.steps[0]) == int(cpu.steps[0])
    torch.testing.assert_close(gpu.F_train.cpu(), cpu.F_train, rtol=1e-9, atol=1e-10)


# ------------------------------------------------------------------ issue 17: device ties and argument checks
@pytest.mark.skipif(DEV != "cuda" or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_trainer_graph_on_second_device():
    """Nets on cuda:1 while cuda:0 is current, after a graph run on cuda:0 in the same process: the captured
    attempt must be the one of cuda:1's engine (same trajectory as without the graph)."""
    x, y = _problem()
    torch.cuda.set_device(0)

    def run(dev, graph):
        net = FCNet(10, 16, 2, dtype=D, device=dev, generator=torch.Generator().manual_seed(7))
        return train(net, x.to(dev), y.to(dev), 1.0, max_steps=30, progress=False, kernel_points=0,
                     use_cuda_graph=graph)
    run("cuda:0", True)
    with_graph, without = run("cuda:1", True), run("cuda:1", False)
    assert torch.cuda.current_device() == 0
    assert with_graph.final[0]["attempts"] == without.final[0]["attempts"]
    for a, b in zip(with_graph.nets[0].weights, without.nets[0].weights):
        assert a.device == torch.device("cuda:1")
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.skipif(DEV != "cuda", reason="CUDA kernel argument checks")
def test_cuda_kernels_reject_host_tensors():
    """A raw op call with CPU tensors and one (empty) CUDA tensor reaches the CUDA kernel: it must refuse."""
    w, g = rnd(2, 5, seed=1), rnd(2, 5, seed=2)
    dt = torch.ones(2, dtype=D)
    with pytest.raises(RuntimeError, match="w must be on a CUDA device"):
        torch.ops.ntk_fast.flow_step(w, g, torch.empty(0, dtype=D, device="cuda"), dt, 0.0,
                                     torch.empty_like(w), torch.empty(0, dtype=D, device="cuda"))


@pytest.mark.skipif(DEV != "cuda", reason="CUDA kernel argument checks")
def test_kernel_flow_step_cuda_block_and_float32_loss_mean():
    n = 130
    th = rnd(n, n, seed=1)
    th = (th @ th.T / n).float()
    y = torch.where(rnd(1, n, seed=2) > 0, 1.0, -1.0).float()
    f, g, r, c = (rnd(1, n, seed=s).float() for s in (3, 4, 5, 6))
    dt, active = torch.full((1,), 0.1), torch.ones(1, dtype=torch.bool)
    args = [t.to(DEV) for t in (th, y, f, g, r, c, dt, active)]
    with pytest.raises(RuntimeError, match="block must be >= 0"):
        torch.ops.ntk_fast.kernel_flow_step(*args, "softhinge", 20.0, 0, -1)
    got = torch.ops.ntk_fast.kernel_flow_step(*args, "softhinge", 20.0, 0, 0)[4].cpu()
    want = torch.ops.ntk_fast.kernel_flow_step(th, y, f, g, r, c, dt, active, "softhinge", 20.0, 0, 0)[4]
    # stats[5] = mean l(u'): evaluated and summed in float64 on both devices from the same float32 u'.
    torch.testing.assert_close(got[:, 5], want[:, 5], rtol=1e-6, atol=0.0)


# ------------------------------------------------------------------ issue 17: float32, momentum, resume, packing
def _normwise(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("n,pb", [(64, 0), (128, 0), (128, 64), (192, 64), (40, 64), (1, 64), (40, 0)])
@pytest.mark.parametrize("per_problem", [False, True])
def test_kernel_flow_step_float32(n, pb, per_problem):
    """float32 on the device against the float64 reference of the same (rounded) inputs: n a multiple of the
    64 tile (no partial tile) and n < 64 (one partial packed tile)."""
    E = 3
    A = rnd(*((E, n, n + 5) if per_problem else (n, n + 5)), seed=n + 1)
    K = A @ A.mT / n
    theta = (pack_symmetric(K, pb) if pb else K).float()
    g = torch.Generator().manual_seed(n)
    y = (torch.randint(0, 2, (E, n), generator=g) * 2 - 1).float()
    f, gg, r, c = (rnd(E, n, seed=s).float() for s in (21, 22, 23, 24))
    dt = torch.rand(E, generator=g).float()
    active = torch.tensor([True, False, True])
    want = kernel_flow_step_ref(*(t.double() if t.is_floating_point() else t
                                  for t in (theta, y, f, gg, r, c, dt, active)), "softhinge", 20.0, pb)
    args = [t.to(DEV) for t in (theta, y, f, gg, r, c, dt, active)]
    got = _kernel_ops.kernel_flow_step(*args, loss="softhinge", beta=20.0, packed_block=pb)
    for a, b, name in zip(got, want, ("f", "r", "g", "c", "stats")):
        assert a.dtype == (torch.float64 if name == "stats" else torch.float32), name
        assert _normwise(a, b) <= 2e-5, name


def _train32(dev, graph, tau, max_steps, **kw):
    x, y = _problem(40, seed=5)
    nets = [FCNet(10, 24, 2, dtype=torch.float32, device=dev, generator=torch.Generator().manual_seed(30 + k))
            for k in range(2)]
    return train(nets, x.float().to(dev), y.float().to(dev), 1.0, tau=tau, max_steps=max_steps, progress=False,
                 kernel_points=0, use_cuda_graph=graph, **kw)


@pytest.mark.parametrize("tau", [0.0, 0.5])
def test_trainer_float32_graph_matches_eager(tau):
    """float32 nets (with momentum when tau > 0): the captured attempt gives the eager attempt's trajectory."""
    with_graph, eager = _train32(DEV, True, tau, 60), _train32(DEV, False, tau, 60)
    assert with_graph.statuses == eager.statuses
    for k in range(2):
        assert with_graph.final[k]["attempts"] == eager.final[k]["attempts"]
        for a, b in zip(with_graph.nets[k].weights, eager.nets[k].weights):
            assert a.dtype == torch.float32
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_trainer_float32_resume_recaptures(tmp_path):
    """A float32 momentum run stopped and resumed (the engine's graphs are captured again after load_state)
    continues the uninterrupted run: same attempts, same weights."""
    full = _train32(DEV, True, 0.5, 60)
    ck = tmp_path / "t.ckpt"
    _train32(DEV, True, 0.5, 25, checkpoint=ck)
    resumed = _train32(DEV, True, 0.5, 60, resume=ck)
    assert resumed.statuses == full.statuses
    for k in range(2):
        assert resumed.final[k]["attempts"] == full.final[k]["attempts"]
        for a, b in zip(resumed.nets[k].weights, full.nets[k].weights):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
