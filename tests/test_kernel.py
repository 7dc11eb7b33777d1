"""Tests of the frozen-kernel op and solver (ntk_fast.dynamics.solver, torch.ops.ntk_fast.kernel_flow_step)."""
from __future__ import annotations


import pytest
import torch

from ntk_fast.ops import kernel_flow as _kernel_ops
from ntk_fast.ops.kernel_flow import kernel_flow_step
from ntk_fast.ops._loader import native
from ntk_fast.dynamics.solver import KernelFlowResult, frozen_kernel_run, kernel_flow, kernel_regression, mse_flow
from ntk_fast.dynamics.observables import loglinspace
from ntk_fast.ops.reference import kernel_flow_step_ref
from ntk_fast.ops.packed import pack_symmetric, unpack_symmetric
from ntk_fast.testing import kernel_flow_loop

needs_ext = pytest.mark.skipif(not native("kernel_flow_step"), reason="extension not built")
D = torch.float64


def rbf_problem(n, m=0, d=6, seed=0, E=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + m, d, generator=g, dtype=D)
    K = torch.exp(-torch.cdist(x, x) ** 2 / (2 * d))
    w = torch.randn(E, d, generator=g, dtype=D)
    y = torch.sign(w @ x.t() + 0.2 * x[:, 1])
    y[y == 0] = 1
    if E == 1:
        y = y[0]
    return K[:n, :n].contiguous(), (y[..., :n]).contiguous(), K[n:, :n].contiguous(), (y[..., n:]).contiguous()


def random_state(E, n, dtype=D, seed=1):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda: torch.randn(E, n, generator=g, dtype=dtype)  # noqa: E731
    y = torch.randint(0, 2, (E, n), generator=g).to(dtype) * 2 - 1
    dt = torch.rand(E, generator=g, dtype=dtype)
    return y, rnd(), rnd(), rnd(), rnd(), dt


# ------------------------------------------------------------------------------------------------ the op
CASES = [  # E, n, kernels per problem?, packed block, loss
    (1, 1, False, 0, "softhinge"),
    (1, 37, False, 0, "softhinge"),
    (3, 301, False, 0, "qhinge"),
    (5, 130, True, 0, "mse"),
    (3, 301, False, 64, "softhinge"),
    (2, 77, True, 16, "softhinge"),
    (7, 99, False, 0, "softhinge"),
    (17, 93, False, 32, "qhinge"),
    (70, 45, False, 0, "softhinge"),
    (4, 50, False, 64, "hinge"),
    (3, 41, True, 0, "hinge"),
    (3, 66, False, 64, "mse"),
]


@needs_ext
@pytest.mark.parametrize("E,n,per_problem,pb,loss", CASES)
def test_op_matches_reference(E, n, per_problem, pb, loss):
    g = torch.Generator().manual_seed(E * 1000 + n)
    A = torch.randn((E, n, n + 3) if per_problem else (n, n + 3), generator=g, dtype=D)
    K = A @ A.mT / n
    theta = pack_symmetric(K, pb) if pb else K
    y, f, gg, r, c, dt = random_state(E, n, seed=n)
    if loss == "mse":   # real-valued targets
        y = torch.randn(E, n, generator=g, dtype=D)
    active = torch.rand(E, generator=g) < 0.7
    active[0] = True
    out = torch.ops.ntk_fast.kernel_flow_step(theta, y, f, gg, r, c, dt, active, loss, 20.0, pb, 0)
    ref = kernel_flow_step_ref(theta, y, f, gg, r, c, dt, active, loss, 20.0, pb)
    for a, b, name in zip(out, ref, ("f", "r", "g", "c", "stats")):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13, msg=name)


@needs_ext
@pytest.mark.parametrize("pb", [0, 128])
def test_op_shared_multithreaded_deterministic(pb):
    # Big enough for the threaded path (several chunks), shared Theta, E >= 2 with an inactive problem and a
    # garbage lower triangle: matches the reference and is bitwise repeatable.
    n, E = 1300, 6
    g = torch.Generator().manual_seed(11)
    A = torch.randn(n, n + 5, generator=g, dtype=D)
    K = A @ A.t() / n
    theta = pack_symmetric(K, pb) if pb else K.triu() + torch.randn(n, n, generator=g, dtype=D).tril(-1)
    y, f, gg, r, c, dt = random_state(E, n, seed=4)
    active = torch.ones(E, dtype=torch.bool)
    active[3] = False
    out = torch.ops.ntk_fast.kernel_flow_step(theta, y, f, gg, r, c, dt, active, "softhinge", 20.0, pb, 0)
    ref = kernel_flow_step_ref(K, y, f, gg, r, c, dt, active, "softhinge", 20.0)
    for a, b_, name in zip(out, ref, ("f", "r", "g", "c", "stats")):
        torch.testing.assert_close(a, b_, rtol=1e-11, atol=1e-12, msg=name)
    again = torch.ops.ntk_fast.kernel_flow_step(theta, y, f, gg, r, c, dt, active, "softhinge", 20.0, pb, 0)
    assert all(torch.equal(a, b_) for a, b_ in zip(out, again))


@needs_ext
def test_op_reads_only_upper_triangle_and_small_blocks():
    n = 50
    g = torch.Generator().manual_seed(3)
    A = torch.randn(n, n, generator=g, dtype=D)
    K = A @ A.t()
    K_upper = K.triu() + torch.randn(n, n, generator=g, dtype=D).tril(-1) * 100  # garbage below the diagonal
    y, f, gg, r, c, dt = random_state(2, n)
    act = torch.ones(2, dtype=torch.bool)
    ref = kernel_flow_step_ref(K, y, f, gg, r, c, dt, act, "softhinge", 20.0)
    # Tile edges that do not divide n, in full storage (block = 8: the lower garbage stays unread).
    out = torch.ops.ntk_fast.kernel_flow_step(K_upper, y, f, gg, r, c, dt, act, "softhinge", 20.0, 0, 8)
    torch.testing.assert_close(out[2], ref[2], rtol=1e-12, atol=1e-12)


@needs_ext
def test_op_float32_close_to_float64():
    n, E = 200, 4
    g = torch.Generator().manual_seed(5)
    A = torch.randn(n, n, generator=g, dtype=D)
    K = A @ A.t() / n
    y, f, gg, r, c, dt = random_state(E, n)
    act = torch.ones(E, dtype=torch.bool)
    ref = kernel_flow_step_ref(K, y, f, gg, r, c, dt, act, "softhinge", 20.0)
    out = kernel_flow_step(K.float(), y.float(), f.float(), gg.float(), r.float(), c.float(), dt.float(), act)
    torch.testing.assert_close(out[2].double(), ref[2], rtol=1e-4, atol=1e-5)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("pb,n", [(16, 67), (64, 131), (128, 203), (64, 64)])
@pytest.mark.parametrize("E,per_problem", [(1, False), (2, False), (3, True), (5, False)])
def test_op_packed_tiles_every_strip_shape(dtype, pb, n, E, per_problem):
    # The packed off-diagonal tiles run 4-row strips over pairs of problems, then a single problem, then the
    # leftover rows one by one, in vector lanes of 32 bytes (4 doubles, 8 floats) plus a scalar column tail:
    # n, pb and E chosen so that every one of those pieces occurs, in both precisions.
    g = torch.Generator().manual_seed(n * 10 + E)
    A = torch.randn((E, n, n + 2) if per_problem else (n, n + 2), generator=g, dtype=D)
    K = A @ A.mT / n
    y, f, gg, r, c, dt = random_state(E, n, seed=E + n)
    active = torch.rand(E, generator=g) < 0.8
    active[-1] = True
    ref = kernel_flow_step_ref(K, y, f, gg, r, c, dt, active, "softhinge", 20.0)
    args = [t.to(dtype) for t in (pack_symmetric(K, pb), y, f, gg, r, c, dt)]
    out = torch.ops.ntk_fast.kernel_flow_step(*args, active, "softhinge", 20.0, pb, 0)
    tol = dict(rtol=1e-12, atol=1e-13) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    for a, b, name in zip(out, ref, ("f", "r", "g", "c", "stats")):
        torch.testing.assert_close(a.double(), b, **tol, msg=name)


@needs_ext
def test_op_opcheck():
    n, E = 20, 2
    K = torch.eye(n, dtype=D) + 0.1
    y, f, gg, r, c, dt = random_state(E, n)
    act = torch.ones(E, dtype=torch.bool)
    torch.library.opcheck(torch.ops.ntk_fast.kernel_flow_step.default,
                          (K, y, f, gg, r, c, dt, act, "softhinge", 20.0, 0, 0),
                          test_utils=("test_schema", "test_faketensor"))


def test_pack_roundtrip():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(2, 23, 23, generator=g, dtype=D)
    K = A + A.mT
    for b in (1, 4, 7, 23, 64):
        torch.testing.assert_close(unpack_symmetric(pack_symmetric(K, b), 23, b), K, rtol=0, atol=0)


def test_op_wrapper_rejects_bad_shapes():
    y, f, gg, r, c, dt = random_state(2, 10)
    act = torch.ones(2, dtype=torch.bool)
    with pytest.raises(ValueError, match="theta"):
        kernel_flow_step(torch.eye(9, dtype=D), y, f, gg, r, c, dt, act)
    with pytest.raises(ValueError, match="dt"):
        kernel_flow_step(torch.eye(10, dtype=D), y, f, gg, r, c, dt[:1], act)
    with pytest.raises(ValueError, match="loss"):
        kernel_flow_step(torch.eye(10, dtype=D), y, f, gg, r, c, dt, act, loss="huber")


# ------------------------------------------------------------------------------------------ the solver
@pytest.mark.parametrize("loss,max_steps", [("softhinge", None), ("qhinge", 400)])
def test_solver_matches_reference_loop(loss, max_steps):
    # qhinge approaches the margin only asymptotically (l' -> 0 as u -> 1): compare a fixed number of steps.
    K, y, _, _ = rbf_problem(120, seed=1)
    ref = kernel_flow_loop(K, y, loss=loss, max_steps=max_steps)
    F, c, t, steps = ref["F"], ref["c"], ref["t"], ref["steps"]
    res = kernel_flow(K, y, loss=loss, progress=False, max_steps=max_steps)
    assert res.statuses == ["converged" if max_steps is None else "max_steps"]
    assert res.status == res.statuses[0]
    assert int(res.steps[0]) == steps
    assert abs(float(res.t[0]) - t) <= 1e-9 * t
    torch.testing.assert_close(res.F_train[0], F, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(res.c[0], c, rtol=1e-9, atol=1e-12)
    if max_steps is None:
        assert bool((y * res.F_train[0] >= 1).all())


def test_solver_several_problems_equal_separate_runs():
    K, Y, Kt, Yt = rbf_problem(90, 30, seed=2, E=3)
    res = kernel_flow(K, Y, K_test_train=Kt, y_test=Yt, progress=False)
    assert res.F_train.shape == (3, 90) and res.F_test.shape == (3, 30)
    for e in range(3):
        one = kernel_flow(K, Y[e], K_test_train=Kt, y_test=Yt[e], progress=False)
        assert int(one.steps[0]) == int(res.steps[e])
        torch.testing.assert_close(res.F_train[e], one.F_train[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(res.F_test[e], one.F_test[0], rtol=1e-10, atol=1e-10)
    # E kernels (a batch) with one label vector, packed storage.
    Ks = torch.stack([K, K * 1.5])
    resk = kernel_flow(Ks, Y[0], packed=True, block=32, progress=False)
    alone = kernel_flow(K * 1.5, Y[0], progress=False)
    torch.testing.assert_close(resk.F_train[1], alone.F_train[0], rtol=1e-10, atol=1e-10)


def test_test_outputs_match_least_squares_route():
    K, y, Kt, yt = rbf_problem(100, 40, seed=3)
    K = K + 1e-3 * torch.eye(100, dtype=D)  # well conditioned, so lstsq is accurate
    res = kernel_flow(K, y, K_test_train=Kt, y_test=yt, progress=False)
    coef = torch.linalg.lstsq(K, res.F_train[0][:, None]).solution[:, 0]   # the reference code's route
    torch.testing.assert_close(res.F_test[0], Kt @ coef, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(-K @ res.c[0], res.F_train[0], rtol=1e-10, atol=1e-10)
    assert res.history[0][-1]["test_err"] == pytest.approx(float((yt * res.F_test[0] <= 0).double().mean()))


def test_kernel_regression_matches_solve():
    K, y, Kt, _ = rbf_problem(80, 20, seed=4)
    for ridge in (1e-3, 0.5):
        reg = kernel_regression(K, y, ridge=ridge, K_test=Kt)
        coef = torch.linalg.solve(K + ridge * torch.eye(80, dtype=D), y)
        torch.testing.assert_close(reg.coef, coef, rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(reg.F_test, Kt @ coef, rtol=1e-8, atol=1e-8)
        assert reg.jitter == 0.0
    Y = torch.stack([y, -y])
    reg2 = kernel_regression(K, Y, ridge=0.1)
    torch.testing.assert_close(reg2.coef[1], -kernel_regression(K, y, ridge=0.1).coef)


def test_kernel_regression_jitter_and_not_pd():
    x = torch.randn(30, 2, dtype=D)
    K = x @ x.t()  # rank 2, PSD: needs jitter
    y = K @ torch.randn(30, dtype=D)  # in the range of K: solvable despite the jitter (issue 18)
    with pytest.warns(RuntimeWarning, match="jitter"):
        reg = kernel_regression(K, y, max_jitter=1.0)
    assert reg.jitter > 0 and reg.status == "solved"
    with pytest.raises(ValueError, match="negative diagonal"):
        kernel_regression(-torch.eye(5, dtype=D), torch.ones(5, dtype=D))


@pytest.mark.parametrize("targets", ["labels", "real"])
def test_mse_closed_form_matches_flow(targets):
    K, y, Kt, _ = rbf_problem(60, 15, seed=5)
    if targets == "real":   # mse takes real-valued targets: 0.5 (F - y)^2
        y = y * torch.linspace(0.3, 2.0, y.shape[0], dtype=D)
    sol = mse_flow(K, y, K_test=Kt)
    res = kernel_flow(K, y, K_test_train=Kt, loss="mse", max_time=200.0, max_dgrad=1e-7, max_dout=0.01,
                      progress=False)
    T = float(res.t[0])
    F, Ft = sol(T)
    assert float((res.F_train[0] - F).abs().max()) < 2e-3
    assert float((res.F_test[0] - Ft).abs().max()) < 2e-3
    # Long times: interpolation (K^-1 y) on the train set; c(t) satisfies F = K c.
    torch.testing.assert_close(K @ sol.coef(7.0), sol(7.0)[0], rtol=1e-9, atol=1e-9)
    assert float((sol(1e9)[0] - y).abs().max()) < 1e-4


def test_checkpoint_resume_bit_for_bit(tmp_path):
    K, Y, Kt, Yt = rbf_problem(70, 10, seed=6, E=2)
    full = kernel_flow(K, Y, K_test_train=Kt, y_test=Yt, progress=False)
    ck = tmp_path / "ck.pt"
    # interrupted after 57 passes over Theta (both problems at once: the batch composition stays as in `full`)
    part = kernel_flow(K, Y, K_test_train=Kt, y_test=Yt, progress=False, max_iterations=57, checkpoint=ck)
    assert part.statuses == ["max_iterations", "max_iterations"] and part.status == "max_iterations"
    res = kernel_flow(K, Y, K_test_train=Kt, y_test=Yt, progress=False, resume=ck)
    assert torch.equal(res.F_train, full.F_train) and torch.equal(res.c, full.c)
    assert torch.equal(res.t, full.t) and res.statuses == full.statuses and res.status == full.status
    # the resumed history continues the interrupted one
    assert [h["step"] for h in res.history[0]][-3:] == [h["step"] for h in full.history[0]][-3:]
    with pytest.raises(ValueError, match="differs"):
        kernel_flow(K * 2, Y, progress=False, resume=ck)
    # result files
    res.save(tmp_path / "res.pt")
    back = KernelFlowResult.load(tmp_path / "res.pt")
    assert torch.equal(back.F_test, res.F_test) and (tmp_path / "res.json").exists()
    # the trainer's layout: <stem>.pt + <stem>.json whether or not the path ends in .pt
    res.save(str(tmp_path / "stem"))
    assert sorted(p.name for p in tmp_path.glob("stem*")) == ["stem.json", "stem.pt"]
    back = KernelFlowResult.load(str(tmp_path / "stem"))
    assert back.status == res.status and back.statuses == res.statuses and back.history == res.history
    import json
    js = json.loads((tmp_path / "stem.json").read_text())
    assert js["status"] == res.status and js["statuses"] == res.statuses and len(js["history"]) == 2


def test_checkpoint_written_periodically(tmp_path):
    K, y, _, _ = rbf_problem(40, seed=7)
    ck = tmp_path / "p.pt"
    kernel_flow(K, y, progress=False, checkpoint=ck, checkpoint_every_steps=5, max_steps=12)
    st = torch.load(ck, weights_only=False)
    assert st["steps"] == [12]


def test_loglinspace_schedule():
    s = loglinspace(10000, 0.01, 100)[:120]
    assert len(s) == 120
    assert s[:101] == list(range(101)) and all(b > a for a, b in zip(s, s[1:]))
    # the solver records its history on the trainer's schedule (ntk_fast.dynamics.observables), plus the final state
    K, y, _, _ = rbf_problem(120, seed=1)
    res = kernel_flow(K, y, loss="qhinge", max_steps=130, progress=False)
    assert res.statuses == ["max_steps"]
    steps = [h["step"] for h in res.history[0]]
    sched = loglinspace(130, 0.01, 100)
    assert steps[:len(sched)] == sched and steps[len(sched):] in ([], [130])


def test_frozen_kernel_run_on_fcnet():
    from ntk_fast import FCNet, empirical_ntk
    g = torch.Generator().manual_seed(0)
    net = FCNet(5, 32, 2, dtype=D, generator=g)
    x = torch.randn(40, 5, generator=g, dtype=D)
    xt = torch.randn(10, 5, generator=g, dtype=D)
    y, yt = torch.sign(x[:, 0]), torch.sign(xt[:, 0])
    res = frozen_kernel_run(net, x, y, xt, yt, progress=False)
    direct = kernel_flow(empirical_ntk(net, x), y, K_test_train=empirical_ntk(net, xt, x), y_test=yt,
                         progress=False)
    torch.testing.assert_close(res.F_test[0], direct.F_test[0])
    assert res.statuses == ["converged"] and res.status == "converged"


# ------------------------------------------------------------------------------------------- bad input
def test_bad_input_rejected():
    K, y, Kt, yt = rbf_problem(20, 5)
    with pytest.raises(ValueError, match="square"):
        kernel_flow(K[:, :19], y, progress=False)
    A = K.clone()
    A[0, 3] += 0.5
    with pytest.raises(ValueError, match="not symmetric"):
        kernel_flow(A, y, progress=False)
    with pytest.raises(ValueError, match="20 x 20"):
        kernel_flow(K, y[:19], progress=False)
    B = K.clone()
    B[2, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        kernel_flow(B, y, progress=False)
    with pytest.raises(ValueError, match=r"\+1/-1"):
        kernel_flow(K, y * 0.5, progress=False)
    with pytest.raises(ValueError, match="NaN"):
        kernel_flow(K, y.clone().fill_(float("nan")), progress=False)
    with pytest.raises(ValueError, match="K_test_train"):
        kernel_flow(K, y, K_test_train=Kt[:, :7], progress=False)
    with pytest.raises(ValueError, match="loss"):
        kernel_flow(K, y, loss="huber", progress=False)
    with pytest.raises(ValueError, match="label vectors|kernels"):
        kernel_flow(torch.stack([K, K]), torch.stack([y, y, y]), progress=False)
    with pytest.raises(ValueError, match="square"):
        kernel_regression(K[:3], y)
    with pytest.raises(ValueError, match="not symmetric"):
        mse_flow(A, y)


def test_unbounded_call_refused_and_vanishing_gradient_past_the_margins():
    """max_steps=inf with no other budget is refused (the margin stop alone may never be met); past its margins
    with stop_margin=False the softhinge gradient falls below 1e-160, where |g|^2 |g'|^2 underflows: the step rule
    must still decide (it raised ZeroDivisionError)."""
    import math
    from ntk_fast.dynamics.steprule import dgrad_from_norms
    K, y, _, _ = rbf_problem(20)
    with pytest.raises(ValueError, match="kernel_flow: give a budget"):
        kernel_flow(K, y, max_steps=math.inf, progress=False)
    assert kernel_flow(K, y, max_steps=math.inf, max_wall=60.0, progress=False).statuses[0] == "converged"
    assert dgrad_from_norms(1e-300, 4e-300, 1e-301) == pytest.approx(0.05)
    assert dgrad_from_norms(0.0, 1.0, 1.0) == 0.0
    res = kernel_flow(K, y, max_steps=4000, stop_margin=False, progress=False)
    assert res.statuses[0] == "max_steps"


def test_nan_during_flow_reported():
    K, y, _, _ = rbf_problem(20)
    res = kernel_flow(K * 1e308, y, progress=False, validate=True, max_steps=50)
    assert res.statuses[0] in ("nonfinite", "stalled", "converged", "max_steps")


def test_corrupt_checkpoint_and_result_files_give_clear_errors(tmp_path):
    K, y, _, _ = rbf_problem(30, seed=8)
    ck = tmp_path / "k.pt"
    res = kernel_flow(K, y, progress=False, checkpoint=ck, max_steps=10)
    good = ck.read_bytes()
    ck.write_bytes(good[:-64])
    with pytest.raises(ValueError, match="k.pt is corrupt or not an ntk_fast file"):
        kernel_flow(K, y, progress=False, resume=ck)
    torch.save({"F": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="missing r, g, c"):
        kernel_flow(K, y, progress=False, resume=tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError):
        kernel_flow(K, y, progress=False, resume=tmp_path / "absent.pt")
    res.save(tmp_path / "res")
    (tmp_path / "res.pt").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="res.pt is corrupt"):
        KernelFlowResult.load(tmp_path / "res")
    torch.save({"status": "x"}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="missing"):
        KernelFlowResult.load(tmp_path / "partial")
