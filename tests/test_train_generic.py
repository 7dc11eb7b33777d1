"""The generic trainer (ntk_fast.dynamics.generic): any module by gradient flow, ADAM and SGD."""
import math

import pytest
import torch
from torch import nn

from ntk_fast.dynamics.generic import train_any
from ntk_fast.dynamics.observables import loglinspace
from ntk_fast.dynamics.trainer import train
from ntk_fast import CV
from ntk_fast.models.fc import FCNet
from ntk_fast.models.resnet import WideResNet

DT = torch.float64


def _data(gen, n=19, d=5, real=False):
    x = torch.randn(n, d, dtype=DT, generator=gen)
    y = torch.randn(n, dtype=DT, generator=gen)
    return x, (y if real else torch.where(y >= 0, 1.0, -1.0).to(DT))


def _mlp(d=5, h=11, seed=0):
    """A plain nn.Module (biases on), not an FCNet."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.Softplus(beta=5.0), nn.Linear(h, h), nn.Tanh(),
                         nn.Linear(h, 1)).to(DT)


def _cv(h=4, seed=0):
    """The package's CNN (ntk_fast.CV) at test size: one block of two 3x3 convolutions, on 6 x 6 inputs."""
    return CV(h, L1=1, L2=2, kernel=3, dtype=DT, generator=torch.Generator().manual_seed(seed))


def _hist(res, k=0):
    return [(r["step"], r["t"]) for r in res.history_of(k)]


def test_generic_flow_equals_fused_fc(gen):
    x, y = _data(gen, n=21, d=6)
    nets = [FCNet(6, 9, 2, dtype=DT, generator=gen) for _ in range(2)]
    for alpha in (0.3, 30.0):
        a = train(nets, x, y, alpha, max_steps=25, progress=False, kernel_points=0)
        b = train_any(nets, x, y, alpha, max_steps=25)
        assert a.statuses == b.statuses
        for k in range(2):
            ha, hb = _hist(a, k), _hist(b, k)
            assert [s for s, _ in ha] == [s for s, _ in hb]
            assert max(abs(u[1] - v[1]) for u, v in zip(ha, hb)) <= 1e-10
        assert torch.allclose(a.outputs["train"], b.outputs["train"], atol=1e-10, rtol=0)
        for na, nb in zip(a.nets, b.nets):
            for wa, wb in zip(na.weights, nb.weights):
                assert torch.allclose(wa, wb, atol=1e-10, rtol=0)


def _ref_minibatch_loop(model, x, y, alpha, steps, bs, seed, make_opt, loss):
    """The reference code's recipe written plainly: f0 once, torch.manual_seed, randperm(n)[:bs], optimizer step."""
    with torch.no_grad():
        f0 = model(x).reshape(-1)
    opt = make_opt(model.parameters())
    torch.manual_seed(seed)
    for _ in range(steps):
        idx = torch.randperm(len(x))[:bs]
        F = alpha * (model(x[idx]).reshape(-1) - f0[idx])
        opt.zero_grad()
        loss(F, y[idx]).backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_adam_matches_torch_adam_step_for_step(gen):
    x, y = _data(gen, n=29)
    alpha, seed = 3.0, int(torch.randint(0, 1000, (), generator=gen))
    model = _mlp()
    res = train_any(model, x, y, alpha, dynamics="adam", lr=1e-2, batch_size=7, seed=seed, max_steps=25)
    ref = _ref_minibatch_loop(_mlp(), x, y, alpha, 25, 7, seed, lambda p: torch.optim.Adam(p, lr=1e-2),
                              lambda F, yy: torch.relu(1 - F * yy).mean() / alpha)
    got = torch.cat([p.detach().reshape(-1) for p in res.net.parameters()])
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-13)
    assert res.status == "max_steps" and res.final[0]["step"] == 25
    assert res.final[0]["t"] == pytest.approx(25 * 1e-2) and res.final[0]["epoch"] == pytest.approx(25 * 7 / 29)


def test_cnn_adam_matches_torch_adam(gen):
    """The Table 1 recipe on the package's CNN: hinge with 1/alpha, ADAM, seeded randperm minibatches."""
    x, y = _data(gen, n=13, d=36)
    alpha, seed = 40.0, int(torch.randint(0, 1000, (), generator=gen))
    res = train_any(_cv(3, 2), x, y, alpha, dynamics="adam", lr=3e-3, batch_size=5, seed=seed, max_steps=9)
    ref = _ref_minibatch_loop(_cv(3, 2), x, y, alpha, 9, 5, seed, lambda p: torch.optim.Adam(p, lr=3e-3),
                              lambda F, yy: torch.relu(1 - F * yy).mean() / alpha)
    got = torch.cat([p.detach().reshape(-1) for p in res.net.parameters()])
    assert got.shape == ref.shape and torch.allclose(got, ref, rtol=1e-12, atol=1e-13)
    assert not torch.equal(ref, torch.cat([p.detach().reshape(-1) for p in _cv(3, 2).parameters()]))


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_matches_torch_sgd(gen, nesterov):
    x, y = _data(gen, n=17, real=True)
    alpha = 0.7
    res = train_any(_mlp(), x, y, alpha, dynamics="sgd", loss="mse", lr=0.05, momentum=0.9, nesterov=nesterov,
                    batch_size=5, seed=3, max_steps=20)
    ref = _ref_minibatch_loop(_mlp(), x, y, alpha, 20, 5, 3,
                              lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=nesterov),
                              lambda F, yy: (0.5 * (F - yy) ** 2).mean() / alpha ** 2)
    got = torch.cat([p.detach().reshape(-1) for p in res.net.parameters()])
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-13)
    assert res.status == "max_steps"          # real targets: no margin stop


@pytest.mark.parametrize("dynamics", ["flow", "adam", "sgd"])
def test_resume_is_bit_exact(gen, tmp_path, dynamics):
    x, y = _data(gen, n=15)
    models = [_mlp(seed=s) for s in (0, 1)]
    kw = dict(dynamics=dynamics, lr=1e-2, batch_size=4, momentum=0.5, x_test=x[:5], y_test=y[:5])
    full = train_any(models, x, y, 2.0, max_steps=30, **kw)
    ck = str(tmp_path / "run.ckpt")
    part = train_any(models, x, y, 2.0, max_steps=12, checkpoint=ck, **kw)
    assert part.statuses == ["max_steps"] * 2
    rest = train_any(models, x, y, 2.0, max_steps=30, resume=ck, **kw)
    assert rest.statuses == full.statuses
    for a, b in zip(full.nets, rest.nets):
        for pa, pb in zip(a.parameters(), b.parameters()):
            assert torch.equal(pa, pb)
    strip = lambda h: [{k: ("nan" if v != v else v) for k, v in r.items() if k != "wall"} for r in h]  # noqa: E731
    for ha, hb in zip(full.history, rest.history):
        assert strip(ha) == strip(hb)
    assert len(full.ensemble_history) > 2 and strip(full.ensemble_history) == strip(rest.ensemble_history)
    with pytest.raises(ValueError, match="alpha"):
        train_any(models, x, y, 3.0, max_steps=30, resume=ck, **kw)


@pytest.mark.parametrize("dynamics", ["flow", "adam"])
def test_ensemble_vmap_equals_loop(gen, dynamics):
    x, y = _data(gen, n=36, d=36)
    for make in (lambda s: _mlp(36, 7, s), lambda s: _cv(3, s)):
        models = [make(s) for s in range(3)]
        kw = dict(dynamics=dynamics, batch_size=6, lr=1e-2, max_steps=15)
        a = train_any(models, x, y, 1.0, batched=True, **kw)
        b = train_any(models, x, y, 1.0, batched=False, **kw)
        assert torch.allclose(a.outputs["train"], b.outputs["train"], atol=1e-11, rtol=0)
        for k in range(3):
            ha, hb = _hist(a, k), _hist(b, k)
            assert [u[0] for u in ha] == [v[0] for v in hb]
            assert max(abs(u[1] - v[1]) for u, v in zip(ha, hb)) < 1e-9
        # each ensemble member equals its own single run
        c = train_any(models[1], x, y, 1.0, seed=1, **kw)
        assert torch.allclose(a.outputs["train"][1], c.outputs["train"][0], atol=1e-11, rtol=0)


def test_batched_default_loops_over_convolutions_on_cpu(gen):
    """batched=None: vmap for the MLP, the loop for the CNN on the CPU (grouped convolutions are slower there);
    both paths give the same trajectory."""
    from ntk_fast.dynamics.generic.functional import FlatEnsemble
    x, y = _data(gen, n=9, d=36)
    mlp = FlatEnsemble([_mlp(36, 5, s) for s in range(2)])
    cnn = FlatEnsemble([_cv(2, s) for s in range(2)])
    mlp.forward(mlp.W, x), cnn.forward(cnn.W, x)
    assert mlp.batched is True and cnn.batched is False
    forced = FlatEnsemble([_cv(2, s) for s in range(2)], batched=True)
    assert torch.allclose(forced.forward(forced.W, x), cnn.forward(cnn.W, x), atol=1e-12, rtol=0)


def test_margin_stop_and_status(gen):
    x, y = _data(gen, n=12)
    res = train_any(_mlp(), x, y, 10.0, dynamics="adam", lr=3e-2, batch_size=12, max_steps=3000,
                    record_rate=0.1, record_spacing=10)
    assert res.status == "converged"
    last = res.history[0][-1]
    assert last["train_nd"] == 0 and last["train_err"] == 0.0
    flow = train_any(_mlp(), x, y, 10.0, max_steps=3000, max_dgrad=1e-2)
    assert flow.status == "converged" and flow.history[0][-1]["train_nd"] == 0


def test_train_dispatches_other_models(gen):
    x, y = _data(gen, n=10)
    res = train(_mlp(), x, y, 1.0, dynamics="adam", max_steps=3, batch_size=4, progress=False, kernel_points=4)
    assert res.final[0]["step"] == 3 and "kernel_change" in res.final[0]
    biased = FCNet(5, 6, 1, bias=0.1, dtype=DT, generator=gen)
    assert train(biased, x, y, 1.0, max_steps=3, progress=False).final[0]["step"] == 3


def test_bad_input(gen):
    x, y = _data(gen, n=8)
    two = nn.Sequential(nn.Linear(5, 2)).to(DT)
    with pytest.raises(ValueError, match=r"\(n,\) or \(n, 1\)"):
        train_any(two, x, y, 1.0, max_steps=2)
    with pytest.raises(ValueError, match="labels y"):
        train_any(_mlp(), x, (y + 1) / 2, 1.0, dynamics="adam", max_steps=2)
    with pytest.raises(ValueError, match="BatchNorm1d in train mode"):
        train_any(nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3), nn.Linear(3, 1)).to(DT), x, y, 1.0, max_steps=2)
    with pytest.raises(ValueError, match="batch_size"):
        train_any(_mlp(), x, y, 1.0, dynamics="sgd", batch_size=9, max_steps=2)
    xb = x.clone()
    xb[0, 0] = math.nan
    with pytest.raises(ValueError, match="x contains NaN"):
        train_any(_mlp(), xb, y, 1.0, max_steps=2)
    xb[0, 0] = math.inf
    with pytest.raises(ValueError, match="x contains NaN or infinite"):
        train_any(_mlp(), xb, y, 1.0, dynamics="adam", max_steps=2)
    for bad, loss in ((math.inf, "softhinge"), (math.nan, "mse")):
        yb = y.clone()
        yb[3] = bad
        with pytest.raises(ValueError, match="y contains NaN or infinite"):
            train_any(_mlp(), x, yb, 1.0, loss=loss, max_steps=2)
    with pytest.raises(ValueError, match=r"y must be a tensor of shape \(8,\)"):
        train_any(_mlp(), x, y[:7], 1.0, max_steps=2)
    for a in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="alpha must be a positive finite"):
            train_any(_mlp(), x, y, a, max_steps=2)
    with pytest.raises(ValueError, match=r"batch_size must be in \[1, n = 8\], got 0"):
        train_any(_mlp(), x, y, 1.0, dynamics="adam", batch_size=0, max_steps=2)
    with pytest.raises(ValueError, match="lr must be a positive"):
        train_any(_mlp(), x, y, 1.0, dynamics="sgd", lr=-1.0, max_steps=2)
    with pytest.raises(ValueError, match="budget"):
        train_any(_mlp(), x, y, 1.0, max_steps=math.inf)      # the default budget (1e6 steps) lifted, no other
    with pytest.raises(ValueError, match="max_epochs or max_wall"):     # an infinite epoch budget is none
        train_any(_mlp(), x, y, 1.0, dynamics="adam", batch_size=4, max_steps=math.inf, max_epochs=math.inf)
    with pytest.raises(ValueError, match="record_spacing"):
        train_any(_mlp(), x, y, 1.0, max_steps=2, record_spacing=0)
    with pytest.raises(ValueError, match="max_wall"):
        train_any(_mlp(), x, y, 1.0, dynamics="adam", max_wall=-1.0)
    with pytest.raises(ValueError, match="grow"):
        train_any(_mlp(), x, y, 1.0, max_steps=2, grow=0.5)
    with pytest.raises(ValueError, match="dynamics"):
        train_any(_mlp(), x, y, 1.0, dynamics="lbfgs", max_steps=2)
    with pytest.raises(ValueError, match="same parameters"):
        train_any([_mlp(), _mlp(5, 4)], x, y, 1.0, max_steps=2)
    for kw, msg in ((dict(betas=(1.5, 0.9)), r"betas must lie in \[0, 1\)"), (dict(betas=0.9), "betas must be a pair"),
                    (dict(eps=-1.0), "eps must be a finite number >= 0")):
        with pytest.raises(ValueError, match=msg):
            train_any(_mlp(), x, y, 1.0, dynamics="adam", batch_size=4, max_steps=2, **kw)
    for kw, msg in ((dict(momentum=-0.5), "momentum must be a finite number >= 0"),
                    (dict(momentum=math.nan), "momentum must be"), (dict(dampening=math.inf), "dampening")):
        with pytest.raises(ValueError, match=msg):
            train_any(_mlp(), x, y, 1.0, dynamics="sgd", batch_size=4, max_steps=2, **kw)
    with pytest.raises(ValueError, match=r"x_test has per-point shape \(6,\), expected \(5,\) like x"):
        train_any(_mlp(), x, y, 1.0, max_steps=2, x_test=torch.randn(3, 6, dtype=DT), y_test=y[:3])
    with pytest.raises(ValueError, match="kernel_points must be an int >= 0"):
        train_any(_mlp(), x, y, 1.0, max_steps=2, kernel_points=-3)
    with pytest.raises(ValueError, match=r"kernel_points must be an \(m, 5\) tensor like x"):
        train_any(_mlp(), x, y, 1.0, max_steps=2, kernel_points=x[:, :4])
    bn = nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3), nn.Linear(3, 1)).to(DT).eval()
    assert train_any(bn, x, y, 1.0, max_steps=2).final[0]["step"] == 2     # eval-mode BN: fixed affine map


def test_resnet_preactivations_order_one_and_trains(gen):
    x = torch.randn(8, 1, 28, 28, dtype=DT, generator=gen)
    m = WideResNet(10, 1, 1, dtype=DT, generator=gen)
    with torch.no_grad():
        ms = [float(z.pow(2).mean()) for z in m.preactivations(x)]
        f = m(x.flatten(1))
    assert all(0.2 < v < 3.0 for v in ms), ms
    assert f.shape == (8,) and 0.01 < float(f.pow(2).mean()) < 10
    y = torch.where(torch.randn(8, generator=gen) > 0, 1.0, -1.0).to(DT)
    res = train_any(m, x, y, 1.0, dynamics="adam", batch_size=4, max_steps=2)
    assert res.final[0]["step"] == 2 and math.isfinite(res.final[0]["train_loss"])
    with pytest.raises(ValueError, match="depth"):
        WideResNet(12)


def test_cnn_kernel_change_falls_like_one_over_alpha(gen):
    """Lazy regime: trained to the margin, the CNN's weights move by O(1/alpha), so does its NTK."""
    x, y = _data(gen, n=10, d=36)
    kc = [train_any(_cv(3, 0), x, y, a, max_steps=3000, max_dgrad=1e-2, kernel_points=x[:6]).final[0]
          for a in (100.0, 1000.0)]
    assert all(f["status"] == "converged" for f in kc)
    ratio = kc[0]["kernel_change"] / kc[1]["kernel_change"]
    assert 7.0 < ratio < 14.0, ratio


def test_generic_flow_ensemble_records_equal_fused_ones(gen):
    """The generic path's ensemble records (EnsembleTracker: variance, error of the mean predictor) are the fused
    FC trainer's on the same weights; per-model statuses and step sizes are kept."""
    x, y = _data(gen, n=23, d=6)
    xt, yt = _data(gen, n=31, d=6)
    nets = [FCNet(6, 9, 2, dtype=DT, generator=gen) for _ in range(3)]
    kw = dict(x_test=xt, y_test=yt, max_steps=40, record_spacing=5)
    a = train(nets, x, y, 0.5, progress=False, **kw)
    b = train_any(nets, x, y, 0.5, **kw)
    ea, eb = a.ensemble_history, b.ensemble_history
    assert len(ea) == len(eb) > 5 and [r["event"] for r in ea] == [r["event"] for r in eb]
    for ra, rb in zip(ea, eb):
        assert ra["step"] == rb["step"] and ra["nets_stopped"] == rb["nets_stopped"]
        # at step 0, F = alpha (f - f0) is rounding noise (~1e-16) whose sign decides the errors: skip those
        for key in ("var", "t_mean", "t_min", "t_max") + (("ens_err", "mean_err") if ra["step"] > 0 else ()):
            assert abs(ra[key] - rb[key]) <= 1e-10 * max(1.0, abs(ra[key])), key
    assert b.ensemble["K"] == 3 and abs(b.ensemble["var"] - a.ensemble["var"]) <= 1e-10 * a.ensemble["var"]
    assert b.statuses == a.statuses and [r["event"] for r in b.history[0]] == [r["event"] for r in a.history[0]]
    assert [r["dt"] for r in b.history[2]] == pytest.approx([r["dt"] for r in a.history[2]], rel=1e-12)
    # minibatch dynamics: records at every scheduled step of the lockstep models
    c = train_any([_mlp(6, 5, s) for s in range(3)], x, y, 1.0, dynamics="sgd", lr=0.05, batch_size=5,
                  x_test=xt, y_test=yt, max_steps=30, record_spacing=4)
    steps = [r["step"] for r in c.ensemble_history if r["event"] == "scheduled"]
    assert steps == [r["step"] for r in c.history[0] if r["event"] == "scheduled"]
    assert all(r["var"] > 0 and 0 <= r["ens_err"] <= 1 for r in c.ensemble_history)


def test_one_config_for_both_trainers(gen):
    """train_any takes the FlowConfig keywords under train's names; old names still work with a warning; the
    kernel change is off by default on the generic path (on for the fused FC path)."""
    x, y = _data(gen, n=12)
    with pytest.warns(DeprecationWarning, match="is now .record_"):
        old = train_any(_mlp(), x, y, 1.0, dynamics="adam", batch_size=4, max_steps=40,
                        checkpoint_rate=0.5, checkpoint_spacing=3)
    new = train_any(_mlp(), x, y, 1.0, dynamics="adam", batch_size=4, max_steps=40, record_rate=0.5,
                    record_spacing=3)
    assert [r["step"] for r in old.history[0]] == [r["step"] for r in new.history[0]]
    sched = [r["step"] for r in new.history[0] if r["event"] == "scheduled"]
    assert sched == loglinspace(40, 0.5, 3) and sched != loglinspace(40, 0.1, 1000)     # not the ADAM default
    net = FCNet(5, 7, 2, dtype=DT, generator=gen)
    rule = dict(grow=1.4, shrink=3.0, grow_fraction=0.9, max_dout=0.05, max_steps=30)
    a, b = train(net, x, y, 2.0, progress=False, **rule), train_any(net, x, y, 2.0, **rule)
    assert [r["dt"] for r in b.history[0]] == pytest.approx([r["dt"] for r in a.history[0]], rel=1e-9)
    assert b.final[0]["attempts"] == a.final[0]["attempts"] and b.config["grow"] == 1.4
    assert b.final[0]["attempts"] != train_any(net, x, y, 2.0, max_steps=30).final[0]["attempts"]
    assert "kernel_change" not in train(_mlp(), x, y, 1.0, max_steps=3, progress=False).final[0]
    assert "kernel_change" in train(FCNet(5, 6, 1, dtype=DT, generator=gen), x, y, 1.0, max_steps=3,
                                    progress=False).final[0]


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_row_optimizers_equal_torch_optim_bit_for_bit(gen, kind):
    """RowAdam / RowSGD on a (K, P) buffer: rows updated together (every row active, one pass over the buffer)
    or apart (a subset active) follow torch.optim.Adam / SGD on each row exactly (torch.equal)."""
    from ntk_fast.dynamics.generic.optim import RowAdam, RowSGD
    K, P = 3, 37
    W = torch.randn(K, P, dtype=DT, generator=gen)
    refs = [W[k].clone().requires_grad_(True) for k in range(K)]
    if kind == "adam":
        opt = RowAdam(W, lr=3e-2, betas=(0.8, 0.99), eps=1e-7)
        ropts = [torch.optim.Adam([r], lr=3e-2, betas=(0.8, 0.99), eps=1e-7) for r in refs]
    else:
        opt = RowSGD(W, lr=3e-2, momentum=0.7, nesterov=True)
        ropts = [torch.optim.SGD([r], lr=3e-2, momentum=0.7, nesterov=True) for r in refs]
    for rows in ([0, 1, 2], [0, 2], [0, 1, 2], [1], [0, 1, 2], [0, 1, 2]):
        G = torch.randn(K, P, dtype=DT, generator=gen)
        opt.step(W, G, rows)
        for k in rows:
            refs[k].grad = G[k].clone()
            ropts[k].step()
    for k in range(K):
        assert torch.equal(W[k], refs[k].detach())


def test_loop_path_gradient_buffer_survives_a_replaced_grad(gen):
    """The loop path's gradients land in the flat buffer even when a hook makes autograd hand a new .grad
    tensor (post-accumulate hooks that set p.grad): the same trajectory as without the hook."""
    x, y = _data(gen, n=17)
    kw = dict(dynamics="sgd", lr=0.05, batch_size=6, seed=2, max_steps=6)
    plain = train_any(_mlp(), x, y, 1.5, **kw)
    from ntk_fast.dynamics.generic.functional import FlatEnsemble
    orig = FlatEnsemble._bound

    def bound_with_hooks(self):
        work = orig(self)
        for m in work:
            for p in m.parameters():
                if not getattr(p, "_test_hooked", False):
                    p.register_post_accumulate_grad_hook(lambda q: setattr(q, "grad", q.grad.clone()))
                    p._test_hooked = True
        return work

    FlatEnsemble._bound = bound_with_hooks
    try:
        hooked = train_any(_mlp(), x, y, 1.5, **kw)
    finally:
        FlatEnsemble._bound = orig
    for a, b in zip(plain.net.parameters(), hooked.net.parameters()):
        assert torch.equal(a, b)
    assert not torch.equal(plain.net[0].weight, _mlp()[0].weight)
