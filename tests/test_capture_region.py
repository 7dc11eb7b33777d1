"""The trainer's captured region (FlowEngine._attempt_ops, what the CUDA-graph attempt captures) run on the CPU
under ntk_fast.testing.NoHostSync: no op in it may force a host synchronisation or a data-dependent shape,
with the compiled ops and with their torch references (what a failed first-use self-check switches to).
Also the mode itself: what it refuses and lets through, and that an ``.item()`` slipped into the region fails."""
import numpy as np
import pytest
import torch

from ntk_fast.dynamics.engine import FlowEngine
from ntk_fast.models.fc import FCNet
from ntk_fast.ops import _loader
from ntk_fast.ops import flow as flow_ops
from ntk_fast.testing import HostSyncError, NoHostSync


@pytest.fixture
def restore_ops():
    disabled, warned = dict(_loader._disabled), set(_loader._warned)
    yield
    _loader._disabled.clear()
    _loader._disabled.update(disabled)
    _loader._warned.clear()
    _loader._warned.update(warned)


def _engine(K: int, tau: float, loss: str, dtype=torch.float64, bias: bool = False) -> FlowEngine:
    gen = torch.Generator().manual_seed(3)
    n, d = 13, 7
    x = torch.randn(n, d, generator=gen, dtype=dtype)
    y = torch.where(torch.randn(n, generator=gen) > 0, 1.0, -1.0).to(dtype)
    if loss == "mse":
        y = torch.randn(n, generator=gen, dtype=dtype)
    nets = [FCNet(d, 9, 2, dtype=dtype, generator=torch.Generator().manual_seed(10 + k)) for k in range(K)]
    eng = FlowEngine(nets, x, y, 2.0, loss, 20.0, tau, use_graph=False)
    eng.init_state()
    eng.dt.fill_(0.05)
    return eng


CASES = [(1, 0.0, "softhinge", torch.float64), (3, 0.4, "qhinge", torch.float64), (2, 0.0, "mse", torch.float32),
         (1, 0.7, "hinge", torch.float32)]


@pytest.mark.parametrize("reference", [False, True], ids=["native", "reference"])
@pytest.mark.parametrize("K,tau,loss,dtype", CASES)
def test_attempt_region_has_no_host_sync(K, tau, loss, dtype, reference, restore_ops):
    eng = _engine(K, tau, loss, dtype)
    if reference:
        for op in ("flow_step", "flow_grad_stats", "flow_loss", "softplus_act"):
            _loader.disable(op, "test: the region on the torch references")
            _loader._warned.add(op)              # no fallback warning in this test
    elif not _loader.native("flow_step"):
        pytest.skip("extension not built")
    pb, pt = eng.base, 1 - eng.base
    with NoHostSync() as mode:
        eng._attempt_ops(pb, pt)
        eng._attempt_ops(pt, pb)                 # the other parity's graph
    assert any("addmm" in s or "mm" in s or "bmm" in s for s in mode.seen)   # the region really ran
    # And it computed the attempt: the report matches an eager run of the same attempt.
    rep = eng.report[pb].clone()
    eng._attempt_ops(pt, pb)
    torch.testing.assert_close(eng.report[pb], rep, rtol=0, atol=0)
    assert torch.isfinite(rep).all()


def test_an_item_in_the_region_is_caught(monkeypatch):
    """The guard can fail: a host read slipped into the region (here into flow_grad_stats) raises."""
    eng = _engine(2, 0.0, "softhinge")
    real = flow_ops.flow_grad_stats

    def with_item(g, gp):
        st = real(g, gp)
        if st[0, 0].item() < 0:                  # a host read: a sync on the GPU, illegal in capture
            raise AssertionError
        return st
    monkeypatch.setattr(flow_ops, "flow_grad_stats", with_item)
    with pytest.raises(HostSyncError, match="_local_scalar_dense"):
        with NoHostSync():
            eng._attempt_ops(0, 1)


def _refused(fn) -> str:
    with pytest.raises(HostSyncError) as info:
        with NoHostSync():
            fn()
    return str(info.value)


def test_mode_refuses_syncs_and_dynamic_shapes():
    t = torch.randn(6, dtype=torch.float64)
    assert "_local_scalar_dense" in _refused(lambda: t[0].item())
    assert "_local_scalar_dense" in _refused(lambda: float(t.sum()))
    assert "_local_scalar_dense" in _refused(lambda: bool((t > 0).any()))
    assert "nonzero" in _refused(lambda: torch.nonzero(t))
    assert "depends on the data" in _refused(lambda: t[t > 0])
    assert "depends on the data" in _refused(lambda: torch.unique(t))
    assert "host data" in _refused(lambda: torch.tensor([1.0, 2.0]))
    assert "host data" in _refused(lambda: t.copy_(torch.from_numpy(np.ones(6))))
    assert "copies to the host" in _refused(lambda: t.to("cpu", copy=True))


def test_mode_lets_capturable_ops_through():
    t = torch.randn(5, 3, dtype=torch.float64)
    with NoHostSync() as mode:
        u = torch.empty(5, 5, dtype=torch.float64)          # allocation: legal in capture (the graph's pool)
        torch.mm(t, t.T, out=u)
        v = (u.sum(1) > 0).to(t.dtype) * torch.where(u > 0, u, 0.0).amax(1)
        w = t.to(torch.float32)                             # a dtype conversion on the same device
        t[3:5].copy_(t[0:2])
    assert v.shape == (5,) and w.dtype == torch.float32 and "aten.mm.out" in mode.seen
    with NoHostSync(allow={"aten.nonzero.default"}):
        torch.nonzero(t)
