"""empirical_ntk of any model (issue 13): hooks + torch.func routing vs torch.func over all parameters (float64)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ntk_fast
from ntk_fast.ops.reference import jacobian_ntk_reference

f64 = torch.float64
TOL = 1e-10


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def trace(K):
    return torch.diagonal(K, dim1=2, dim2=3).sum(-1)


def randomise(model, gen):
    """Non-trivial values for every parameter and buffer (biases, norm affines, running stats)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.7)
        for nm, b in model.named_buffers():
            if "running_var" in nm:
                b.copy_(torch.rand(b.shape, generator=gen, dtype=b.dtype) + 0.5)
            elif "running_mean" in nm:
                b.copy_(torch.randn(b.shape, generator=gen, dtype=b.dtype))
    return model


def check_all_modes(model, x1, x2=None, k=None, block=None):
    """full, trace, diagonal and x2 against torch.func over every trainable parameter."""
    ref = jacobian_ntk_reference(model, x1)
    kk = ref.shape[-1]
    full = ntk_fast.empirical_ntk(model, x1, block_size=block)
    assert rel(full, ref if kk > 1 else ref[..., 0, 0]) <= TOL
    assert rel(ntk_fast.empirical_ntk(model, x1, mode="trace", block_size=block), trace(ref)) <= TOL
    diag = ntk_fast.empirical_ntk(model, x1, mode="diagonal")
    assert rel(diag, torch.diagonal(trace(ref))) <= TOL
    if x2 is not None:
        ref2 = jacobian_ntk_reference(model, x1, x2)
        got = ntk_fast.empirical_ntk(model, x1, x2, block_size=block)
        assert rel(got, ref2 if kk > 1 else ref2[..., 0, 0]) <= TOL
        assert rel(ntk_fast.empirical_ntk(model, x1, x2, mode="trace"), trace(ref2)) <= TOL
    if k is not None:
        assert kk == k
    return full


class ResMLP(nn.Module):
    def __init__(self, d, h, k, depth=2):
        super().__init__()
        self.inp = nn.Linear(d, h)
        self.blocks = nn.ModuleList(nn.ModuleDict({"ln": nn.LayerNorm(h), "fc": nn.Linear(h, h)})
                                    for _ in range(depth))
        self.out = nn.Linear(h, k)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = h + torch.tanh(b["fc"](b["ln"](h)))
        return self.out(h)


@pytest.mark.parametrize("k", [1, 3])
def test_residual_mlp_layernorm_biases(k, gen):
    torch.manual_seed(0)
    net = randomise(ResMLP(5, 7, k).to(f64), gen)
    x1 = torch.randn(9, 5, generator=gen, dtype=f64)
    x2 = torch.randn(4, 5, generator=gen, dtype=f64)
    check_all_modes(net, x1, x2, k=k)
    check_all_modes(net, x1, x2, k=k, block=2)     # panels and feature blocks
    plan = ntk_fast.ntk_plan(net, x1)
    assert {e.form for e in plan.entries} == {"hadamard", "grads"} and not plan.func_params


def test_k10_full_and_trace_and_out_memmap(tmp_path, gen):
    torch.manual_seed(0)
    net = randomise(ResMLP(6, 8, 10, depth=1).to(f64), gen)
    x = torch.randn(11, 6, generator=gen, dtype=f64)
    ref = jacobian_ntk_reference(net, x)
    assert rel(ntk_fast.empirical_ntk(net, x, mode="full"), ref) <= TOL
    mm = np.lib.format.open_memmap(tmp_path / "k.npy", mode="w+", dtype=np.float64, shape=(11, 11, 10, 10))
    ntk_fast.empirical_ntk(net, x, out=torch.from_numpy(mm), block_size=3)
    mm.flush()
    assert rel(torch.from_numpy(np.load(tmp_path / "k.npy")), ref) <= TOL
    out = torch.empty(11, 11, dtype=f64)
    ntk_fast.empirical_ntk(net, x, mode="trace", out=out, block_size=4)
    assert rel(out, trace(ref)) <= TOL
    # the FC fast path in full mode (shared A products) for an nn.Sequential with 10 outputs
    seq = randomise(nn.Sequential(nn.Linear(6, 9), nn.Softplus(), nn.Linear(9, 10)).to(f64), gen)
    assert rel(ntk_fast.empirical_ntk(seq, x), jacobian_ntk_reference(seq, x)) <= TOL
    x2 = torch.randn(3, 6, generator=gen, dtype=f64)
    assert rel(ntk_fast.empirical_ntk(seq, x, x2, block_size=2), jacobian_ntk_reference(seq, x, x2)) <= TOL


def test_paper_cnn_28x28(gen):
    net = ntk_fast.CV(3, k=2, dtype=f64, generator=gen)
    assert [tuple(c.stride) for c in net.convs] == [(2, 2), (1, 1), (2, 2), (1, 1)]
    x1 = torch.randn(4, 784, generator=gen, dtype=f64)
    x2 = torch.randn(3, 1, 28, 28, generator=gen, dtype=f64)
    check_all_modes(net, x1, x2.reshape(3, 784), k=2)
    plan = ntk_fast.ntk_plan(net, x1)
    assert [e.T for e in plan.entries] == [169, 121, 25, 9, 1] and not plan.func_params
    assert ntk_fast.CV(32).readout.weight.numel() + sum(c.weight.numel() for c in ntk_fast.CV(32).convs) == 77632


class ConvZoo(nn.Module):
    """Wide-ResNet-style residual conv blocks without BN, plus every conv option and the norm layers."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1, bias=True)
        self.b1 = nn.Conv2d(4, 4, 3, padding="same", dilation=2, groups=2)
        self.b2 = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
        self.down = nn.Conv2d(4, 6, 3, stride=2, padding=(1, 0), groups=2)
        self.gn = nn.GroupNorm(3, 6)
        self.bn = nn.BatchNorm2d(6).eval()
        self.c1 = nn.Conv1d(6, 5, 2, stride=1, dilation=2, padding=1, padding_mode="circular")
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.stem(x))
        h = 0.7071 * h + 0.7071 * self.b2(torch.tanh(self.b1(h)))       # residual block
        h = torch.tanh(self.bn(self.gn(self.down(h))))
        h = torch.tanh(self.c1(h.flatten(2)))
        return self.head(h.mean(2))


def test_conv_resnet_norms(gen):
    torch.manual_seed(0)
    net = randomise(ConvZoo().to(f64), gen).eval()
    x1 = torch.randn(5, 2, 7, 6, generator=gen, dtype=f64)
    x2 = torch.randn(2, 2, 7, 6, generator=gen, dtype=f64)
    check_all_modes(net, x1, x2, k=3)
    plan = ntk_fast.ntk_plan(net, x1, mode="full")
    assert not plan.func_params
    assert sum(e.module == "down" for e in plan.entries) == 2        # one piece per group


class TinyTransformer(nn.Module):
    def __init__(self, vocab=7, e=6, k=2, tie=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, e, padding_idx=0)
        self.enc = nn.TransformerEncoderLayer(e, nhead=2, dim_feedforward=8, dropout=0.0, batch_first=True)
        self.out = nn.Linear(e, vocab if tie else k)
        if tie:
            self.out.weight = self.emb.weight

    def forward(self, idx):
        h = self.enc(self.emb(idx))
        return self.out(h.mean(1))


def test_transformer_encoder_with_embedding(gen):
    torch.manual_seed(0)
    net = randomise(TinyTransformer().to(f64), gen)
    x1 = torch.randint(0, 7, (4, 5), generator=gen)
    x2 = torch.randint(0, 7, (3, 5), generator=gen)
    check_all_modes(net, x1, x2, k=2)
    plan = ntk_fast.ntk_plan(net, x1)
    func = set(plan.func_params)
    assert "enc.self_attn.in_proj_weight" in func and "enc.self_attn.out_proj.weight" in func
    assert "enc.linear1.weight" not in func and "emb.weight" not in func
    with pytest.raises(ValueError, match="in_proj_weight"):
        ntk_fast.empirical_ntk(net, x1, method="structured")


def test_tied_embedding_readout(gen):
    torch.manual_seed(0)
    net = randomise(TinyTransformer(tie=True).to(f64), gen)
    x1 = torch.randint(0, 7, (4, 3), generator=gen)
    check_all_modes(net, x1, k=7)
    reasons = ntk_fast.ntk_plan(net, x1).func_reasons
    assert reasons["emb.weight"].startswith("tied") and reasons["out.bias"].startswith("shares its module")


class Shared(nn.Module):
    """A Linear called twice, one registered twice, and a weight also used outside its module's call."""

    def __init__(self, register_twice=False):
        super().__init__()
        self.a = nn.Linear(4, 4)
        if register_twice:
            self.twice = nn.ModuleList([self.a, self.a])
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = torch.tanh(self.a(h))
        return self.b(h) + F.linear(h, self.b.weight) * 0.3


def test_module_called_twice_and_functional_use(gen):
    torch.manual_seed(0)
    net = randomise(Shared().to(f64), gen)
    x1 = torch.randn(6, 4, generator=gen, dtype=f64)
    # registered twice too: torch.func.functional_call leaves such a module holding plain tensors
    # afterwards, so the reference runs on a copy; ours restores the Parameters
    twice = Shared(register_twice=True).to(f64)
    twice.load_state_dict(net.state_dict(), strict=False)
    assert rel(ntk_fast.empirical_ntk(twice, x1), jacobian_ntk_reference(net, x1)) <= TOL
    assert all(isinstance(p, nn.Parameter) for p in (twice.a.weight, twice.a.bias, twice.b.weight))
    check_all_modes(net, x1, torch.randn(2, 4, generator=gen, dtype=f64), k=2)
    plan = ntk_fast.ntk_plan(net, x1)
    assert [e.form for e in plan.entries if e.module == "a"] in (["pair"], ["grads"])
    assert set(plan.func_params) == {"b.weight", "b.bias"}       # caught by the 2-point check


def test_frozen_parameters_and_n1(gen):
    torch.manual_seed(0)
    net = randomise(ConvZoo().to(f64), gen).eval()
    net.stem.weight.requires_grad_(False)
    net.b2.bias.requires_grad_(False)
    net.gn.weight.requires_grad_(False)
    net.head.requires_grad_(False)
    x = torch.randn(4, 2, 7, 6, generator=gen, dtype=f64)
    check_all_modes(net, x, k=3)
    check_all_modes(net, x[:1], x[1:3], k=3)
    names = set(ntk_fast.ntk_plan(net, x).params)
    assert names == {n for n, p in net.named_parameters() if p.requires_grad}


def test_float32_cnn_close_to_float64(gen):
    net64 = ntk_fast.CV(4, dtype=f64, generator=gen)
    net32 = ntk_fast.CV(4, dtype=torch.float32)
    net32.load_state_dict({k: v.float() for k, v in net64.state_dict().items()})
    x = torch.randn(6, 1, 28, 28, generator=gen, dtype=f64)
    k32 = ntk_fast.empirical_ntk(net32, x.float())
    assert k32.dtype == torch.float32
    assert rel(k32.double(), ntk_fast.empirical_ntk(net64, x)) <= 1e-5


def test_bad_input(gen):
    torch.manual_seed(0)
    net = ConvZoo().to(f64)
    x = torch.randn(3, 2, 7, 6, dtype=f64)
    net.train()
    with pytest.raises(ValueError, match=r"BatchNorm module 'bn'.*eval"):
        ntk_fast.empirical_ntk(net, x)
    drop = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Tanh(), nn.LayerNorm(4), nn.Linear(4, 1)).to(f64)
    with pytest.raises(ValueError, match=r"dropout module '1'"):
        ntk_fast.empirical_ntk(drop, torch.randn(3, 3, dtype=f64))
    frozen = nn.Sequential(nn.Conv1d(1, 2, 2)).to(f64).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters that require grad"):
        ntk_fast.empirical_ntk(frozen, torch.randn(3, 1, 5, dtype=f64))
    with pytest.raises(ValueError, match="no parameters that require grad"):
        ntk_fast.ntk_plan(frozen, torch.randn(3, 1, 5, dtype=f64))
    net.eval()
    with pytest.raises(ValueError, match="x2 has per-point shape"):
        ntk_fast.empirical_ntk(net, x, torch.randn(3, 2, 6, 7, dtype=f64))
    with pytest.raises(ValueError, match="mode must be one of"):
        ntk_fast.ntk_plan(net, x, mode="diag")

    class Pair(nn.Module):                     # returns (outputs, extra): not one tensor
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def forward(self, z):
            return self.lin(z), z.sum()

    with pytest.raises(ValueError, match="must return one tensor .* got tuple"):
        ntk_fast.empirical_ntk(Pair().to(f64), torch.randn(3, 3, dtype=f64))
    mlp = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(f64)
    with pytest.raises(ValueError, match="out must be a torch.Tensor .* torch.from_numpy"):
        ntk_fast.empirical_ntk(mlp, torch.randn(3, 3, dtype=f64), out=np.zeros((3, 3)))


@pytest.mark.parametrize("conv", [
    nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2),
    nn.Conv2d(3, 2, 3, padding="same", padding_mode="reflect", bias=False),
    nn.Conv1d(4, 4, 3, stride=2, dilation=2, padding=2, groups=4),
])
def test_conv_grads_match_unfolded_pieces(conv, gen):
    """layers.conv_grads (a convolution over points) equals sum_t D_t A_t^T from the unfolded patches."""
    from ntk_fast.ntk import capture, layers
    conv = conv.to(f64)
    shape = (5, conv.in_channels, 9, 8) if isinstance(conv, nn.Conv2d) else (5, conv.in_channels, 11)
    x = torch.randn(shape, generator=gen, dtype=f64)
    y = conv(x)
    D = torch.randn((5, 3) + tuple(y.shape[1:]), generator=gen, dtype=f64)
    names = layers.trainable(conv)
    direct = torch.cat(layers.conv_grads(conv, x, D, names), dim=2)
    pieces = capture.grads_of(layers.token_pieces(conv, x, D, names))
    assert rel(direct, pieces) <= 1e-13


def test_plan_table_flops_and_memory_guard(monkeypatch, gen):
    from ntk_fast.ntk import anymodel
    net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4)).to(f64)
    x = torch.randn(7, 5, generator=gen, dtype=f64)
    plan = ntk_fast.ntk_plan(net, x, mode="full")
    assert [e.form for e in plan.entries] == ["hadamard", "unit"]     # k = 4: kp = 16 = k^2, not factored
    S = 7 * 8 / 2                                   # symmetric pairs
    assert plan.total_flops == pytest.approx(2 * S * ((6 + 16 * 6) + 7))
    trace = ntk_fast.ntk_plan(net, x, mode="trace")
    assert [e.form for e in trace.entries] == ["hadamard", "hadamard"]
    assert trace.total_flops == pytest.approx(2 * S * ((6 + 4 * 6) + (7 + 4 * 4)))
    text = str(plan)
    assert "0.weight, 0.bias" in text and "hadamard" in text
    jac = ntk_fast.ntk_plan(net, x, method="jacobian")
    assert [e.form for e in jac.entries] == ["jacobian"] and len(jac.func_reasons) == 4
    monkeypatch.setattr(anymodel.os, "sysconf", lambda name: 16)
    with pytest.raises(ValueError, match="features need about"):
        ntk_fast.empirical_ntk(ConvZoo().to(f64).eval(), torch.randn(3, 2, 7, 6, dtype=f64))


class TokenMLP(nn.Module):
    """A Linear on (n, T, p) tokens where the token-pair form is the cheapest (small T, wide layers)."""

    def __init__(self, p=23, h=19, k=3):
        super().__init__()
        self.tok = nn.Linear(p, h)
        self.out = nn.Linear(h, k)

    def forward(self, x):
        return self.out(torch.tanh(self.tok(x)).mean(1))


@pytest.mark.parametrize("block", [None, 2])
def test_token_pair_form_through_gram_full(block, gen):
    """The pair form (ntk_fast.gram_full with T > 1) in full, trace and x2, whole and in row panels."""
    torch.manual_seed(0)
    net = randomise(TokenMLP().to(f64), gen)
    x1 = torch.randn(7, 3, 23, generator=gen, dtype=f64)
    x2 = torch.randn(4, 3, 23, generator=gen, dtype=f64)
    forms = {e.module: e.form for e in ntk_fast.ntk_plan(net, x1).entries}
    assert forms["tok"] == "pair", forms
    full = check_all_modes(net, x1, x2, k=3, block=block)
    assert torch.equal(full, full.permute(1, 0, 3, 2))


class ConvShare(nn.Module):
    """Convolutions in the materialised-gradient form: one called twice (its per-sample gradient is the sum over
    calls), an in-place ReLU on a hooked output (D must be read before it), bias, groups, dilation, stride,
    zero and reflect padding, and a Conv1d on the flattened positions."""

    def __init__(self, k):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1, bias=True)
        self.shared = nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2, bias=True)
        self.down = nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), padding_mode="reflect", bias=False)
        self.c1 = nn.Conv1d(6, 5, 3, stride=2, padding=1, dilation=2)
        self.head = nn.Linear(5, k)

    def forward(self, x):
        h = torch.relu_(self.a(x))
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.down(h))
        h = torch.tanh(self.c1(h.flatten(2)))
        return self.head(h.mean(2))


@pytest.mark.parametrize("k", [1, 3])
def test_conv_grads_in_place_blocks_calls_inplace_relu(k, gen, monkeypatch):
    """Conv gradients written into the preallocated features block by block (odd block, chunks of one point),
    summed over two calls, with an in-place ReLU after a conv: every mode and x2 against torch.func."""
    from ntk_fast.ntk import layers
    torch.manual_seed(0)
    net = randomise(ConvShare(k).to(f64), gen)
    x1 = torch.randn(5, 3, 9, 7, generator=gen, dtype=f64)
    x2 = torch.randn(3, 3, 9, 7, generator=gen, dtype=f64)
    plan = ntk_fast.ntk_plan(net, x1)
    assert [e.form for e in plan.entries if e.kind.startswith("Conv")] == ["grads"] * 5 and not plan.func_params
    check_all_modes(net, x1, x2, k=k, block=2)
    check_all_modes(net, x1[:1], x2[:1], k=k)
    monkeypatch.setattr(layers, "PATCH_BYTES", 1)          # one point per batched matmul
    check_all_modes(net, x1, x2, k=k, block=3)


def test_conv_grads_out_and_accumulate(gen):
    """conv_grads writes every element of a given (garbage-filled) out, and adds to it when accumulating."""
    from ntk_fast.ntk import layers
    conv = nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2).to(f64)
    x = torch.randn(3, 4, 9, 8, generator=gen, dtype=f64)
    D = torch.randn((3, 2) + tuple(conv(x).shape[1:]), generator=gen, dtype=f64)
    names = layers.trainable(conv)
    ref = layers.conv_grads(conv, x, D, names)
    out = [torch.full_like(r, float("nan")) for r in ref]
    got = layers.conv_grads(conv, x, D, names, out, False, layers.Scratch())
    assert all(g is o for g, o in zip(got, out)) and all(rel(o, r) <= 1e-14 for o, r in zip(out, ref))
    layers.conv_grads(conv, x, D, names, out, True, layers.Scratch())
    assert all(rel(o, 2 * r) <= 1e-14 for o, r in zip(out, ref))
