"""The op ``ntk_fast::gram_full`` (outputs and tokens) on every device against its plain-torch reference:
odd shapes, tokens, block sizes, exact symmetry, strided and memory-mapped out, opcheck, fakes, torch.compile,
bad input.  Tolerances relative to max |ref|: float64 1e-12, float32 1e-5."""
import numpy as np
import pytest
import torch

import ntk_fast
from ntk_fast.ops.reference import gram_full_reference
from conftest import DEVICES

f64 = torch.float64


def feats(n, k, layers, gen, dtype=f64, device="cpu"):
    """layers: [(T, p, q)] -> a [(n, T, p)], d [(n, k, T, q)] (a >= 0 like post-activation inputs)."""
    A = [torch.randn(n, T, p, generator=gen, dtype=f64).abs().to(device, dtype) for T, p, _ in layers]
    D = [torch.randn(n, k, T, q, generator=gen, dtype=f64).to(device, dtype) for T, _, q in layers]
    return A, D


def rel(out, ref):
    out = out.to(ref.device, f64)
    assert not torch.isnan(out).any(), "NaN in the output (unwritten entry?)"
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


def up(ts):
    return None if ts is None else [None if t is None else t.cpu().to(f64) for t in ts]


LAYERS = [[(1, 3, 5)], [(1, 1, 1)], [(3, 4, 2), (1, 7, 1)], [(2, 33, 17), (1, 17, 17), (5, 1, 3)]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n1,n2,k", [(1, 1, 1), (1, 6, 3), (7, 5, 2), (37, 19, 10), (131, 3, 1)])
@pytest.mark.parametrize("layers", LAYERS)
def test_matches_reference(device, dtype, n1, n2, k, layers, gen):
    A1, D1 = feats(n1, k, layers, gen, dtype, device)
    A2, D2 = feats(n2, k, layers, gen, dtype, device)
    sc = [0.5, 2.0, 1.0][:len(layers)]
    tol = 1e-12 if dtype == f64 else 1e-5
    for block in (0, 1, 4):
        got = ntk_fast.gram_full(A1, D1, A2, D2, sc, block=block)
        assert got.shape == (n1, n2, k, k)
        assert rel(got, gram_full_reference(up(A1), up(D1), up(A2), up(D2), sc)) <= tol
        sym = ntk_fast.gram_full(A1, D1, scales=sc, block=block)
        assert rel(sym, gram_full_reference(up(A1), up(D1), None, None, sc)) <= tol
        assert torch.equal(sym, sym.permute(1, 0, 3, 2)), "symmetric mode must be exactly symmetric"


def unit_rows(n, k, dtype=f64, device="cpu"):
    """d (n, k, 1, k) with d[i, c, 0] = e_c: the signal of a linear readout."""
    return torch.eye(k, dtype=dtype, device=device).expand(n, k, k).unsqueeze(2).contiguous()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k", [1, 4])
def test_unit_readout_layers(device, dtype, k, gen):
    """Layers whose D rows are the unit vectors skip the D product (CPU): the result is unchanged, with the unit
    layer first, last, alone, on one side only, and with one entry changed (no shortcut then)."""
    n1, n2 = 29, 11
    A1, D1 = feats(n1, k, [(1, 5, 6), (1, 4, k)], gen, dtype, device)
    A2, D2 = feats(n2, k, [(1, 5, 6), (1, 4, k)], gen, dtype, device)
    D1[1], D2[1] = unit_rows(n1, k, dtype, device), unit_rows(n2, k, dtype, device)
    tol = 1e-12 if dtype == f64 else 1e-5
    sc = [0.5, 3.0]
    for order in ([0, 1], [1, 0], [1]):
        a1, d1, a2, d2 = ([t[i] for i in order] for t in (A1, D1, A2, D2))
        s = [sc[i] for i in order]
        for block in (0, 4):
            got = ntk_fast.gram_full(a1, d1, a2, d2, s, block=block)
            assert rel(got, gram_full_reference(up(a1), up(d1), up(a2), up(d2), s)) <= tol
            sym = ntk_fast.gram_full(a1, d1, scales=s, block=block)
            assert rel(sym, gram_full_reference(up(a1), up(d1), None, None, s)) <= tol
    d2_other = torch.randn(n2, k, 1, k, generator=gen, dtype=f64).to(device, dtype)      # unit on one side only
    got = ntk_fast.gram_full(A1, D1, A2, [D2[0], d2_other], sc)
    assert rel(got, gram_full_reference(up(A1), up(D1), up(A2), up([D2[0], d2_other]), sc)) <= tol
    near = D1[1].clone()
    near[n1 // 2, k - 1, 0, 0] += 0.5      # not a unit row: a wrong shortcut would miss this entry
    got = ntk_fast.gram_full(A1, [D1[0], near], scales=sc)
    assert rel(got, gram_full_reference(up(A1), up([D1[0], near]), None, None, sc)) <= tol


def factored(n, q, gen, dtype=f64, device="cpu"):
    """s (n, 1, 1, q) of a factored layer (activation slopes: some exact zeros, like ReLU's)."""
    s = torch.randn(n, 1, 1, q, generator=gen, dtype=f64)
    return (s * (s > -0.5)).to(device, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k", [1, 3, 5, 10])
@pytest.mark.parametrize("n1,n2", [(1, 1), (7, 5), (41, 13)])
def test_factored_layers(device, dtype, k, n1, n2, gen):
    """w[l] given: d[l] = s (n, 1, 1, q) and D[i, c] = s_i o w_c (the k(k+1)/2 symmetric form on the CPU for
    k >= 5, dense below), alone, after a dense layer, before a unit readout; asymmetric and symmetric."""
    tol = 1e-12 if dtype == f64 else 1e-5
    A1, D1 = feats(n1, k, [(1, 5, 6), (1, 9, 1), (1, 4, k)], gen, dtype, device)
    A2, D2 = feats(n2, k, [(1, 5, 6), (1, 9, 1), (1, 4, k)], gen, dtype, device)
    D1[1], D2[1] = factored(n1, 11, gen, dtype, device), factored(n2, 11, gen, dtype, device)
    D1[2], D2[2] = unit_rows(n1, k, dtype, device), unit_rows(n2, k, dtype, device)
    w = [None, torch.randn(k, 11, generator=gen, dtype=f64).to(device, dtype), None]
    sc = [0.5, 2.0, 3.0]
    for layers in ([0, 1, 2], [1, 2], [1]):
        a1, d1, a2, d2, wl = ([t[i] for i in layers] for t in (A1, D1, A2, D2, w))
        s = [sc[i] for i in layers]
        for block in (0, 1, 4):
            got = ntk_fast.gram_full(a1, d1, a2, d2, s, block=block, w=wl)
            assert got.shape == (n1, n2, k, k)
            assert rel(got, gram_full_reference(up(a1), up(d1), up(a2), up(d2), s, up(wl))) <= tol
            sym = ntk_fast.gram_full(a1, d1, scales=s, block=block, w=wl)
            assert rel(sym, gram_full_reference(up(a1), up(d1), None, None, s, up(wl))) <= tol
            assert torch.equal(sym, sym.permute(1, 0, 3, 2)), "symmetric mode must be exactly symmetric"


def test_factored_equals_dense_signal(gen):
    """The factored form gives the op's own dense result for D = s o w (to rounding), also from
    non-contiguous s and w."""
    n, k = 53, 7
    A, _ = feats(n, k, [(1, 6, 1)], gen)
    s, wk = factored(n, 19, gen), torch.randn(k, 19, generator=gen, dtype=f64)
    dense = (s * wk[None, :, None, :]).contiguous()
    ref = ntk_fast.gram_full(A, [dense])
    assert rel(ntk_fast.gram_full(A, [s], w=[wk]), ref) <= 1e-13
    s_t = s.squeeze(1).squeeze(1).t().contiguous().t()[:, None, None, :]      # (n, 1, 1, q), column-major
    w_t = wk.t().contiguous().t()
    assert not s_t.is_contiguous() and not w_t.is_contiguous()
    assert rel(ntk_fast.gram_full(A, [s_t], w=[w_t]), ref) <= 1e-13


def test_hadamard_full_equals_the_gram_op_per_output_pair(gen):
    """T = 1: out[:, :, c, c'] is the plain Gram op on (A, D[:, c]) against (A, D[:, c'])."""
    A, D = feats(23, 3, [(1, 6, 4), (1, 2, 5)], gen)
    out = ntk_fast.gram_full(A, D)
    for c in range(3):
        for c2 in range(3):
            ref = ntk_fast.gram([a[:, 0] for a in A], [d[:, c, 0] for d in D], [a[:, 0] for a in A],
                                [d[:, c2, 0] for d in D])
            assert rel(out[:, :, c, c2], ref) <= 1e-12


def test_out_strided_and_memmap(tmp_path, gen):
    A, D = feats(29, 4, [(2, 5, 3), (1, 3, 6)], gen)
    ref = gram_full_reference(A, D)
    big = torch.full((29, 40, 4, 4), float("nan"), dtype=f64)
    view = big[:, 5:34]                                 # strided: row stride 40 k^2
    ntk_fast.gram_full(A, D, out=view)
    assert rel(view, ref) <= 1e-12 and torch.isnan(big[:, :5]).all() and torch.isnan(big[:, 34:]).all()
    perm = torch.empty(4, 4, 29, 29, dtype=f64).permute(2, 3, 0, 1)   # out with unusual strides
    ntk_fast.gram_full(A, D, out=perm)
    assert rel(perm, ref) <= 1e-12
    mm = np.lib.format.open_memmap(tmp_path / "g.npy", mode="w+", dtype=np.float64, shape=(29, 29, 4, 4))
    ntk_fast.gram_full(A, D, out=torch.from_numpy(mm))
    mm.flush()
    assert rel(torch.from_numpy(np.load(tmp_path / "g.npy")), ref) <= 1e-12


@pytest.mark.parametrize("device", DEVICES)
def test_strided_out_on_every_device(device, gen):
    A, D = feats(21, 3, [(2, 4, 3), (1, 5, 2)], gen, device=device)
    ref = gram_full_reference(up(A), up(D))
    big = torch.full((21, 30, 3, 3), float("nan"), dtype=f64, device=device)
    ntk_fast.gram_full(A, D, out=big[:, 4:25])
    assert rel(big[:, 4:25], ref) <= 1e-12 and torch.isnan(big[:, :4]).all() and torch.isnan(big[:, 25:]).all()
    perm = torch.empty(3, 3, 21, 21, dtype=f64, device=device).permute(2, 3, 0, 1)
    ntk_fast.gram_full(A, D, out=perm)
    assert rel(perm, ref) <= 1e-12


def test_noncontiguous_inputs(gen):
    A, D = feats(17, 3, [(2, 6, 4)], gen)
    At = [torch.randn(6, 2, 17, generator=gen, dtype=f64).permute(2, 1, 0)]
    Dt = [d.transpose(0, 1).contiguous().transpose(0, 1) for d in D]
    assert not At[0].is_contiguous() and not Dt[0].is_contiguous()
    assert rel(ntk_fast.gram_full(At, Dt), gram_full_reference(At, Dt)) <= 1e-12


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_opcheck(device, dtype, gen):
    A, D = feats(9, 3, [(2, 4, 3), (1, 5, 1)], gen, dtype, device)
    B, E = feats(6, 3, [(2, 4, 3), (1, 5, 1)], gen, dtype, device)
    torch.library.opcheck(torch.ops.ntk_fast.gram_full.default, (A, D, None, None, [1.0, 2.0], 0))
    torch.library.opcheck(torch.ops.ntk_fast.gram_full.default, (A, D, B, E, [1.0, 2.0], 2))
    out = torch.empty(9, 6, 3, 3, dtype=dtype, device=device)
    torch.library.opcheck(torch.ops.ntk_fast.gram_full.out, (A, D, B, E, [1.0, 2.0], 0), {"out": out})
    A, D = feats(9, 6, [(1, 4, 3), (1, 5, 1)], gen, dtype, device)       # a factored layer (k = 6)
    B, E = feats(6, 6, [(1, 4, 3), (1, 5, 1)], gen, dtype, device)
    D[1], E[1] = factored(9, 7, gen, dtype, device), factored(6, 7, gen, dtype, device)
    w = [None, torch.randn(6, 7, generator=gen, dtype=f64).to(device, dtype)]
    torch.library.opcheck(torch.ops.ntk_fast.gram_full.default, (A, D, None, None, [1.0, 2.0], 0, w))
    out = torch.empty(9, 6, 6, 6, dtype=dtype, device=device)
    torch.library.opcheck(torch.ops.ntk_fast.gram_full.out, (A, D, B, E, [1.0, 2.0], 3, w), {"out": out})


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        A, D = [torch.empty(7, 2, 3, dtype=f64)], [torch.empty(7, 4, 2, 5, dtype=f64)]
        B, E = [torch.empty(5, 2, 3, dtype=f64)], [torch.empty(5, 4, 2, 5, dtype=f64)]
        assert torch.ops.ntk_fast.gram_full(A, D, B, E, [1.0]).shape == (7, 5, 4, 4)
        assert torch.ops.ntk_fast.gram_full(A, D, None, None, [1.0]).shape == (7, 7, 4, 4)
        S, W = [torch.empty(7, 1, 1, 5, dtype=f64)], [torch.empty(6, 5, dtype=f64)]
        A1 = [torch.empty(7, 1, 3, dtype=f64)]
        assert torch.ops.ntk_fast.gram_full(A1, S, None, None, [1.0], 0, W).shape == (7, 7, 6, 6)


@pytest.mark.parametrize("device", DEVICES)
def test_wrapper_compiles_fullgraph(device, gen):
    A, D = feats(11, 2, [(3, 4, 2)], gen, device=device)

    def f(A, D):
        return ntk_fast.gram_full(A, D, scales=[0.5]).sum()

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="eager")(A, D)
    torch.testing.assert_close(got, f(A, D), rtol=1e-12, atol=0)
    S, W = [factored(11, 5, gen, device=device)], [torch.randn(6, 5, generator=gen, dtype=f64).to(device)]
    A1 = [a[:, :1] for a in A]

    def g(A, S, W):
        return ntk_fast.gram_full(A, S, w=W).sum()

    torch._dynamo.reset()
    got = torch.compile(g, fullgraph=True, backend="eager")(A1, S, W)
    torch.testing.assert_close(got, g(A1, S, W), rtol=1e-12, atol=0)


@pytest.mark.parametrize("case,match", [
    (lambda A, D: ntk_fast.gram_full(A, D, A), "both a2 and d2"),
    (lambda A, D: ntk_fast.gram_full([], D), "a1 must be a non-empty list"),
    (lambda A, D: ntk_fast.gram_full([A[0][:, 0]], D), r"a1\[0\] must be 3-D"),
    (lambda A, D: ntk_fast.gram_full(A, [D[0][:, :, 0]]), r"d1\[0\] must be 4-D"),
    (lambda A, D: ntk_fast.gram_full(A, [D[0][:4]]), r"d1\[0\] has 4 rows, expected 6"),
    (lambda A, D: ntk_fast.gram_full(A, [D[0][:, :, :1]]), "layer 0 has 2 tokens"),
    (lambda A, D: ntk_fast.gram_full(A, [D[0].float()]), r"d1\[0\] has dtype torch.float32, expected torch.float64"),
    (lambda A, D: ntk_fast.gram_full([A[0].int()], D), r"a1\[0\] must be float32 or float64"),
    (lambda A, D: ntk_fast.gram_full([A[0] * float("nan")], D), r"a1\[0\] contains NaN"),
    (lambda A, D: ntk_fast.gram_full(A, D, scales=[1.0, 2.0]), "scales must be 1 finite"),
    (lambda A, D: ntk_fast.gram_full(A, D, block=-1), "block must be an int >= 0"),
    (lambda A, D: ntk_fast.gram_full(A, D, out=torch.empty(6, 6, 3, 2, dtype=f64)), r"out must be a \(6, 6, 3, 3\)"),
    (lambda A, D: ntk_fast.gram_full(A, D, A, [D[0][:, :2]]), r"d1\[0\] and d2\[0\] must have 3 outputs"),
])
def test_bad_input_names_the_argument(case, match, gen):
    A, D = feats(6, 3, [(2, 4, 5)], gen)
    with pytest.raises(ValueError, match=match):
        case(A, D)


@pytest.mark.parametrize("case,match", [
    (lambda A, S, W: ntk_fast.gram_full(A, S, w=W + [None]), "w must be None or a list of 1 entries"),
    (lambda A, S, W: ntk_fast.gram_full(A, S, w=W[0]), "w must be None or a list of 1 entries"),
    (lambda A, S, W: ntk_fast.gram_full(A, S, w=[W[0][:, :3]]), r"w\[0\] must be a \(k, 5\) tensor"),
    (lambda A, S, W: ntk_fast.gram_full(A, S, w=[W[0].float()]), r"w\[0\] is torch.float32"),
    (lambda A, S, W: ntk_fast.gram_full(A, S, w=[W[0] * float("inf")]), r"w\[0\] contains NaN or inf"),
    (lambda A, S, W: ntk_fast.gram_full(A, S, w=[W[0].clone().requires_grad_()]), r"w\[0\] requires grad"),
    (lambda A, S, W: ntk_fast.gram_full(A, [S[0].expand(6, 2, 1, 5)], w=W), "factored layer 0"),
    (lambda A, S, W: ntk_fast.gram_full([A[0].expand(6, 2, 4)], [S[0].expand(6, 1, 2, 5)], w=W),
     "factored layer 0"),
    (lambda A, S, W: ntk_fast.gram_full(A + A, S + [torch.zeros(6, 3, 1, 5, dtype=f64)],
                                        w=W + [torch.zeros(4, 5, dtype=f64)]), r"w\[1\] must be a \(3, 5\)"),
])
def test_bad_factors_name_the_argument(case, match, gen):
    A = [torch.randn(6, 1, 4, generator=gen, dtype=f64)]
    S, W = [factored(6, 5, gen)], [torch.randn(3, 5, generator=gen, dtype=f64)]
    with pytest.raises(ValueError, match=match):
        case(A, S, W)
    with pytest.raises(RuntimeError, match="gram_full: w"):
        torch.ops.ntk_fast.gram_full(A, S, None, None, [1.0], 0, [W[0][:, :3]])


def test_op_itself_rejects_bad_input(gen):
    A, D = feats(6, 3, [(2, 4, 5)], gen)
    with pytest.raises(RuntimeError, match="gram_full: a1\\[0\\] must be 3-D"):
        torch.ops.ntk_fast.gram_full([A[0][:, 0]], D, None, None, [1.0], 0)
    with pytest.raises(RuntimeError, match="gram_full: scales must have one entry per layer"):
        torch.ops.ntk_fast.gram_full(A, D, None, None, [1.0, 1.0], 0)
    with pytest.raises(RuntimeError, match="gram_full: out must have shape"):
        torch.ops.ntk_fast.gram_full.out(A, D, None, None, [1.0], 0, out=torch.empty(6, 6, dtype=f64))
