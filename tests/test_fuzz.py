"""Issue 18: property-based tests (hypothesis) of the public entry points on odd inputs.

Every call either returns the right answer (checked against the plain-torch reference) or raises a ValueError /
TypeError (or MemoryBudgetError) whose message names the bad argument: never a crash, a hang or a raw internal
error.  Inputs: shapes including 0 and 1, float32/float64/int, non-contiguous (strided) tensors, NaN/inf placed
anywhere, mismatched dtypes between arguments, labels outside {-1, +1}, ``out`` of every wrong kind.
Each test is bounded (max_examples) so the file runs in about half a minute.
"""
import os
import re

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from ntk_fast import FCNet, empirical_ntk, gram, kernel_flow, kernel_regression  # noqa: E402
from ntk_fast.guards import MemoryBudgetError  # noqa: E402
from ntk_fast.ops.reference import gram_reference, jacobian_ntk_reference  # noqa: E402

# Derandomized by default, so that the suite (and CI) sees the same examples every run; NTK_FAST_FUZZ_RANDOM=1 draws
# fresh ones (and NTK_FAST_FUZZ_EXAMPLES more of them) when hunting for bugs.
SETTINGS = dict(max_examples=int(os.environ.get("NTK_FAST_FUZZ_EXAMPLES", "40")), deadline=None, database=None,
                derandomize=os.environ.get("NTK_FAST_FUZZ_RANDOM", "0") != "1",
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = st.sampled_from([torch.float64, torch.float32])
BAD = st.sampled_from([float("nan"), float("inf"), -float("inf")])
OK_ERRORS = (ValueError, TypeError, MemoryBudgetError)


def tensor(draw, shape, dtype, strided):
    """A random tensor of ``shape``; strided: a non-contiguous view (every other column of a wider tensor)."""
    seed = draw(st.integers(0, 2 ** 31 - 1))
    g = torch.Generator().manual_seed(seed)
    if strided and len(shape) == 2:
        return torch.randn(shape[0], 2 * shape[1] + 1, generator=g, dtype=torch.float64)[:, 1::2].to(dtype)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def poison(draw, t):
    """t with one entry set to NaN/inf (t must be non-empty); returns a fresh tensor."""
    t = t.clone()
    flat = t.view(-1) if t.is_contiguous() else None
    i = draw(st.integers(0, t.numel() - 1))
    idx = np.unravel_index(i, tuple(t.shape))
    t[tuple(int(j) for j in idx)] = draw(BAD)
    return t if flat is not None else t


def expect_error_naming(fn, names):
    """fn() must raise an accepted error whose message mentions one of ``names``."""
    with pytest.raises(OK_ERRORS) as info:
        fn()
    msg = str(info.value)
    assert any(re.search(rf"(?<!\w){re.escape(n)}(?!\w)", msg) for n in names), (names, msg)


def tol(dtype):
    return dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------------------------ gram
@settings(**SETTINGS)
@given(st.data())
def test_fuzz_gram(data):
    draw = data.draw
    dtype = draw(DTYPES)
    L = draw(st.integers(1, 3))
    n1, n2 = draw(st.integers(0, 6)), draw(st.integers(0, 6))
    sym = draw(st.booleans())
    ps = [draw(st.integers(1, 5)) for _ in range(L)]
    qs = [draw(st.integers(1, 5)) for _ in range(L)]
    strided = draw(st.booleans())
    args = {"a1": [tensor(draw, (n1, p), dtype, strided) for p in ps],
            "d1": [tensor(draw, (n1, q), dtype, strided) for q in qs]}
    if not sym:
        args["a2"] = [tensor(draw, (n2, p), dtype, strided) for p in ps]
        args["d2"] = [tensor(draw, (n2, q), dtype, strided) for q in qs]
    m2 = n1 if sym else n2
    fault = draw(st.sampled_from(["none", "nonfinite", "dtype", "out_shape", "out_dtype", "out_kind", "rows",
                                  "layers", "out_ok", "scales"]))
    kwargs = {}
    bad = None
    if fault == "nonfinite" and n1 > 0:
        which = draw(st.sampled_from(["a1", "d1"]))
        l = draw(st.integers(0, L - 1))
        args[which][l] = poison(draw, args[which][l])
        bad = [f"{which}[{l}]"]
    elif fault == "dtype":
        which = draw(st.sampled_from(sorted(args)))
        l = draw(st.integers(0, L - 1))
        other = torch.float32 if dtype == torch.float64 else torch.float64
        if which == "a1" and l == 0:
            args["d1"][0] = args["d1"][0].to(other)
            which = "d1"
        else:
            args[which][l] = args[which][l].to(other)
        bad = [f"{which}[{l}]"]
    elif fault == "rows" and n1 > 0:
        args["d1"][0] = args["d1"][0][:-1]
        bad = ["d1[0]"]
    elif fault == "layers" and L > 1:
        args["d1"] = args["d1"][:-1]
        bad = ["d1"]
    elif fault == "out_shape":
        kwargs["out"] = torch.empty(n1 + 1, m2, dtype=dtype)
        bad = ["out"]
    elif fault == "out_dtype":
        kwargs["out"] = torch.empty(n1, m2, dtype=torch.float32 if dtype == torch.float64 else torch.float64)
        bad = ["out"]
    elif fault == "out_kind":
        kwargs["out"] = draw(st.sampled_from([np.zeros((n1, m2)), [[0.0] * m2] * n1, "out", 3]))
        bad = ["out"]
    elif fault == "scales":
        kwargs["scales"] = [draw(BAD)] + [1.0] * (L - 1)
        bad = ["scales"]
    elif fault == "out_ok":
        kwargs["out"] = torch.full((n1, m2), 7.0, dtype=dtype)
    call = lambda: gram(args["a1"], args["d1"], args.get("a2"), args.get("d2"), **kwargs)   # noqa: E731
    if bad is not None:
        expect_error_naming(call, bad)
        return
    res = call()
    ref = gram_reference([a.double() for a in args["a1"]], [d.double() for d in args["d1"]],
                         None if sym else [a.double() for a in args["a2"]],
                         None if sym else [d.double() for d in args["d2"]])
    assert res.shape == (n1, m2) and res.dtype == dtype
    if ref is not None and res.numel():
        torch.testing.assert_close(res.double(), ref, **tol(dtype))
    if "out" in kwargs:
        assert res is kwargs["out"]


# ------------------------------------------------------------------------------------------------ kernel_regression
def psd(draw, n, dtype, strided):
    A = tensor(draw, (n, n + 3), torch.float64, False)
    K = A @ A.t() / (n + 3) + 0.5 * torch.eye(n, dtype=torch.float64)
    if strided:
        K = torch.cat([K, K], dim=1)[:, ::2] * 0 + K    # same values, non-contiguous storage
        K = torch.stack([K, K], dim=-1)[..., 0]
    return K.to(dtype)


@settings(**SETTINGS)
@given(st.data())
def test_fuzz_kernel_regression(data):
    draw = data.draw
    dtype = draw(DTYPES)
    n = draw(st.integers(0, 6))
    E = draw(st.sampled_from([None, 1, 3]))
    m = draw(st.integers(0, 4))
    K = psd(draw, n, dtype, draw(st.booleans()))
    y = tensor(draw, (n,) if E is None else (E, n), draw(DTYPES), False)
    Kt = tensor(draw, (m, n), dtype, draw(st.booleans())) if draw(st.booleans()) else None
    ridge = draw(st.sampled_from([0.0, 0.1, 1.0]))
    fault = draw(st.sampled_from(["none", "nonfinite_K", "nonfinite_y", "nonfinite_Kt", "ridge", "K_shape",
                                  "K_int", "y_shape", "Kt_shape", "K_kind", "indefinite"]))
    bad = None
    if n == 0:
        bad = ["K"]
    elif fault == "nonfinite_K":
        K = poison(draw, K)
        K = (K + K.t()) / 2 if draw(st.booleans()) else K
        bad = ["K"]
    elif fault == "nonfinite_y":
        y, bad = poison(draw, y), ["y"]
    elif fault == "nonfinite_Kt" and Kt is not None and Kt.numel():
        Kt, bad = poison(draw, Kt), ["K_test"]
    elif fault == "ridge":
        ridge, bad = draw(st.sampled_from([-1.0, float("nan"), float("inf")])), ["ridge"]
    elif fault == "K_shape":
        K, bad = K[:, :-1], ["K"]
    elif fault == "K_int":
        K, bad = K.to(torch.int64), ["K"]
    elif fault == "y_shape":
        y, bad = torch.zeros(n + 1, dtype=dtype), ["y"]
    elif fault == "Kt_shape":
        Kt, bad = torch.zeros(2, n + 1, dtype=dtype), ["K_test"]
    elif fault == "K_kind":
        K, bad = K.tolist(), ["K"]
    elif fault == "indefinite":
        K, bad = K - 2.0 * K.diagonal().max() * torch.eye(n, dtype=dtype), ["K"]
    call = lambda: kernel_regression(K, y, ridge=ridge, K_test=Kt)   # noqa: E731
    if bad is not None:
        expect_error_naming(call, bad)
        return
    r = call()
    A = K.double() + ridge * torch.eye(n, dtype=torch.float64)
    coef = torch.linalg.solve(A, y.double().reshape(-1, n).t()).t().reshape(y.shape)
    torch.testing.assert_close(r.coef.double(), coef, **tol(dtype))
    assert r.status == "solved" and r.coef.dtype == dtype
    if Kt is not None:
        torch.testing.assert_close(r.F_test.double(), coef @ Kt.double().t(), **tol(dtype))


# ------------------------------------------------------------------------------------------------ kernel_flow
@settings(**SETTINGS)
@given(st.data())
def test_fuzz_kernel_flow(data):
    draw = data.draw
    dtype = draw(DTYPES)
    n = draw(st.integers(1, 6))
    E = draw(st.sampled_from([None, 2]))
    K = psd(draw, n, dtype, draw(st.booleans()))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,) if E is None else (E, n), generator=g).to(dtype) * 2 - 1
    loss = draw(st.sampled_from(["softhinge", "qhinge", "hinge", "mse"]))
    fault = draw(st.sampled_from(["none", "nonfinite_K", "nonfinite_y", "labels", "negative", "K_shape", "loss",
                                  "y_dtype", "K_kind", "max_dout"]))
    kw = dict(loss=loss, max_steps=60, progress=False)
    bad = None
    if fault == "nonfinite_K":
        K, bad = poison(draw, K), ["K_train"]
    elif fault == "nonfinite_y":
        y, bad = poison(draw, y), ["y"]
    elif fault == "labels" and loss != "mse":
        y = y.clone()
        y.view(-1)[draw(st.integers(0, y.numel() - 1))] = draw(st.sampled_from([0.0, 0.5, 2.0, -3.0]))
        bad = ["y"]
    elif fault == "negative":
        K, bad = -K, ["K_train"]
    elif fault == "K_shape":
        K, bad = K[:, :max(1, n - 1)] if n > 1 else K.reshape(1, 1, 1, 1), ["K_train"]
    elif fault == "loss":
        kw["loss"], bad = "crossentropy", ["loss"]
    elif fault == "y_dtype":
        y, bad = y.to(torch.int64), ["y"]
    elif fault == "K_kind":
        K, bad = K.tolist(), ["K_train"]    # (a numpy array is a valid K_train: read by row blocks)
    elif fault == "max_dout":
        kw["max_dout"], bad = draw(st.sampled_from([0.0, -1.0, float("nan")])), ["max_dout"]
    call = lambda: kernel_flow(K, y, **kw)   # noqa: E731
    if bad is not None:
        expect_error_naming(call, bad)
        return
    r = call()
    assert r.status in ("converged", "max_steps", "stalled")
    F = r.F_train
    c = r.c
    torch.testing.assert_close(F.double(), -(c.double() @ K.double()), **tol(dtype))   # F = -Theta c
    Y = y.reshape(-1, n).double()
    for e, s in enumerate(r.statuses):
        if s == "converged":
            assert float((Y[e] * F[e].double()).min()) >= 1.0 - 1e-6


# ------------------------------------------------------------------------------------------------ empirical_ntk
@settings(**dict(SETTINGS, max_examples=25))
@given(st.data())
def test_fuzz_empirical_ntk(data):
    draw = data.draw
    dtype = draw(DTYPES)
    d, k = draw(st.integers(1, 4)), draw(st.integers(1, 2))
    net = FCNet(d, 5, 1, k=k, dtype=dtype, generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    n1 = draw(st.integers(0, 5))
    x1 = tensor(draw, (n1, d), dtype, draw(st.booleans()))
    x2 = tensor(draw, (draw(st.integers(1, 4)), d), dtype, False) if draw(st.booleans()) else None
    mode = draw(st.sampled_from(["full", "trace"]))
    fault = draw(st.sampled_from(["none", "nonfinite", "dtype", "shape", "out_shape", "out_dtype", "out_kind",
                                  "block", "mode"]))
    kw = dict(mode=mode)
    bad = None
    n2 = n1 if x2 is None else x2.shape[0]
    shape = (n1, n2, k, k) if (mode == "full" and k > 1) else (n1, n2)
    if fault == "nonfinite" and n1 > 0:
        x1, bad = poison(draw, x1), ["x1"]
    elif fault == "dtype":
        x1, bad = x1.to(torch.float32 if dtype == torch.float64 else torch.float64), ["x1"]
    elif fault == "shape":
        x1, bad = x1[:, :0] if d > 1 else x1.reshape(-1, 1, 1), ["x1"]
    elif fault == "out_shape" and n1 > 0:
        kw["out"], bad = torch.empty(n1 + 1, n2, dtype=dtype), ["out"]
    elif fault == "out_dtype" and n1 > 0:
        kw["out"], bad = torch.empty(shape, dtype=torch.float32 if dtype == torch.float64 else torch.int64), ["out"]
    elif fault == "out_kind" and n1 > 0:
        kw["out"], bad = np.zeros(shape), ["out"]
    elif fault == "block":
        kw["block_size"], bad = draw(st.sampled_from([0, -2, 1.5])), ["block_size"]
    elif fault == "mode":
        kw["mode"], bad = "diag", ["mode"]
    call = lambda: empirical_ntk(net, x1, x2, **kw)   # noqa: E731
    if bad is not None:
        expect_error_naming(call, bad)
        return
    res = call()
    assert tuple(res.shape) == shape
    if n1 and n2:
        ref = jacobian_ntk_reference(net.double(), x1.double(), None if x2 is None else x2.double())
        if not (mode == "full" and k > 1):
            ref = torch.diagonal(ref, dim1=2, dim2=3).sum(-1)
        torch.testing.assert_close(res.double(), ref, **tol(dtype))


# ------------------------------------------------------------------------------------------------ train
@settings(**dict(SETTINGS, max_examples=15))
@given(st.data())
def test_fuzz_train(data):
    from ntk_fast import train
    draw = data.draw
    dtype = draw(DTYPES)
    d, n = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    net = FCNet(d, 6, 1, dtype=dtype, generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    x = tensor(draw, (n, d), draw(DTYPES), draw(st.booleans()))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    y = torch.randint(0, 2, (n,), generator=g).to(dtype) * 2 - 1
    alpha = draw(st.sampled_from([0.5, 10.0]))
    fault = draw(st.sampled_from(["none", "nonfinite", "labels", "alpha", "y_shape", "x_shape", "net", "test"]))
    kw = dict(max_steps=3, progress=False, kernel_points=0)
    bad = None
    if fault == "nonfinite":
        x, bad = poison(draw, x), ["x"]
    elif fault == "labels":
        y = y.clone()
        y[draw(st.integers(0, n - 1))] = draw(st.sampled_from([0.0, 0.3, 2.0, float("nan")]))
        bad = ["y"]
    elif fault == "alpha":
        alpha, bad = draw(st.sampled_from([0.0, -1.0, float("nan"), float("inf"), "a"])), ["alpha"]
    elif fault == "y_shape":
        y, bad = y[:-1] if n > 1 else y.reshape(1, 1), ["y"]
    elif fault == "x_shape":
        x, bad = torch.zeros(n, d + 1, dtype=dtype), ["x"]
    elif fault == "net":   # any module trains now (issue 14); one with two outputs per point does not
        net, x, bad = torch.nn.Linear(d, 2, dtype=dtype), x.to(dtype), ["output"]
    elif fault == "test":
        kw.update(x_test=x[:, :0] if d > 1 else x.reshape(-1, 1, 1), y_test=y)
        bad = ["x_test"]
    call = lambda: train(net, x, y, alpha, **kw)   # noqa: E731
    if bad is not None:
        expect_error_naming(call, bad)
        return
    r = call()
    assert r.status in ("converged", "max_steps", "stalled")
    with torch.no_grad():
        F = alpha * (r.net(x.to(dtype)) - net(x.to(dtype)))        # F = alpha (f(x; w) - f(x; w0))
    torch.testing.assert_close(r.outputs["train"][0], F, **tol(dtype))
