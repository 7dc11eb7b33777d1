"""The fused gram op against its plain-torch reference (float64), symmetry, out=, bad input."""
import numpy as np
import pytest
import torch

import ntk_fast
from ntk_fast.ops import gram as _ops
from ntk_fast.ops.reference import gram_reference

f64 = torch.float64


def feats(n, fans, gen, dtype=f64):
    A = [torch.randn(n, p, generator=gen, dtype=f64).to(dtype) for p, _ in fans]
    D = [torch.randn(n, q, generator=gen, dtype=f64).to(dtype) for _, q in fans]
    return A, D


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


FANS = [[(3, 5)], [(1, 1)], [(7, 1), (1, 9)], [(33, 17), (17, 17), (17, 1)]]


@pytest.mark.parametrize("n1,n2", [(1, 1), (1, 7), (5, 3), (37, 37), (257, 131), (300, 301)])
@pytest.mark.parametrize("fans", FANS)
def test_op_matches_reference_float64(n1, n2, fans, gen):
    A1, D1 = feats(n1, fans, gen)
    A2, D2 = feats(n2, fans, gen)
    scales = torch.rand(len(fans), generator=gen, dtype=f64).add(0.5).tolist()
    ref = gram_reference(A1, D1, A2, D2, scales)
    out = ntk_fast.gram(A1, D1, A2, D2, scales)
    assert out.shape == (n1, n2)
    assert rel(out, ref) <= 1e-12
    sym = ntk_fast.gram(A1, D1, scales=scales)
    assert rel(sym, gram_reference(A1, D1, scales=scales)) <= 1e-12


@pytest.mark.parametrize("block", [0, 1, 7, 64, 1000])
def test_symmetric_equals_nonsymmetric(block, gen):
    A, D = feats(203, [(11, 13), (13, 1)], gen)
    sym = torch.ops.ntk_fast.gram(A, D, [], [], [1.0, 2.0], True, block)
    full = torch.ops.ntk_fast.gram(A, D, A, D, [1.0, 2.0], False, block)
    assert rel(sym, full) <= 1e-13
    assert torch.equal(sym, sym.T)


def test_gram_is_symmetric_psd(gen):
    net = ntk_fast.FCNet(20, 30, 3, dtype=f64, generator=gen)
    x = torch.randn(150, 20, generator=gen, dtype=f64)
    K = ntk_fast.empirical_ntk(net, x)
    assert torch.equal(K, K.T)
    ev = torch.linalg.eigvalsh(K)
    assert ev.min() >= -1e-10 * ev.max()


def test_float32_bound_against_float64(gen):
    """float32 features: max |K32 - K64| / max |K64| <= 2e-5 (measured ~1e-6 at fan ~ 1000)."""
    net = ntk_fast.FCNet(784, 512, 3, dtype=f64, generator=gen)
    x = torch.randn(300, 784, generator=gen, dtype=f64)
    A, D = net.features(x)
    k64 = ntk_fast.gram(A, D)
    k32 = ntk_fast.gram([a.float() for a in A], [d.float() for d in D])
    assert k32.dtype == torch.float32
    assert rel(k32.double(), k64) <= 2e-5


def test_out_preallocated_and_strided(gen):
    A, D = feats(50, [(4, 6), (6, 1)], gen)
    B, E = feats(40, [(4, 6), (6, 1)], gen)
    ref = gram_reference(A, D, B, E)
    out = torch.full((50, 40), float("nan"), dtype=f64)
    assert ntk_fast.gram(A, D, B, E, out=out) is out
    assert rel(out, ref) <= 1e-12
    big = torch.zeros(40, 50, dtype=f64)
    ntk_fast.gram(A, D, B, E, out=big.T)           # a transposed (column-major) out
    assert rel(big.T, ref) <= 1e-12


def test_out_over_numpy_memmap(tmp_path, gen):
    A, D = feats(70, [(5, 3), (3, 1)], gen)
    mm = np.lib.format.open_memmap(tmp_path / "k.npy", mode="w+", dtype=np.float64, shape=(70, 70))
    ntk_fast.gram(A, D, out=torch.from_numpy(mm))
    mm.flush()
    del mm
    back = torch.from_numpy(np.load(tmp_path / "k.npy"))
    assert rel(back, gram_reference(A, D)) <= 1e-12


def test_noncontiguous_inputs(gen):
    A, D = feats(60, [(8, 10), (10, 1)], gen)
    At = [torch.randn(a.shape[1], 60, generator=gen, dtype=f64).T for a in A]      # transposed views
    Ds = [torch.randn(60, 2 * d.shape[1], generator=gen, dtype=f64)[:, ::2] for d in D]  # strided views
    assert not At[0].is_contiguous() and not Ds[0].is_contiguous()
    ref = gram_reference(At, Ds)
    assert rel(ntk_fast.gram(At, Ds), ref) <= 1e-12
    assert rel(ntk_fast.gram(At, Ds, At, Ds), ref) <= 1e-12


def test_opcheck(gen):
    A, D = feats(9, [(3, 4), (4, 1)], gen)
    B, E = feats(6, [(3, 4), (4, 1)], gen)
    torch.library.opcheck(torch.ops.ntk_fast.gram.default, (A, D, B, E, [1.0, 0.5], False, 0, "highest"))
    torch.library.opcheck(torch.ops.ntk_fast.gram.default, (A, D, [], [], [1.0, 0.5], True, 4, "highest"))
    out = torch.empty(9, 6, dtype=f64)
    torch.library.opcheck(torch.ops.ntk_fast.gram_out.default, (A, D, B, E, [1.0, 1.0], False, 0, "highest", out))


def test_fake_tensor_shapes(gen):
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        A = [torch.empty(7, 3, dtype=f64)]
        D = [torch.empty(7, 2, dtype=f64)]
        B = [torch.empty(5, 3, dtype=f64)]
        E = [torch.empty(5, 2, dtype=f64)]
        assert torch.ops.ntk_fast.gram(A, D, B, E, [1.0], False).shape == (7, 5)


@pytest.mark.parametrize("case,match", [
    ("rank", r"a1\[0\] must be 2-D"),
    ("features", r"a2\[0\] has 4 features, expected 3"),
    ("rows", r"d1\[0\] has 6 rows, expected 5"),
    ("dtype", r"d1\[0\] has dtype torch.float32, expected torch.float64"),
    ("nan", r"a1\[0\] contains NaN or inf"),
    ("inf", r"d2\[0\] contains NaN or inf"),
    ("out_shape", r"out must be a tensor of shape \(5, 5\)"),
    ("out_dtype", r"out has dtype torch.float32, expected torch.float64"),
    ("layers", r"d1 must hold 1 layers"),
    ("int", r"a1\[0\] must be float32 or float64"),
    ("empty", r"a1 must be a non-empty list"),
    ("scales", r"scales must have 1 entries"),
    ("half", r"pass both a2 and d2"),
    ("precision", r"precision must be one of"),
])
def test_bad_input_names_the_argument(case, match):
    a = torch.ones(5, 3, dtype=f64)
    d = torch.ones(5, 2, dtype=f64)
    args = dict(a1=[a], d1=[d], a2=[a], d2=[d])
    kw = {}
    if case == "rank":
        args["a1"] = [torch.ones(5, dtype=f64)]
    elif case == "features":
        args["a2"] = [torch.ones(5, 4, dtype=f64)]
    elif case == "rows":
        args["d1"] = [torch.ones(6, 2, dtype=f64)]
    elif case == "dtype":
        args["d1"] = [d.float()]
    elif case == "nan":
        args["a1"] = [a.clone().fill_(float("nan"))]
    elif case == "inf":
        args["d2"] = [d.clone().fill_(float("inf"))]
    elif case == "out_shape":
        kw["out"] = torch.empty(5, 4, dtype=f64)
    elif case == "out_dtype":
        kw["out"] = torch.empty(5, 5)
    elif case == "layers":
        args["d1"] = [d, d]
    elif case == "int":
        args["a1"] = [torch.ones(5, 3, dtype=torch.int64)]
    elif case == "empty":
        args["a1"] = []
    elif case == "scales":
        kw["scales"] = [1.0, 2.0]
    elif case == "half":
        args["d2"] = None
    elif case == "precision":
        kw["precision"] = "bf16"
    with pytest.raises(ValueError, match=match):
        ntk_fast.gram(args["a1"], args["d1"], args["a2"], args["d2"], **kw)


def test_op_itself_rejects_bad_input():
    a = torch.ones(5, 3, dtype=torch.float64)
    d = torch.ones(5, 2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="d2\\[0\\] has 2 features but d1\\[0\\] has 3"):
        torch.ops.ntk_fast.gram([a], [torch.ones(5, 3, dtype=torch.float64)], [a], [d], [1.0], False)
    with pytest.raises(RuntimeError, match="a1\\[0\\]"):
        torch.ops.ntk_fast.gram([a.float()], [d], [], [], [1.0], True)   # mixed dtypes
    with pytest.raises(RuntimeError, match="out must have shape"):
        torch.ops.ntk_fast.gram_out([a], [d], [], [], [1.0], True, 0, "highest", torch.empty(4, 5, dtype=torch.float64))


def test_extension_available():
    assert _ops.extension_available(), "the compiled extension did not load: build with pip install -e ."
