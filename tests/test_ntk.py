"""empirical_ntk: structured path vs torch.func Jacobians (float64), modes, blocking, bad input, fallback."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

import ntk_fast
from ntk_fast.ops.reference import jacobian_ntk_reference

f64 = torch.float64


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def trace(K):
    return torch.diagonal(K, dim1=2, dim2=3).sum(-1)


@pytest.mark.parametrize("activation", ["softplus", "relu", "tanh"])
@pytest.mark.parametrize("k,bias,L", [(1, False, 1), (1, 0.3, 3), (3, False, 2), (2, 1.0, 4)])
def test_fcnet_structured_matches_torch_func(activation, k, bias, L, gen):
    net = ntk_fast.FCNet(6, 9, L, k=k, activation=activation, bias=bias, dtype=f64, generator=gen)
    if net.biases is not None:
        with torch.no_grad():
            for b in net.biases:
                b.normal_(generator=gen)
    x1 = torch.randn(11, 6, generator=gen, dtype=f64)
    x2 = torch.randn(5, 6, generator=gen, dtype=f64)
    for xb in (None, x2):
        ref = jacobian_ntk_reference(net, x1, xb)
        full = ntk_fast.empirical_ntk(net, x1, xb)
        if k == 1:
            assert full.shape == (11, 11 if xb is None else 5)
            assert rel(full, ref[:, :, 0, 0]) <= 1e-10
        else:
            assert full.shape == (11, 11 if xb is None else 5, k, k)
            assert rel(full, ref) <= 1e-10
        assert rel(ntk_fast.empirical_ntk(net, x1, xb, mode="trace"), trace(ref)) <= 1e-10
    diag = ntk_fast.empirical_ntk(net, x1, mode="diagonal")
    assert diag.shape == (11,)
    assert rel(diag, torch.diagonal(trace(jacobian_ntk_reference(net, x1)))) <= 1e-10


def _inplace(cls):
    def make():
        return cls(inplace=True)
    make.__name__ = f"{cls.__name__}(inplace=True)"
    return make


ACTS = [nn.ReLU, nn.Softplus, nn.Tanh, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Identity, nn.LeakyReLU, nn.ELU,
        _inplace(nn.ReLU), _inplace(nn.ELU)]


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("bias", [True, False])
def test_sequential_structured_matches_torch_func(act, bias, gen):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    net = nn.Sequential(nn.Linear(5, 8, bias=bias), act(), nn.Linear(8, 7, bias=bias), act(),
                        nn.Linear(7, 2, bias=bias)).to(f64)
    assert ntk_fast.supports_structured(net)
    x1 = torch.randn(10, 5, generator=gen, dtype=f64)
    x2 = torch.randn(3, 5, generator=gen, dtype=f64)
    for xb in (None, x2):
        ref = jacobian_ntk_reference(net, x1, xb)
        assert rel(ntk_fast.empirical_ntk(net, x1, xb, method="structured"), ref) <= 1e-10
        assert rel(ntk_fast.empirical_ntk(net, x1, xb, mode="trace"), trace(ref)) <= 1e-10
        assert rel(ntk_fast.empirical_ntk(net, x1, xb, method="jacobian", block_size=4), ref) <= 1e-10


def test_sequential_frozen_first_layer_and_trailing_activation(gen):
    """The Sequential path back-propagates through frozen Linear layers and activations after the last Linear."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.ELU(inplace=True), nn.Linear(5, 3),
                        nn.Tanh()).to(f64)
    net[0].requires_grad_(False)
    net[2].weight.requires_grad_(False)
    x = torch.randn(9, 4, generator=gen, dtype=f64)
    assert rel(ntk_fast.empirical_ntk(net, x, method="structured"), jacobian_ntk_reference(net, x)) <= 1e-10


@pytest.mark.parametrize("layers,factored", [
    (lambda k: [nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 9), nn.Softplus(), nn.Tanh(), nn.Linear(9, k)], 2),
    (lambda k: [nn.Linear(5, 8), nn.ELU(inplace=True), nn.Linear(8, 9, bias=False), nn.Linear(9, k)], 2),
    (lambda k: [nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, k, bias=False)], 0),
    (lambda k: [nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 9), nn.Tanh(), nn.Linear(9, k), nn.Sigmoid()], None),
])
@pytest.mark.parametrize("frozen_readout", [False, True])
def test_sequential_full_mode_factored_readout(layers, factored, frozen_readout, gen):
    """mode="full", k = 7: the Linear below a linear readout is captured as Factored(s, w) (D = s o w) and the
    gram_full op forms its k(k+1)/2 symmetric pairs; equal to torch.func, x2 given or not, in row blocks too."""
    from ntk_fast.ntk.anymodel import Factored
    from ntk_fast.ntk.empirical import structured_features
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    net = nn.Sequential(*layers(7)).to(f64)
    if frozen_readout:
        net[len(net) - 1 - (factored is None)].requires_grad_(False)
    x1 = torch.randn(23, 5, generator=gen, dtype=f64)
    x2 = torch.randn(6, 5, generator=gen, dtype=f64)
    _, D, _ = structured_features(net, x1, factored=True)
    linears = [i for i, m in enumerate(net) if isinstance(m, nn.Linear) and m.weight.requires_grad]
    kinds = {i: isinstance(d, Factored) for i, d in zip(linears, D)}
    assert kinds == {i: i == factored for i in linears}
    forms = {e.module: e.form for e in ntk_fast.ntk_plan(net, x1, mode="full").entries}
    assert {m for m, f in forms.items() if f == "factored"} == ({str(factored)} if factored is not None else set())
    readout = str(len(net) - 1)
    assert (forms.get(readout) == "unit") == (factored is not None and not frozen_readout)
    for xb in (None, x2):
        ref = jacobian_ntk_reference(net, x1, xb)
        for bs in (None, 5):
            got = ntk_fast.empirical_ntk(net, x1, xb, mode="full", block_size=bs)
            assert got.shape == ref.shape and rel(got, ref) <= 1e-10
        assert rel(ntk_fast.empirical_ntk(net, x1, xb, mode="trace"), trace(ref)) <= 1e-10


def test_sequential_with_flatten_takes_the_fast_path(gen, monkeypatch):
    """nn.Flatten() (first, and the identity later on (n, p)) is part of the Sequential fast path: image-shaped
    points give torch.func's NTK in every mode without the hook path."""
    from ntk_fast.ntk import anymodel
    from ntk_fast.ntk.empirical import structured_input
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    net = nn.Sequential(nn.Flatten(), nn.Linear(24, 9), nn.ReLU(), nn.Flatten(), nn.Linear(9, 8), nn.Tanh(),
                        nn.Linear(8, 6)).to(f64)
    x1 = torch.randn(13, 2, 3, 4, generator=gen, dtype=f64)
    x2 = torch.randn(5, 2, 3, 4, generator=gen, dtype=f64)
    assert structured_input(net, x1) and structured_input(net, x1.flatten(1))
    assert not structured_input(nn.Sequential(*list(net)[1:]), x1)
    assert not structured_input(nn.Sequential(nn.Flatten(2), *list(net)[1:]), x1)
    monkeypatch.setattr(anymodel, "any_model_ntk", lambda *a, **k: pytest.fail("hook path taken"))
    for xb in (None, x2):
        ref = jacobian_ntk_reference(net, x1, xb)
        assert rel(ntk_fast.empirical_ntk(net, x1, xb, mode="full"), ref) <= 1e-10
        assert rel(ntk_fast.empirical_ntk(net, x1, xb, mode="trace"), trace(ref)) <= 1e-10
    diag = ntk_fast.empirical_ntk(net, x1, mode="diagonal")
    assert rel(diag, torch.diagonal(trace(jacobian_ntk_reference(net, x1)))) <= 1e-10
    forms = [e.form for e in ntk_fast.ntk_plan(net, x1, mode="full").entries]
    assert forms == ["hadamard", "factored", "unit"]
    tail = nn.Sequential(*net, nn.Flatten())            # a trailing Flatten keeps the readout (capture and plan)
    from ntk_fast.ntk.anymodel import Factored
    from ntk_fast.ntk.empirical import structured_features
    assert [isinstance(d, Factored) for d in structured_features(tail, x1, factored=True)[1]] == [False, True, False]
    assert [e.form for e in ntk_fast.ntk_plan(tail, x1, mode="full").entries] == ["hadamard", "factored", "unit"]
    assert rel(ntk_fast.empirical_ntk(tail, x1, mode="full"), jacobian_ntk_reference(tail, x1)) <= 1e-10


def test_full_mode_result_on_another_device_is_staged(gen, monkeypatch, tmp_path):
    """mode="full" into an ``out`` on another device than the features (a host memmap for GPU features) goes
    through a block on the features' device, one row panel at a time; checked on the CPU by declaring every
    result foreign (``anymodel._staged``)."""
    from ntk_fast.ntk import anymodel
    calls = []
    monkeypatch.setattr(anymodel, "_staged", lambda res, dev: calls.append(tuple(res.shape)) or True)
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    net = nn.Sequential(nn.Linear(5, 9), nn.ReLU(), nn.Linear(9, 6)).to(f64)
    x1 = torch.randn(150, 5, generator=gen, dtype=f64)
    x2 = torch.randn(7, 5, generator=gen, dtype=f64)
    for xb in (None, x2):
        ref = jacobian_ntk_reference(net, x1, xb)
        for bs in (None, 40):
            mm = np.lib.format.open_memmap(tmp_path / "k.npy", mode="w+", dtype=np.float64, shape=tuple(ref.shape))
            calls.clear()
            ntk_fast.empirical_ntk(net, x1, xb, mode="full", block_size=bs, out=torch.from_numpy(mm))
            assert rel(torch.from_numpy(np.asarray(mm)), ref) <= 1e-10
            assert calls and max(c[0] for c in calls[1:]) < 150, "the result must be staged by row panels"
            del mm


@pytest.mark.parametrize("bias", [0.0, 0.5])
def test_fcnet_full_mode_factored_last_hidden_layer(bias, gen):
    """FCNet with k = 6 outputs, mode="full": the last hidden layer's D comes as Factored(s, W(L)); equal to
    torch.func with biases, a frozen layer, x2 given and row blocks."""
    from ntk_fast.ntk.anymodel import Factored
    from ntk_fast.ntk.empirical import structured_features
    net = ntk_fast.FCNet(5, 9, 3, k=6, bias=bias, dtype=f64, generator=gen)
    x1 = torch.randn(17, 5, generator=gen, dtype=f64)
    x2 = torch.randn(4, 5, generator=gen, dtype=f64)
    _, D, _ = structured_features(net, x1, factored=True)
    assert [isinstance(d, Factored) for d in D] == [False, False, True, False]
    dense = structured_features(net, x1)[1][2]
    assert torch.equal(D[2].dense(), dense), "the factored form must be the dense D exactly"
    plan = ntk_fast.ntk_plan(net, x1, mode="full")                   # the FCNet's own path, not torch.func
    assert [e.form for e in plan.entries] == ["hadamard", "hadamard", "factored", "unit"]
    assert sorted(plan.params) == sorted(n for n, p in net.named_parameters() if p.requires_grad)
    S, b = 17 * 18 / 2, int(bias > 0)
    p = [5 + b, 9 + b, 9 + b, 9 + b]
    want = 2 * S * ((p[0] + 36 * 9) + (p[1] + 36 * 9) + (p[2] + 9 * (24 + 1)) + p[3])
    assert plan.total_flops == pytest.approx(want)
    trace = ntk_fast.ntk_plan(net, x1, x1, mode="trace")
    assert trace.total_flops == pytest.approx(2 * 17 * 17 * sum(pp + 6 * q for pp, q in zip(p, [9, 9, 9, 6])))
    for frozen in (None, 0):
        if frozen is not None:
            net.weights[frozen].requires_grad_(False)
        for xb in (None, x2):
            ref = jacobian_ntk_reference(net, x1, xb)
            for bs in (None, 6):
                assert rel(ntk_fast.empirical_ntk(net, x1, xb, mode="full", block_size=bs), ref) <= 1e-10


def test_frozen_parameters_are_left_out(gen):
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).to(f64)
    net[0].weight.requires_grad_(False)
    net[2].bias.requires_grad_(False)
    x = torch.randn(8, 4, generator=gen, dtype=f64)
    ref = jacobian_ntk_reference(net, x)[:, :, 0, 0]
    assert rel(ntk_fast.empirical_ntk(net, x), ref) <= 1e-10
    fc = ntk_fast.FCNet(4, 6, 2, bias=0.5, dtype=f64, generator=gen)
    fc.weights[1].requires_grad_(False)
    fc.biases[0].requires_grad_(False)
    ref = jacobian_ntk_reference(fc, x)[:, :, 0, 0]
    assert rel(ntk_fast.empirical_ntk(fc, x), ref) <= 1e-10


def test_generic_module_uses_jacobian_path(gen):
    class Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv1d(1, 3, 3)
            self.l = nn.Linear(3 * 6, 2)

        def forward(self, x):
            return self.l(torch.tanh(self.c(x.unsqueeze(1))).flatten(1))

    torch.manual_seed(0)
    net = Conv().to(f64)
    assert not ntk_fast.supports_structured(net)
    x = torch.randn(7, 8, generator=gen, dtype=f64)
    ref = jacobian_ntk_reference(net, x)
    assert rel(ntk_fast.empirical_ntk(net, x, block_size=3), ref) <= 1e-12
    assert rel(ntk_fast.empirical_ntk(net, x, mode="diagonal", block_size=2), torch.diagonal(trace(ref))) <= 1e-12
    # Conv1d and Linear are both hooked layer kinds (issue 13): the structured path covers this model
    assert rel(ntk_fast.empirical_ntk(net, x, method="structured"), ref) <= 1e-12


@pytest.mark.parametrize("block", [1, 3, 16, 100])
def test_panels_and_progress_match_single_call(block, gen):
    net = ntk_fast.FCNet(10, 12, 2, dtype=f64, generator=gen)
    x = torch.randn(37, 10, generator=gen, dtype=f64)
    x2 = torch.randn(20, 10, generator=gen, dtype=f64)
    one = ntk_fast.empirical_ntk(net, x)
    assert rel(ntk_fast.empirical_ntk(net, x, block_size=block), one) <= 1e-13
    panels = ntk_fast.empirical_ntk(net, x, block_size=block, progress=True)
    assert rel(panels, one) <= 1e-13
    assert torch.equal(panels, panels.T)
    assert rel(ntk_fast.empirical_ntk(net, x, x2, block_size=block), ntk_fast.empirical_ntk(net, x, x2)) <= 1e-13


def test_out_memmap_multioutput(tmp_path, gen):
    import numpy as np
    net = ntk_fast.FCNet(6, 8, 2, k=3, dtype=f64, generator=gen)
    x = torch.randn(13, 6, generator=gen, dtype=f64)
    mm = np.lib.format.open_memmap(tmp_path / "k.npy", mode="w+", dtype=np.float64, shape=(13, 13))
    ntk_fast.empirical_ntk(net, x, mode="trace", out=torch.from_numpy(mm), block_size=4)
    mm.flush()
    assert rel(torch.from_numpy(np.load(tmp_path / "k.npy")), trace(jacobian_ntk_reference(net, x))) <= 1e-10
    out = torch.empty(13, 13, 3, 3, dtype=f64)
    ntk_fast.empirical_ntk(net, x, out=out)
    assert rel(out, jacobian_ntk_reference(net, x)) <= 1e-10


def test_float32_model(gen):
    net64 = ntk_fast.FCNet(30, 64, 3, dtype=f64, generator=gen)
    net32 = ntk_fast.FCNet(30, 64, 3, dtype=torch.float32)
    net32.load_state_dict({k: v.float() for k, v in net64.state_dict().items()})
    x = torch.randn(50, 30, generator=gen, dtype=f64)
    k64 = ntk_fast.empirical_ntk(net64, x)
    k32 = ntk_fast.empirical_ntk(net32, x.float())
    assert k32.dtype == torch.float32
    assert rel(k32.double(), k64) <= 2e-5


def test_bad_inputs(gen):
    net = ntk_fast.FCNet(4, 5, 2, dtype=f64)
    x = torch.randn(3, 4, dtype=f64)
    with pytest.raises(ValueError, match="x1 has dtype torch.float32"):
        ntk_fast.empirical_ntk(net, x.float())
    with pytest.raises(ValueError, match="x1 contains NaN or inf"):
        ntk_fast.empirical_ntk(net, torch.full((3, 4), float("nan"), dtype=f64))
    with pytest.raises(ValueError, match="x2 has per-point shape"):
        ntk_fast.empirical_ntk(net, x, torch.randn(3, 5, dtype=f64))
    with pytest.raises(ValueError, match="x1 must be 2-D"):
        ntk_fast.empirical_ntk(net, torch.randn(3, 4, 1, dtype=f64))
    with pytest.raises(ValueError, match="mode must be one of"):
        ntk_fast.empirical_ntk(net, x, mode="blocks")
    with pytest.raises(ValueError, match="method must be one of"):
        ntk_fast.empirical_ntk(net, x, method="magic")
    with pytest.raises(ValueError, match="out must have shape \\(3, 3\\)"):
        ntk_fast.empirical_ntk(net, x, out=torch.empty(3, 4, dtype=f64))
    with pytest.raises(ValueError, match="out has dtype"):
        ntk_fast.empirical_ntk(net, x, out=torch.empty(3, 3))
    with pytest.raises(ValueError, match="mode='diagonal' takes no x2"):
        ntk_fast.empirical_ntk(net, x, x, mode="diagonal")
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        ntk_fast.empirical_ntk(net, x, block_size=0)
    with pytest.raises(ValueError, match="FCNet: x must have shape \\(n, 4\\)"):
        net(torch.randn(3, 5, dtype=f64))
    frozen = nn.Sequential(nn.Linear(4, 2)).to(f64).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters that require grad"):
        ntk_fast.empirical_ntk(frozen, x)
    with pytest.raises(ValueError, match="no parameters that require grad"):
        ntk_fast.empirical_ntk(nn.Sequential(nn.Tanh()), x)
    with pytest.raises(ValueError, match="model must be a torch.nn.Module"):
        ntk_fast.empirical_ntk(lambda t: t, x)


def test_empty_input():
    net = ntk_fast.FCNet(4, 5, 2, dtype=f64)
    assert ntk_fast.empirical_ntk(net, torch.empty(0, 4, dtype=f64)).shape == (0, 0)


def test_fallback_without_extension_warns_once():
    code = textwrap.dedent("""
        import sys, warnings, torch
        sys.modules['ntk_fast._C'] = None          # make `from . import _C` fail
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter('always')
            import ntk_fast
            from ntk_fast.ops.reference import jacobian_ntk_reference
            assert not ntk_fast.extension_available()
            net = ntk_fast.FCNet(5, 7, 2, dtype=torch.float64)
            x = torch.randn(6, 5, dtype=torch.float64)
            k1 = ntk_fast.empirical_ntk(net, x)
            k2 = ntk_fast.empirical_ntk(net, x, x)
        msgs = [str(m.message) for m in w if 'could not be loaded' in str(m.message)]
        assert len(msgs) == 1, msgs
        ref = jacobian_ntk_reference(net, x)[:, :, 0, 0]
        assert (k1 - ref).abs().max() <= 1e-12 * ref.abs().max()
        assert (k2 - ref).abs().max() <= 1e-12 * ref.abs().max()
        print('ok')
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("ok")
