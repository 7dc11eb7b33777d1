"""The structured Gram op ``ntk_fast::gram`` (and ``gram.out``) on every device against its plain-torch
reference (float64 inputs upcast), symmetry, out=, streaming, opcheck, torch.compile, bad input.

Tolerances, relative to max |ref|: float64 1e-12, float32 1e-5, tf32 5e-3 on CUDA (docs/cuda.md derives the
bounds); the CPU kernel treats "tf32" as "highest".
"""
import numpy as np
import pytest
import torch

import ntk_fast
from ntk_fast.ntk.stream import gram_streamed
from ntk_fast.ops.reference import gram_reference
from conftest import DEVICES

f64 = torch.float64
MODES = [(torch.float64, "highest"), (torch.float32, "highest"), (torch.float32, "tf32")]
MODE_IDS = ["f64", "f32", "tf32"]


def tol(dtype, precision, device):
    if dtype == torch.float64:
        return 1e-12
    return 5e-3 if (precision == "tf32" and device == "cuda") else 1e-5


def _features(n, fans_in, fans_out, dtype, seed, nonneg_a=True, device="cpu"):
    g = torch.Generator(device="cpu").manual_seed(seed)
    A = [torch.randn(n, f, generator=g, dtype=torch.float64) for f in fans_in]
    if nonneg_a:  # like post-activation inputs
        A = [a.abs() for a in A]
    D = [torch.randn(n, f, generator=g, dtype=torch.float64) for f in fans_out]
    return [a.to(device, dtype) for a in A], [d.to(device, dtype) for d in D]


def _reference(A1, D1, A2, D2, scales):
    up = lambda ts: [t.to(torch.float64) for t in ts]  # noqa: E731
    return gram_reference(up(A1), up(D1), up(A2), up(D2), scales)


def _rel_err(out, ref):
    out = out.to(ref.device, torch.float64)
    assert not torch.isnan(out).any(), "NaN in the output (unwritten element?)"
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


def _gram(A1, D1, A2, D2, scales, symmetric, precision):
    n1, n2 = A1[0].shape[0], (A1 if symmetric else A2)[0].shape[0]
    out = torch.full((n1, n2), float("nan"), dtype=A1[0].dtype, device=A1[0].device)
    torch.ops.ntk_fast.gram.out(A1, D1, None if symmetric else A2, None if symmetric else D2, scales, 0, precision,
                                out=out)
    return out


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
def test_symmetric_equals_nonsymmetric_blocks(block, gen):
    A, D = feats(203, [(11, 13), (13, 1)], gen)
    sym = torch.ops.ntk_fast.gram(A, D, None, None, [1.0, 2.0], block)
    full = torch.ops.ntk_fast.gram(A, D, A, D, [1.0, 2.0], block)
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
    ("grad", r"d2\[0\] requires grad, but the op has no backward"),
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
    elif case == "grad":
        args["d2"] = [d.clone().requires_grad_()]
    with pytest.raises(ValueError, match=match):
        ntk_fast.gram(args["a1"], args["d1"], args["a2"], args["d2"], **kw)


def test_meta_tensors_give_the_shape_and_no_grad_mode_takes_grad_tensors():
    a, d = torch.ones(5, 3, dtype=f64, device="meta"), torch.ones(5, 2, dtype=f64, device="meta")
    out = ntk_fast.gram([a], [d])                 # the finite check has no data to read on meta
    assert out.shape == (5, 5) and out.device.type == "meta"
    a, d = torch.randn(5, 3, dtype=f64, requires_grad=True), torch.randn(5, 2, dtype=f64)
    with torch.no_grad():
        assert rel(ntk_fast.gram([a], [d]), gram_reference([a.detach()], [d])) <= 1e-12


def test_op_itself_rejects_bad_input():
    a = torch.ones(5, 3, dtype=torch.float64)
    d = torch.ones(5, 2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="d2\\[0\\] has 2 features but d1\\[0\\] has 3"):
        torch.ops.ntk_fast.gram([a], [torch.ones(5, 3, dtype=torch.float64)], [a], [d], [1.0])
    with pytest.raises(RuntimeError, match="a1\\[0\\]"):
        torch.ops.ntk_fast.gram([a.float()], [d], None, None, [1.0])   # mixed dtypes
    with pytest.raises(RuntimeError, match="out must have shape"):
        torch.ops.ntk_fast.gram.out([a], [d], None, None, [1.0], 0, "highest", out=torch.empty(4, 5, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="both a2 and d2"):
        torch.ops.ntk_fast.gram([a], [d], [a], None, [1.0])


def test_extension_available():
    assert ntk_fast.extension_available(), "the compiled extension did not load: build with pip install -e ."


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,precision", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("n", [1, 2, 63, 64, 65, 127, 128, 129, 300, 1100])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "full"])
def test_square_against_reference(device, dtype, precision, n, symmetric):
    fans_in, fans_out = [37, 64, 64], [64, 64, 1]
    scales = [0.7, 1.0, 1.3]
    A, D = _features(n, fans_in, fans_out, dtype, seed=n + 7 * symmetric, device=device)
    out = _gram(A, D, A, D, scales, symmetric, precision)
    assert out.shape == (n, n) and out.dtype == dtype and out.device == A[0].device
    assert _rel_err(out, _reference(A, D, A, D, scales)) <= tol(dtype, precision, device)
    if symmetric:
        assert torch.equal(out, out.T)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,precision", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("n1,n2", [(1, 1), (1, 200), (200, 1), (129, 77), (300, 257), (1030, 2100)])
def test_rectangular_against_reference(device, dtype, precision, n1, n2):
    fans_in, fans_out = [5, 33], [33, 1]
    scales = [1.0, 0.25]
    A1, D1 = _features(n1, fans_in, fans_out, dtype, seed=n1, device=device)
    A2, D2 = _features(n2, fans_in, fans_out, dtype, seed=n2 + 1, device=device)
    out = _gram(A1, D1, A2, D2, scales, False, precision)
    assert out.shape == (n1, n2)
    assert _rel_err(out, _reference(A1, D1, A2, D2, scales)) <= tol(dtype, precision, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,precision", MODES, ids=MODE_IDS)
def test_paper_sizes_fcnet_features(device, dtype, precision):
    from ntk_fast.models.fc import FCNet
    torch.manual_seed(0)
    net = FCNet(784, 1024, 3, dtype=dtype, device=device)
    x = torch.randn(700, 784, dtype=dtype, device=device)
    A, D = net.features(x)
    scales = [1.0] * len(A)
    out = torch.ops.ntk_fast.gram(A, D, None, None, scales, 0, precision)
    assert _rel_err(out, _reference(A, D, A, D, scales)) <= tol(dtype, precision, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,precision", MODES, ids=MODE_IDS)
def test_feature_dim_one_and_odd_widths(device, dtype, precision):
    A, D = _features(150, [1, 3, 5, 784], [1, 7, 1, 2], dtype, seed=11, nonneg_a=False, device=device)
    scales = [1.0, -0.5, 2.0, 1.0]
    out = _gram(A, D, A, D, scales, True, precision)
    assert _rel_err(out, _reference(A, D, A, D, scales)) <= tol(dtype, precision, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,precision", MODES, ids=MODE_IDS)
def test_symmetric_equals_nonsymmetric(device, dtype, precision):
    A, D = _features(517, [40, 64], [64, 1], dtype, seed=3, device=device)
    sym = _gram(A, D, A, D, [1.0, 2.0], True, precision)
    full = _gram(A, D, A, D, [1.0, 2.0], False, precision)
    assert torch.equal(sym, sym.T)
    # Same tiles, same arithmetic: the upper triangles agree bit for bit.
    assert torch.equal(sym.triu(), full.triu())
    ref = _reference(A, D, A, D, [1.0, 2.0])
    assert _rel_err(sym, ref) <= tol(dtype, precision, device)
    assert _rel_err(full, ref) <= tol(dtype, precision, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,precision", MODES, ids=MODE_IDS)
def test_more_layers_than_one_launch(device, dtype, precision):
    # The kernel takes 16 layers per launch; the rest accumulate into out in further launches.
    L = 21
    A, D = _features(200, [9] * L, [4] * L, dtype, seed=21, device=device)
    scales = [1.0 / (l + 1) for l in range(L)]
    for symmetric in (True, False):
        out = _gram(A, D, A, D, scales, symmetric, precision)
        assert _rel_err(out, _reference(A, D, A, D, scales)) <= tol(dtype, precision, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,precision", MODES, ids=MODE_IDS)
def test_noncontiguous_and_misaligned_inputs(device, dtype, precision):
    n = 211
    g = torch.Generator(device="cpu").manual_seed(5)
    base = [torch.randn(n, 2 * 48 + 1, generator=g, dtype=torch.float64).to(device, dtype) for _ in range(4)]
    A = [base[0][:, ::2],                       # strided columns
         base[1][:, 1:49]]                      # storage offset of one element: not 16-byte aligned
    D = [base[2][:, :48].t().contiguous().t(),  # column-major
         base[3][:, 3:4]]                       # one column, offset
    assert not any(t.is_contiguous() for t in A + D[:1])
    scales = [1.0, 3.0]
    ref = _reference(A, D, A, D, scales)
    for symmetric in (True, False):
        out = _gram(A, D, A, D, scales, symmetric, precision)
        assert _rel_err(out, ref) <= tol(dtype, precision, device)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_out(device):
    A, D = _features(190, [30, 64], [64, 1], torch.float64, seed=8, device=device)
    ref = _reference(A, D, A, D, [1.0, 1.0])
    big = torch.full((190, 380), float("nan"), dtype=torch.float64, device=device)
    torch.ops.ntk_fast.gram.out(A, D, None, None, [1.0, 1.0], 0, "highest", out=big[:, 1::2])
    assert _rel_err(big[:, 1::2], ref) <= 1e-12
    assert torch.isnan(big[:, ::2]).all()
    outT = torch.full((190, 190), float("nan"), dtype=torch.float64, device=device).t()
    torch.ops.ntk_fast.gram.out(A, D, A, D, [1.0, 1.0], 0, "highest", out=outT)
    assert _rel_err(outT, ref) <= 1e-12


@pytest.mark.cuda
def test_empty_and_current_stream():
    A, D = _features(0, [3], [2], torch.float32, seed=1, device="cuda")
    assert torch.ops.ntk_fast.gram(A, D, None, None, [1.0]).shape == (0, 0)
    A, D = _features(300, [30, 64], [64, 1], torch.float32, seed=2, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out = torch.ops.ntk_fast.gram(A, D, None, None, [1.0, 1.0])
    torch.cuda.current_stream().wait_stream(s)
    assert _rel_err(out, _reference(A, D, A, D, [1.0, 1.0])) <= 1e-5


@pytest.mark.cuda
def test_devices_rejected_with_clear_errors():
    A, D = _features(20, [3, 4], [4, 1], torch.float32, seed=4, device="cuda")
    with pytest.raises(RuntimeError, match=r"d1\[1\] is on cpu but a1\[0\] is on cuda"):
        torch.ops.ntk_fast.gram(A, [D[0], D[1].cpu()], None, None, [1.0, 1.0])
    with pytest.raises(RuntimeError, match=r"d1\[0\] is on cuda:0 but a1\[0\] is on cpu"):
        torch.ops.ntk_fast.gram([a.cpu() for a in A], D, None, None, [1.0, 1.0])
    with pytest.raises(RuntimeError, match=r"out is on cuda"):
        torch.ops.ntk_fast.gram.out([a.cpu() for a in A], [d.cpu() for d in D], None, None, [1.0, 1.0], 0,
                                    "highest", out=torch.empty(20, 20, device="cuda"))
    with pytest.raises(RuntimeError, match=r"out is on cpu but the features are on cuda"):
        torch.ops.ntk_fast.gram.out(A, D, None, None, [1.0, 1.0], 0, "highest", out=torch.empty(20, 20))
    with pytest.raises(RuntimeError, match=r"precision"):
        torch.ops.ntk_fast.gram(A, D, None, None, [1.0, 1.0], 0, "fast")
    if torch.cuda.device_count() > 1:
        with pytest.raises(RuntimeError, match=r"a2\[0\] is on cuda:1"):
            torch.ops.ntk_fast.gram(A, D, [A[0].to("cuda:1"), A[1]], D, [1.0, 1.0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,precision", [(torch.float64, "highest"), (torch.float32, "tf32")], ids=["f64", "tf32"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "full"])
def test_streamed_into_cpu_out(device, dtype, precision, symmetric):
    n1, n2 = 1000, 770
    A1, D1 = _features(n1, [50, 64], [64, 1], dtype, seed=12, device=device)
    A2, D2 = (A1, D1) if symmetric else _features(n2, [50, 64], [64, 1], dtype, seed=13, device=device)
    ref = _reference(A1, D1, A2, D2, [1.0, 0.5]).cpu()
    out = torch.full((n1, n1 if symmetric else n2), float("nan"), dtype=dtype)
    gram_streamed(A1, D1, None if symmetric else A2, None if symmetric else D2, [1.0, 0.5], out,
                  panel_rows=128, precision=precision)
    assert _rel_err(out, ref) <= tol(dtype, precision, device)
    if symmetric:
        assert torch.equal(out, out.T)


@pytest.mark.parametrize("device", DEVICES)
def test_streamed_into_memmap(tmp_path, device):
    n = 900
    A, D = _features(n, [50, 64], [64, 1], torch.float32, seed=14, device=device)
    ref = _reference(A, D, A, D, [1.0, 1.0])
    path = tmp_path / "gram.npy"
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float64, shape=(n, n))
    gram_streamed(A, D, out=torch.from_numpy(mm), panel_rows=256)  # float32 features into a float64 file
    mm.flush()
    del mm
    back = torch.from_numpy(np.load(path)).to(device)
    assert _rel_err(back, ref) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_streamed_default_panels_and_device_out(device):
    A, D = _features(400, [50, 64], [64, 1], torch.float64, seed=15, device=device)
    ref = _reference(A, D, A, D, [1.0, 1.0])
    assert _rel_err(gram_streamed(A, D), ref) <= 1e-12
    out = torch.empty(400, 400, dtype=torch.float64, device=device)
    assert gram_streamed(A, D, out=out) is out
    assert _rel_err(out, ref) <= 1e-12


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,precision", MODES, ids=MODE_IDS)
def test_opcheck(device, dtype, precision):
    A, D = _features(70, [5, 9], [9, 1], dtype, seed=16, device=device)
    A2, D2 = _features(33, [5, 9], [9, 1], dtype, seed=17, device=device)
    torch.library.opcheck(torch.ops.ntk_fast.gram.default, (A, D, None, None, [1.0, 2.0], 0, precision))
    torch.library.opcheck(torch.ops.ntk_fast.gram.default, (A, D, A2, D2, [1.0, 2.0], 3, precision))
    out = torch.empty(70, 33, dtype=dtype, device=device)
    torch.library.opcheck(torch.ops.ntk_fast.gram.out, (A, D, A2, D2, [1.0, 2.0], 0, precision), {"out": out})


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        A, D = [torch.empty(7, 3, dtype=f64)], [torch.empty(7, 2, dtype=f64)]
        B, E = [torch.empty(5, 3, dtype=f64)], [torch.empty(5, 2, dtype=f64)]
        assert torch.ops.ntk_fast.gram(A, D, B, E, [1.0]).shape == (7, 5)
        assert torch.ops.ntk_fast.gram(A, D, None, None, [1.0]).shape == (7, 7)


@pytest.mark.parametrize("device", DEVICES)
def test_wrapper_compiles_fullgraph(device):
    """ntk_fast.gram (checks included) traces with torch.compile(fullgraph=True) and gives the eager values."""
    A, D = _features(40, [6, 5], [5, 1], torch.float64, seed=20, device=device)
    B, E = _features(23, [6, 5], [5, 1], torch.float64, seed=21, device=device)

    def f(A, D, B, E):
        return ntk_fast.gram(A, D, scales=[1.0, 0.5]) .sum() + ntk_fast.gram(A, D, B, E).sum()

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="eager")(A, D, B, E)
    torch.testing.assert_close(got, f(A, D, B, E), rtol=1e-12, atol=0)


def test_fakes_registered_at_import():
    """Every op's fake exists right after `import ntk_fast` (fresh interpreter), so tracing needs nothing else."""
    import subprocess
    import sys
    code = ("import torch, ntk_fast\n"
            "from torch._library.simple_registry import singleton\n"
            "for op in ('gram', 'gram_full', 'flow_step', 'flow_grad_stats', 'flow_loss', 'softplus_act', 'kernel_flow_step'):\n"
            "    assert singleton.find('ntk_fast::' + op).fake_impl.kernel is not None, op\n"
            "print('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,precision", MODES, ids=MODE_IDS)
def test_contiguous_but_misaligned_inputs(device, dtype, precision):
    """Contiguous tensors whose data pointer is not 16-byte aligned (``buf[1:].view(n, 48)``): .contiguous()
    hands them back as they are, so only the kernel's alignment check stands between them and a misaligned
    16-byte cp.async (the test above never reaches it: its tensors are copied by .contiguous())."""
    n, k = 150, 48
    g = torch.Generator(device="cpu").manual_seed(6)
    bufs = [torch.randn(n * k + 1, generator=g, dtype=torch.float64).to(device, dtype) for _ in range(4)]
    A = [bufs[0][1:].view(n, k), bufs[1][1:].view(n, k)]
    D = [bufs[2][1:].view(n, k), bufs[3][1:1 + n].view(n, 1)]
    for t in A + D:
        assert t.is_contiguous() and t.data_ptr() % 16 != 0
    scales = [1.0, 0.5]
    ref = _reference(A, D, A, D, scales)
    for symmetric in (True, False):
        out = _gram(A, D, A, D, scales, symmetric, precision)
        assert _rel_err(out, ref) <= tol(dtype, precision, device)


# Shared-memory limits of the GPU classes (bytes, opt-in per block); NTK_FAST_GRAM_SMEM_LIMIT makes a large GPU
# run the configurations chosen for the smaller ones (csrc/gram/gram_plan.h, docs/cuda.md).
SMEM_LIMITS = {"a100": 163 * 1024, "rtx-l4": 99 * 1024, "f64-2stage": 80 * 1024}  # each config once


@pytest.mark.cuda
@pytest.mark.parametrize("limit", sorted(SMEM_LIMITS))
@pytest.mark.parametrize("dtype,precision", MODES, ids=MODE_IDS)
def test_smaller_shared_memory_configurations(monkeypatch, limit, dtype, precision):
    monkeypatch.setenv("NTK_FAST_GRAM_SMEM_LIMIT", str(SMEM_LIMITS[limit]))
    A1, D1 = _features(300, [33, 64], [64, 1], dtype, seed=11, device="cuda")
    A2, D2 = _features(141, [33, 64], [64, 1], dtype, seed=12, device="cuda")
    scales = [1.0, 2.0]
    out = _gram(A1, D1, [], [], scales, True, precision)
    assert _rel_err(out, _reference(A1, D1, A1, D1, scales)) <= tol(dtype, precision, "cuda")
    assert torch.equal(out, out.T)
    out = _gram(A1, D1, A2, D2, scales, False, precision)
    assert _rel_err(out, _reference(A1, D1, A2, D2, scales)) <= tol(dtype, precision, "cuda")


@pytest.mark.cuda
def test_no_configuration_fits(monkeypatch):
    monkeypatch.setenv("NTK_FAST_GRAM_SMEM_LIMIT", str(32 * 1024))
    A, D = _features(10, [4], [4], torch.float32, seed=13, device="cuda")
    with pytest.raises(RuntimeError, match="no tile configuration"):
        _gram(A, D, [], [], [1.0], True, "highest")


# ------------------------------------------------------------------ issue 17: CUDA cases for the first GPU
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,precision", MODES, ids=MODE_IDS)
def test_symmetric_beyond_2048(device, dtype, precision):
    """Symmetric mode with n > 2048: 19 tiles of 128 per edge, three rows of 8 x 8 super tiles of the triangle
    (the last one partial), the diagonal tiles written from their upper half."""
    n = 2311
    A, D = _features(n, [9, 24], [24, 1], dtype, seed=23, device=device)
    scales = [1.0, 0.5]
    out = _gram(A, D, A, D, scales, True, precision)
    assert torch.equal(out, out.T)
    assert _rel_err(out, _reference(A, D, A, D, scales)) <= tol(dtype, precision, device)


def _sampled_rows_case(n1: int, n2: int, symmetric: bool, device: str) -> None:
    """float32 Gram of n1 x n2 entries checked on sampled rows against the float64 reference of those rows:
    the first and last rows and the rows where the flat offset row * n2 crosses 2^31 (when it does)."""
    fans_in, fans_out, scales = [5, 16], [16, 1], [1.0, 0.5]
    A1, D1 = _features(n1, fans_in, fans_out, torch.float32, seed=31, device=device)
    A2, D2 = (A1, D1) if symmetric else _features(n2, fans_in, fans_out, torch.float32, seed=32, device=device)
    out = torch.ops.ntk_fast.gram(A1, D1, None if symmetric else A2, None if symmetric else D2, scales, 0, "highest")
    assert out.shape == (n1, n2) and out.device == A1[0].device
    cross = (2 ** 31) // n2
    rows = sorted({0, 1, n1 // 2, n1 - 2, n1 - 1} | ({cross - 1, cross, cross + 1} if cross < n1 else set()))
    rows = torch.tensor(rows)
    pick = lambda ts, idx: [t.cpu()[idx].double() for t in ts]   # noqa: E731
    ref = gram_reference(pick(A1, rows), pick(D1, rows), pick(A2, slice(None)), pick(D2, slice(None)), scales)
    got = out[rows.to(out.device)].cpu().double()
    assert _rel_err(got, ref) <= 1e-5
    if symmetric:   # the mirrored half: columns `rows` equal rows `rows`, bit for bit
        assert torch.equal(out[:, rows.to(out.device)].T.cpu(), out[rows.to(out.device)].cpu())


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "full"])
def test_sampled_rows_check_small(symmetric):
    """The sampled-row check of the next test, at a size the CPU runs in CI."""
    _sampled_rows_case(301, 301 if symmetric else 177, symmetric, "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "full"])
def test_more_than_2_31_entries(symmetric):
    """n1 n2 > 2^31 (64-bit output offsets): an 8.6 GB float32 Gram, checked on sampled rows."""
    n1, n2 = (46349, 46349) if symmetric else (65539, 32771)
    assert n1 * n2 > 2 ** 31
    _sampled_rows_case(n1, n2, symmetric, "cuda")
    torch.cuda.empty_cache()


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("dtype,precision", MODES, ids=MODE_IDS)
def test_second_device_while_current_is_0(dtype, precision):
    """Features on cuda:1 while cuda:0 is current: the op runs on cuda:1 (its tensors' device), on cuda:1's
    current stream, and leaves the current device alone; streamed panels too."""
    torch.cuda.set_device(0)
    A1, D1 = _features(300, [33, 64], [64, 1], dtype, seed=41, device="cuda:1")
    A2, D2 = _features(141, [33, 64], [64, 1], dtype, seed=42, device="cuda:1")
    scales = [1.0, 2.0]
    for symmetric in (True, False):
        out = _gram(A1, D1, A2, D2, scales, symmetric, precision)
        assert out.device == torch.device("cuda:1")
        want = _reference(A1, D1, A1, D1, scales) if symmetric else _reference(A1, D1, A2, D2, scales)
        assert _rel_err(out, want) <= tol(dtype, precision, "cuda")
    host = gram_streamed(A1, D1, None, None, scales, panel_rows=128, precision=precision)
    assert _rel_err(host, _reference(A1, D1, A1, D1, scales).cpu()) <= tol(dtype, precision, "cuda")
    assert torch.cuda.current_device() == 0
