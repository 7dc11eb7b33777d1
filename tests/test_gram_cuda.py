"""The CUDA kernel of torch.ops.ntk_fast.gram against a float64 reference (skipped without a GPU).

Tolerances, relative to max |ref|: float64 1e-12, float32 1e-5, tf32 5e-3 (docs/cuda.md derives the
bounds).  The reference is computed in float64 from the same (upcast) inputs.
"""
import importlib

import numpy as np
import pytest
import torch

import ntk_fast._C  # noqa: F401  (registers the ops)

try:  # the package's fake (meta) registrations, where they exist
    importlib.import_module("ntk_fast.ops.gram")
except ImportError:
    pass

from ntk_fast.ntk.stream import gram_streamed

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TOL = {(torch.float64, "highest"): 1e-12, (torch.float32, "highest"): 1e-5, (torch.float32, "tf32"): 5e-3}
MODES = [(torch.float64, "highest"), (torch.float32, "highest"), (torch.float32, "tf32")]
MODE_IDS = ["f64", "f32", "tf32"]


def _features(n, fans_in, fans_out, dtype, seed, nonneg_a=True, device="cuda"):
    g = torch.Generator(device="cpu").manual_seed(seed)
    A = [torch.randn(n, f, generator=g, dtype=torch.float64) for f in fans_in]
    if nonneg_a:  # like post-activation inputs
        A = [a.abs() for a in A]
    D = [torch.randn(n, f, generator=g, dtype=torch.float64) for f in fans_out]
    return [a.to(device, dtype) for a in A], [d.to(device, dtype) for d in D]


def _reference(A1, D1, A2, D2, scales):
    out = None
    for a1, d1, a2, d2, s in zip(A1, D1, A2, D2, scales):
        a1, d1, a2, d2 = (t.to("cuda", torch.float64) for t in (a1, d1, a2, d2))
        term = s * (a1 @ a2.T) * (d1 @ d2.T)
        out = term if out is None else out + term
    return out


def _rel_err(out, ref):
    out = out.to(ref.device, torch.float64)
    assert not torch.isnan(out).any(), "NaN in the output (unwritten element?)"
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


def _gram(A1, D1, A2, D2, scales, symmetric, precision, poison=True):
    n1, n2 = A1[0].shape[0], (A1 if symmetric else A2)[0].shape[0]
    out = torch.full((n1, n2), float("nan"), dtype=A1[0].dtype, device=A1[0].device)
    torch.ops.ntk_fast.gram_out(A1, D1, [] if symmetric else A2, [] if symmetric else D2, scales, symmetric,
                                0, precision, out)
    return out


@pytest.mark.parametrize("dtype,precision", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("n", [1, 2, 63, 64, 65, 127, 128, 129, 300, 1100])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "full"])
def test_square_against_reference(dtype, precision, n, symmetric):
    fans_in, fans_out = [37, 64, 64], [64, 64, 1]
    scales = [0.7, 1.0, 1.3]
    A, D = _features(n, fans_in, fans_out, dtype, seed=n + 7 * symmetric)
    out = _gram(A, D, A, D, scales, symmetric, precision)
    assert out.shape == (n, n) and out.dtype == dtype and out.device == A[0].device
    assert _rel_err(out, _reference(A, D, A, D, scales)) <= TOL[(dtype, precision)]
    if symmetric:
        assert torch.equal(out, out.T)


@pytest.mark.parametrize("dtype,precision", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("n1,n2", [(1, 1), (1, 200), (200, 1), (129, 77), (300, 257), (1030, 2100)])
def test_rectangular_against_reference(dtype, precision, n1, n2):
    fans_in, fans_out = [5, 33], [33, 1]
    scales = [1.0, 0.25]
    A1, D1 = _features(n1, fans_in, fans_out, dtype, seed=n1)
    A2, D2 = _features(n2, fans_in, fans_out, dtype, seed=n2 + 1)
    out = _gram(A1, D1, A2, D2, scales, False, precision)
    assert out.shape == (n1, n2)
    assert _rel_err(out, _reference(A1, D1, A2, D2, scales)) <= TOL[(dtype, precision)]


@pytest.mark.parametrize("dtype,precision", MODES, ids=MODE_IDS)
def test_paper_sizes_fcnet_features(dtype, precision):
    from ntk_fast.models.fc import FCNet
    torch.manual_seed(0)
    net = FCNet(784, 1024, 3, dtype=dtype, device="cuda")
    x = torch.randn(700, 784, dtype=dtype, device="cuda")
    A, D = net.features(x)
    scales = [1.0] * len(A)
    out = torch.ops.ntk_fast.gram(A, D, [], [], scales, True, 0, precision)
    assert _rel_err(out, _reference(A, D, A, D, scales)) <= TOL[(dtype, precision)]


@pytest.mark.parametrize("dtype,precision", MODES, ids=MODE_IDS)
def test_feature_dim_one_and_odd_widths(dtype, precision):
    A, D = _features(150, [1, 3, 5, 784], [1, 7, 1, 2], dtype, seed=11, nonneg_a=False)
    scales = [1.0, -0.5, 2.0, 1.0]
    out = _gram(A, D, A, D, scales, True, precision)
    assert _rel_err(out, _reference(A, D, A, D, scales)) <= TOL[(dtype, precision)]


@pytest.mark.parametrize("dtype,precision", MODES, ids=MODE_IDS)
def test_symmetric_equals_nonsymmetric(dtype, precision):
    A, D = _features(517, [40, 64], [64, 1], dtype, seed=3)
    sym = _gram(A, D, A, D, [1.0, 2.0], True, precision)
    full = _gram(A, D, A, D, [1.0, 2.0], False, precision)
    assert torch.equal(sym, sym.T)
    # Same tiles, same arithmetic: the upper triangles agree bit for bit.
    assert torch.equal(sym.triu(), full.triu())
    ref = _reference(A, D, A, D, [1.0, 2.0])
    assert _rel_err(sym, ref) <= TOL[(dtype, precision)]
    assert _rel_err(full, ref) <= TOL[(dtype, precision)]


@pytest.mark.parametrize("dtype,precision", MODES, ids=MODE_IDS)
def test_more_layers_than_one_launch(dtype, precision):
    # The kernel takes 16 layers per launch; the rest accumulate into out in further launches.
    L = 21
    A, D = _features(200, [9] * L, [4] * L, dtype, seed=21)
    scales = [1.0 / (l + 1) for l in range(L)]
    for symmetric in (True, False):
        out = _gram(A, D, A, D, scales, symmetric, precision)
        assert _rel_err(out, _reference(A, D, A, D, scales)) <= TOL[(dtype, precision)]


@pytest.mark.parametrize("dtype,precision", MODES, ids=MODE_IDS)
def test_noncontiguous_and_misaligned_inputs(dtype, precision):
    n = 211
    g = torch.Generator(device="cpu").manual_seed(5)
    base = [torch.randn(n, 2 * 48 + 1, generator=g, dtype=torch.float64).to("cuda", dtype) for _ in range(4)]
    A = [base[0][:, ::2],                       # strided columns
         base[1][:, 1:49]]                      # storage offset of one element: not 16-byte aligned
    D = [base[2][:, :48].t().contiguous().t(),  # column-major
         base[3][:, 3:4]]                       # one column, offset
    assert not any(t.is_contiguous() for t in A + D[:1])
    scales = [1.0, 3.0]
    ref = _reference(A, D, A, D, scales)
    for symmetric in (True, False):
        out = _gram(A, D, A, D, scales, symmetric, precision)
        assert _rel_err(out, ref) <= TOL[(dtype, precision)]


@pytest.mark.parametrize("dtype,precision", MODES, ids=MODE_IDS)
def test_contiguous_but_misaligned_inputs(dtype, precision):
    """Contiguous tensors whose data pointer is not 16-byte aligned (``buf[1:].view(n, 48)``): .contiguous()
    hands them back as they are, so only the kernel's alignment check stands between them and a misaligned
    16-byte cp.async (the test above never reaches it: its tensors are copied by .contiguous())."""
    n, k = 150, 48
    g = torch.Generator(device="cpu").manual_seed(6)
    bufs = [torch.randn(n * k + 1, generator=g, dtype=torch.float64).to("cuda", dtype) for _ in range(4)]
    A = [bufs[0][1:].view(n, k), bufs[1][1:].view(n, k)]
    D = [bufs[2][1:].view(n, k), bufs[3][1:1 + n].view(n, 1)]
    for t in A + D:
        assert t.is_contiguous() and t.data_ptr() % 16 != 0
    scales = [1.0, 0.5]
    ref = _reference(A, D, A, D, scales)
    for symmetric in (True, False):
        out = _gram(A, D, A, D, scales, symmetric, precision)
        assert _rel_err(out, ref) <= TOL[(dtype, precision)]


def test_strided_out():
    A, D = _features(190, [30, 64], [64, 1], torch.float64, seed=8)
    ref = _reference(A, D, A, D, [1.0, 1.0])
    big = torch.full((190, 380), float("nan"), dtype=torch.float64, device="cuda")
    torch.ops.ntk_fast.gram_out(A, D, [], [], [1.0, 1.0], True, 0, "highest", big[:, 1::2])
    assert _rel_err(big[:, 1::2], ref) <= 1e-12
    assert torch.isnan(big[:, ::2]).all()
    outT = torch.full((190, 190), float("nan"), dtype=torch.float64, device="cuda").t()
    torch.ops.ntk_fast.gram_out(A, D, A, D, [1.0, 1.0], False, 0, "highest", outT)
    assert _rel_err(outT, ref) <= 1e-12


def test_empty_and_current_stream():
    A, D = _features(0, [3], [2], torch.float32, seed=1)
    assert torch.ops.ntk_fast.gram(A, D, [], [], [1.0], True).shape == (0, 0)
    A, D = _features(300, [30, 64], [64, 1], torch.float32, seed=2)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out = torch.ops.ntk_fast.gram(A, D, [], [], [1.0, 1.0], True)
    torch.cuda.current_stream().wait_stream(s)
    assert _rel_err(out, _reference(A, D, A, D, [1.0, 1.0])) <= 1e-5


def test_devices_rejected_with_clear_errors():
    A, D = _features(20, [3, 4], [4, 1], torch.float32, seed=4)
    with pytest.raises(RuntimeError, match=r"d1\[1\] is on cpu but a1\[0\] is on cuda"):
        torch.ops.ntk_fast.gram(A, [D[0], D[1].cpu()], [], [], [1.0, 1.0], True)
    with pytest.raises(RuntimeError, match=r"d1\[0\] is on cuda:0 but a1\[0\] is on cpu"):
        torch.ops.ntk_fast.gram([a.cpu() for a in A], D, [], [], [1.0, 1.0], True)
    with pytest.raises(RuntimeError, match=r"out is on cuda"):
        torch.ops.ntk_fast.gram_out([a.cpu() for a in A], [d.cpu() for d in D], [], [], [1.0, 1.0], True, 0,
                                    "highest", torch.empty(20, 20, device="cuda"))
    with pytest.raises(RuntimeError, match=r"out is on cpu but the features are on cuda"):
        torch.ops.ntk_fast.gram_out(A, D, [], [], [1.0, 1.0], True, 0, "highest", torch.empty(20, 20))
    with pytest.raises(RuntimeError, match=r"precision"):
        torch.ops.ntk_fast.gram(A, D, [], [], [1.0, 1.0], True, 0, "fast")
    if torch.cuda.device_count() > 1:
        with pytest.raises(RuntimeError, match=r"a2\[0\] is on cuda:1"):
            torch.ops.ntk_fast.gram(A, D, [A[0].to("cuda:1"), A[1]], D, [1.0, 1.0], False)


@pytest.mark.parametrize("dtype,precision", [(torch.float64, "highest"), (torch.float32, "tf32")], ids=["f64", "tf32"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "full"])
def test_streamed_into_cpu_out(dtype, precision, symmetric):
    n1, n2 = 1000, 770
    A1, D1 = _features(n1, [50, 64], [64, 1], dtype, seed=12)
    A2, D2 = (A1, D1) if symmetric else _features(n2, [50, 64], [64, 1], dtype, seed=13)
    ref = _reference(A1, D1, A2, D2, [1.0, 0.5]).cpu()
    out = torch.full((n1, n1 if symmetric else n2), float("nan"), dtype=dtype)
    gram_streamed(A1, D1, None if symmetric else A2, None if symmetric else D2, [1.0, 0.5], out,
                  panel_rows=128, precision=precision)
    assert _rel_err(out, ref.cuda()) <= TOL[(dtype, precision)]
    if symmetric:
        assert torch.equal(out, out.T)


def test_streamed_into_memmap(tmp_path):
    n = 900
    A, D = _features(n, [50, 64], [64, 1], torch.float32, seed=14)
    ref = _reference(A, D, A, D, [1.0, 1.0])
    path = tmp_path / "gram.npy"
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float64, shape=(n, n))
    gram_streamed(A, D, out=torch.from_numpy(mm), panel_rows=256)  # float32 features into a float64 file
    mm.flush()
    del mm
    back = torch.from_numpy(np.load(path)).cuda()
    assert _rel_err(back, ref) <= 1e-5


def test_streamed_default_panels_and_cuda_out():
    A, D = _features(400, [50, 64], [64, 1], torch.float64, seed=15)
    ref = _reference(A, D, A, D, [1.0, 1.0])
    assert _rel_err(gram_streamed(A, D), ref) <= 1e-12
    out = torch.empty(400, 400, dtype=torch.float64, device="cuda")
    assert gram_streamed(A, D, out=out) is out
    assert _rel_err(out, ref) <= 1e-12


def _fake_registered(name):
    try:
        from torch._library.simple_registry import singleton
        return singleton.find(name).fake_impl.kernel is not None
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.parametrize("dtype,precision", MODES, ids=MODE_IDS)
def test_opcheck_schema_and_autograd(dtype, precision):
    A, D = _features(70, [5, 9], [9, 1], dtype, seed=16)
    A2, D2 = _features(33, [5, 9], [9, 1], dtype, seed=17)
    utils = ("test_schema", "test_autograd_registration")
    torch.library.opcheck(torch.ops.ntk_fast.gram.default, (A, D, [], [], [1.0, 2.0], True, 0, precision),
                          test_utils=utils)
    torch.library.opcheck(torch.ops.ntk_fast.gram.default, (A, D, A2, D2, [1.0, 2.0], False, 0, precision),
                          test_utils=utils)
    out = torch.empty(70, 33, dtype=dtype, device="cuda")
    torch.library.opcheck(torch.ops.ntk_fast.gram_out.default,
                          (A, D, A2, D2, [1.0, 2.0], False, 0, precision, out), test_utils=utils)


@pytest.mark.skipif(not _fake_registered("ntk_fast::gram"), reason="no fake (meta) kernel registered for ntk_fast::gram")
@pytest.mark.parametrize("dtype,precision", MODES, ids=MODE_IDS)
def test_opcheck_full(dtype, precision):
    A, D = _features(70, [5, 9], [9, 1], dtype, seed=18)
    A2, D2 = _features(33, [5, 9], [9, 1], dtype, seed=19)
    torch.library.opcheck(torch.ops.ntk_fast.gram.default, (A, D, [], [], [1.0, 2.0], True, 0, precision))
    torch.library.opcheck(torch.ops.ntk_fast.gram.default, (A, D, A2, D2, [1.0, 2.0], False, 0, precision))
    out = torch.empty(70, 33, dtype=dtype, device="cuda")
    torch.library.opcheck(torch.ops.ntk_fast.gram_out.default, (A, D, A2, D2, [1.0, 2.0], False, 0, precision, out))


# Shared-memory limits of the GPU classes (bytes, opt-in per block); NTK_FAST_GRAM_SMEM_LIMIT makes a large GPU
# run the configurations chosen for the smaller ones (csrc/gram/gram_plan.h, docs/cuda.md).
SMEM_LIMITS = {"a100": 163 * 1024, "rtx-l4": 99 * 1024, "f64-2stage": 80 * 1024}  # each config once


@pytest.mark.parametrize("limit", sorted(SMEM_LIMITS))
@pytest.mark.parametrize("dtype,precision", MODES, ids=MODE_IDS)
def test_smaller_shared_memory_configurations(monkeypatch, limit, dtype, precision):
    monkeypatch.setenv("NTK_FAST_GRAM_SMEM_LIMIT", str(SMEM_LIMITS[limit]))
    A1, D1 = _features(300, [33, 64], [64, 1], dtype, seed=11)
    A2, D2 = _features(141, [33, 64], [64, 1], dtype, seed=12)
    scales = [1.0, 2.0]
    out = _gram(A1, D1, [], [], scales, True, precision)
    assert _rel_err(out, _reference(A1, D1, A1, D1, scales)) <= TOL[(dtype, precision)]
    assert torch.equal(out, out.T)
    out = _gram(A1, D1, A2, D2, scales, False, precision)
    assert _rel_err(out, _reference(A1, D1, A2, D2, scales)) <= TOL[(dtype, precision)]


def test_no_configuration_fits(monkeypatch):
    monkeypatch.setenv("NTK_FAST_GRAM_SMEM_LIMIT", str(32 * 1024))
    A, D = _features(10, [4], [4], torch.float32, seed=13)
    with pytest.raises(RuntimeError, match="no tile configuration"):
        _gram(A, D, [], [], [1.0], True, "highest")
