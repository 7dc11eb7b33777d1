"""The gradient-flow trainer: naive plain-torch loop, ensembles, resume, lazy limit, bad inputs."""
import json
import math

import pytest
import torch

import ntk_fast
from ntk_fast.models.fc import FCNet
from ntk_fast.dynamics.trainer import FlowResult, train
from ntk_fast.dynamics.observables import loglinspace, next_record
from ntk_fast.testing import net_flow_loop

D, H, L = 6, 16, 3


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny problems: one thread avoids OpenMP hand-offs that dominate (and get slow on a busy machine)."""
    nt = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(nt)


def data(n, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=dtype)
    x = x / x.norm(dim=1, keepdim=True) * math.sqrt(D)
    y = torch.where(x[:, 0] + 0.5 * x[:, 1] * x[:, 2] >= 0, 1.0, -1.0).to(dtype)
    return x, y


def make_net(seed, h=H, dtype=torch.float64):
    return FCNet(D, h, L, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def weights_of(net):
    return torch.cat([p.detach().reshape(-1) for p in net.weights])


def test_public_api():
    assert ntk_fast.train is train


def test_loglinspace():
    s = loglinspace(1000)
    assert s[:101] == list(range(101))
    assert next_record(10**6) == 10**6 + 101
    assert len(s) == 298


@pytest.mark.parametrize("loss,tau,alpha", [("softhinge", 0.0, 1.0), ("qhinge", 0.0, 3.0), ("softhinge", 2.0, 0.5)])
def test_trainer_matches_reference_loop(loss, tau, alpha):
    x, y = data(40, 1)
    net = make_net(2)
    steps = 150
    ref = net_flow_loop(net, x, y, alpha, loss=loss, tau=tau, max_steps=steps)
    res = train(net, x, y, alpha, loss=loss, tau=tau, max_steps=steps, progress=False, kernel_points=0)
    fin = res.final[0]
    assert fin["step"] == ref["steps"] and fin["attempts"] == ref["attempts"]
    assert res.status == ("converged" if ref["converged"] else "max_steps")
    hist = [r for r in res.history_of(0) if r["event"] == "scheduled" and r["step"] > 0]
    for r in hist:                                   # every step <= 100 is a checkpoint: same clock and dt
        t_ref, dt_ref = ref["traj"][r["step"] - 1]
        assert r["t"] == pytest.approx(t_ref, rel=1e-12) and r["dt"] == pytest.approx(dt_ref, rel=1e-12)
    torch.testing.assert_close(weights_of(res.net), weights_of(ref["net"]), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res.outputs["train"][0], ref["F"], rtol=1e-9, atol=1e-11)


def test_converges_and_records():
    x, y = data(40, 3)
    xt, yt = data(30, 4)
    res = train(make_net(5), x, y, 1.0, x_test=xt, y_test=yt, progress=False, kernel_every=20)
    assert res.status == "converged"
    fin = res.final[0]
    assert fin["train_nd"] == 0 and fin["train_err"] == 0.0
    assert (y * res.outputs["train"][0] >= 1).all()
    assert 0 <= fin["test_err"] <= 1 and math.isfinite(fin["kernel_change"]) and math.isfinite(fin["t1"])
    assert len(fin["dw"]) == L + 1 and fin["grad_norm"] > 0
    steps = [r["step"] for r in res.history_of(0) if r["event"] == "scheduled"]
    assert steps[:5] == [0, 1, 2, 3, 4]
    assert any("kernel_change" in r for r in res.history[0] if r["event"] == "scheduled")


def test_ensemble_equals_separate_runs():
    x, y = data(32, 6)
    xt, yt = data(20, 7)
    nets = [make_net(s) for s in (10, 11, 12)]
    ens = train(nets, x, y, 1.0, x_test=xt, y_test=yt, progress=False, max_steps=400, kernel_points=8)
    assert len(ens.nets) == 3 and ens.ensemble is not None and ens.ensemble["K"] == 3
    for k, m in enumerate(nets):
        one = train(m, x, y, 1.0, x_test=xt, y_test=yt, progress=False, max_steps=400, kernel_points=8)
        assert ens.statuses[k] == one.status
        assert ens.final[k]["step"] == one.final[0]["step"] and ens.final[k]["attempts"] == one.final[0]["attempts"]
        assert ens.final[k]["t"] == pytest.approx(one.final[0]["t"], rel=1e-12)
        torch.testing.assert_close(weights_of(ens.nets[k]), weights_of(one.net), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ens.outputs["test"][k], one.outputs["test"][0], rtol=1e-9, atol=1e-11)
    Fm = ens.outputs["test"].mean(0)
    assert ens.ensemble["ens_err"] == pytest.approx(float(((Fm * yt) <= 0).double().mean()))


def test_ensemble_history_matches_the_nets_histories(tmp_path):
    x, y = data(32, 18)
    xt, yt = data(24, 19)
    nets = [make_net(s) for s in (20, 21, 22)]
    ens = train(nets, x, y, 1.0, x_test=xt, y_test=yt, progress=False, max_steps=300, kernel_points=0)
    eh = ens.ensemble_history
    assert eh and eh[0]["step"] == 0 and eh[-1]["event"] == "final"
    steps = [r["step"] for r in eh if r["event"] == "scheduled"]
    assert steps == sorted(set(steps)) and steps[:4] == [0, 1, 2, 3]
    per_net = [{r["step"]: r for r in ens.history_of(k) if r["event"] != "final"} for k in range(3)]
    finals = [ens.history_of(k)[-1] for k in range(3)]
    for r in eh[:-1]:
        # each net's record at that step, or its final one if it stopped before it
        recs = [per_net[k].get(r["step"], finals[k]) for k in range(3)]
        assert r["mean_err"] == pytest.approx(sum(q["test_err"] for q in recs) / 3)
        assert r["t_min"] == min(q["t"] for q in recs) and r["t_max"] == max(q["t"] for q in recs)
        assert r["nets_stopped"] == sum(r["step"] not in per_net[k] for k in range(3))
        assert r["var"] >= 0 and 0 <= r["ens_err"] <= 1
    # the last record is the end state: the same numbers as res.ensemble
    for key in ("var", "ens_err", "mean_err", "rms_mean_F"):
        assert eh[-1][key] == pytest.approx(ens.ensemble[key], rel=1e-12)
    # at step 0 all nets output F = 0: no spread
    assert eh[0]["var"] < 1e-25
    # saved and loaded with the result; resumed runs continue it exactly
    ens.save(str(tmp_path / "ens"))
    assert FlowResult.load(str(tmp_path / "ens")).ensemble_history == eh
    ck = str(tmp_path / "ens.ckpt")
    train(nets, x, y, 1.0, x_test=xt, y_test=yt, progress=False, max_steps=77, kernel_points=0, checkpoint=ck)
    res = train(nets, x, y, 1.0, x_test=xt, y_test=yt, progress=False, max_steps=300, kernel_points=0, resume=ck)
    strip = lambda h: [{k: v for k, v in r.items() if k != "wall"} for r in h]  # noqa: E731
    assert strip(res.ensemble_history) == strip(eh)


def test_resume_is_bit_for_bit(tmp_path):
    x, y = data(40, 8)
    xt, yt = data(16, 9)
    net = make_net(13)
    kw = dict(x_test=xt, y_test=yt, progress=False, kernel_points=0)
    full = train(net, x, y, 1.0, max_steps=300, **kw)
    ck = str(tmp_path / "run.ckpt")
    part = train(net, x, y, 1.0, max_steps=123, checkpoint=ck, **kw)
    assert part.status == "max_steps"
    res = train(net, x, y, 1.0, max_steps=300, resume=ck, **kw)
    assert res.status == full.status
    assert torch.equal(weights_of(res.net), weights_of(full.net))
    strip = lambda h: [{k: v for k, v in r.items() if k != "wall"} for r in h]  # noqa: E731
    assert strip(res.history[0]) == strip(full.history[0])
    # interrupted by the wall clock, checkpointing at every attempt
    ck2 = str(tmp_path / "wall.ckpt")
    cut = train(net, x, y, 1.0, max_steps=300, checkpoint=ck2, checkpoint_every=0.0, max_wall=0.05, **kw)
    assert cut.status in ("max_wall", "max_steps")
    res2 = train(net, x, y, 1.0, max_steps=300, resume=ck2, **kw)
    assert torch.equal(weights_of(res2.net), weights_of(full.net))
    with pytest.raises(ValueError, match="alpha"):
        train(net, x, y, 2.0, resume=ck2, **kw)


def test_save_and_load(tmp_path):
    x, y = data(24, 14)
    res = train(make_net(15), x, y, 1.0, progress=False, max_steps=50, kernel_points=0)
    res.save(str(tmp_path / "out"))
    back = FlowResult.load(str(tmp_path / "out"))
    assert back.status == res.status and back.history == res.history
    json.dumps(res.history)
    assert torch.equal(weights_of(back.net), weights_of(res.net))
    summary = json.load(open(tmp_path / "out.json"))
    assert summary["status"] == "max_steps" and summary["config"]["alpha"] == 1.0


def test_lazy_limit_kernel_change_shrinks():
    x, y = data(32, 16)
    changes = []
    for alpha in (10.0, 100.0):               # alpha sqrt(h) = 40, 400: lazy; the change scales like 1/alpha
        res = train(make_net(17), x, y, alpha, progress=False, kernel_points=32, max_steps=5000)
        assert res.status == "converged"
        changes.append(res.final[0]["kernel_change"])
    assert changes[1] < 0.03
    assert changes[1] < changes[0] / 5


def test_status_max_time_and_nonfinite():
    x, y = data(24, 18)
    res = train(make_net(19), x, y, 1.0, progress=False, max_time=5.0, kernel_points=0)
    assert res.status == "max_time" and res.final[0]["t"] >= 5.0
    net = make_net(20)
    with torch.no_grad():
        net.weights[1][0, 0] = math.inf
    res = train(net, x, y, 1.0, progress=False, kernel_points=0)
    assert res.status == "nonfinite"


def test_bad_inputs():
    x, y = data(10, 21)
    net = make_net(22)
    with pytest.raises(ValueError, match="labels"):
        train(net, x, (y + 1) / 2, 1.0, progress=False)
    for a in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="alpha"):
            train(net, x, y, a, progress=False)
    with pytest.raises(ValueError, match=r"x must .*\(n, 6\)"):
        train(net, x[:, :5], y, 1.0, progress=False)
    with pytest.raises(ValueError, match="y must"):
        train(net, x, y[:9], 1.0, progress=False)
    xn = x.clone()
    xn[3, 2] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        train(net, xn, y, 1.0, progress=False)
    with pytest.raises(ValueError, match="x_test"):
        train(net, x, y, 1.0, x_test=x, progress=False)
    with pytest.raises(ValueError, match="loss"):
        train(net, x, y, 1.0, loss="huber", progress=False)
    with pytest.raises(ValueError, match="max_dgrad"):
        train(net, x, y, 1.0, max_dgrad=0.0, progress=False)
    with pytest.raises(ValueError, match="ensemble"):
        train([net, FCNet(D, H + 1, L, dtype=torch.float64)], x, y, 1.0, progress=False)
    for kp in (-3, 2.5, True):
        with pytest.raises(ValueError, match="kernel_points must be an int >= 0"):
            train(net, x, y, 1.0, kernel_points=kp, max_steps=2, progress=False)
    with pytest.raises(ValueError, match=r"kernel_points must be an \(m, 6\) tensor"):
        train(net, x, y, 1.0, kernel_points=x[:, :5], max_steps=2, progress=False)
    with pytest.raises(ValueError, match="kernel_points contains NaN"):
        train(net, x, y, 1.0, kernel_points=xn, max_steps=2, progress=False)
    with pytest.raises(ValueError, match="train: give a budget"):
        train(net, x, y, 1.0, max_steps=math.inf, progress=False)
    for b in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError, match="train: loss_beta must be a positive finite number"):
            train(net, x, y, 1.0, loss_beta=b, progress=False)


def test_corrupt_checkpoint_and_result_files_give_clear_errors(tmp_path):
    x, y = data(24, 16)
    net = make_net(17)
    ck = tmp_path / "run.ckpt"
    train(net, x, y, 1.0, max_steps=20, checkpoint=str(ck), progress=False, kernel_points=0)
    good = ck.read_bytes()
    bad = tmp_path / "truncated.ckpt"
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="truncated.ckpt is corrupt"):
        train(net, x, y, 1.0, max_steps=40, resume=str(bad), progress=False, kernel_points=0)
    assert bad.read_bytes() == good[: len(good) // 2]  # never rewritten by the failed resume
    junk = tmp_path / "junk.ckpt"
    junk.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="corrupt or not an ntk_fast file"):
        train(net, x, y, 1.0, resume=str(junk), progress=False, kernel_points=0)
    other = tmp_path / "other.ckpt"
    torch.save({"weights": 1}, other)
    with pytest.raises(ValueError, match="missing version"):
        train(net, x, y, 1.0, resume=str(other), progress=False, kernel_points=0)
    with pytest.raises(FileNotFoundError, match="nothere"):
        train(net, x, y, 1.0, resume=str(tmp_path / "nothere.ckpt"), progress=False, kernel_points=0)
    # a result file: a torch file of another kind, and a truncated one
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="holds a list"):
        FlowResult.load(str(tmp_path / "list"))
    res = train(net, x, y, 1.0, max_steps=5, progress=False, kernel_points=0)
    res.save(str(tmp_path / "res"))
    blob = (tmp_path / "res.pt").read_bytes()
    (tmp_path / "res.pt").write_bytes(blob[:100])
    with pytest.raises(ValueError, match="res.pt is corrupt"):
        FlowResult.load(str(tmp_path / "res"))


def test_float32_large_preactivations_stay_finite():
    # softplus(beta z) overflowed to inf for beta z > 88 in float32 with log1p(exp(.)); the net and the trainer
    # now evaluate it stably, so large pre-activations train normally
    g = torch.Generator().manual_seed(5)
    x = torch.randn(24, 6, generator=g)
    y = torch.where(torch.arange(24) % 2 == 0, 1.0, -1.0)
    net = FCNet(6, 8, 2, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        net.weights[0].mul_(40.0)                              # z of the first layer ~ 40 > 88 / beta
    assert torch.isfinite(net(x)).all()
    res = train(net, x, y, 1.0, max_steps=3, progress=False, kernel_points=0)
    assert res.status != "nonfinite"
    assert all(torch.isfinite(w).all() for w in res.net.weights)
    assert torch.isfinite(res.outputs["train"]).all()
