"""Files and shared surface of the dynamics: format versions (old files load, newer ones are refused), the one
JSON writer, the keywords train and kernel_flow share, deprecated names, progress bars off when not a tty."""
import dataclasses
import inspect
import json
import math

import pytest
import torch

from ntk_fast.dynamics.config import FlowConfig
from ntk_fast.dynamics.results import FORMAT_VERSION, DynamicsResult, FlowResult, KernelFlowResult, write_json
from ntk_fast.dynamics.solver import kernel_flow
from ntk_fast.dynamics.trainer import train
from ntk_fast.models.fc import FCNet
from ntk_fast.runs.experiment import read_summary

D = 5


@pytest.fixture(autouse=True)
def one_thread():
    nt = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(nt)


def data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=torch.float64)
    return x, torch.where(x[:, 0] + 0.3 * x[:, 1] >= 0, 1.0, -1.0).to(torch.float64)


def net(seed, h=12):
    return FCNet(D, h, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def kernel_problem(n=40, E=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + 10, D, generator=g, dtype=torch.float64)
    K = torch.exp(-torch.cdist(x, x) ** 2 / (2 * D))
    y = torch.sign(torch.randn(E, n + 10, generator=g, dtype=torch.float64))
    return K[:n, :n].contiguous(), y[:, :n].contiguous(), K[n:, :n].contiguous(), y[:, n:].contiguous()


def strip_wall(h):
    return [{k: v for k, v in r.items() if k != "wall"} for r in h]


# ------------------------------------------------------------------------------ the shared keyword arguments
def test_train_and_kernel_flow_share_keywords_and_defaults():
    ts, ks = inspect.signature(train).parameters, inspect.signature(kernel_flow).parameters
    for f in dataclasses.fields(FlowConfig):
        assert ts[f.name].default == f.default == ks[f.name].default, f.name


def test_old_keyword_names_warn_and_mean_the_same():
    K, Y, _, _ = kernel_problem()
    new = kernel_flow(K, Y, loss_beta=10.0, record_rate=0.5, record_spacing=7, progress=False, max_steps=150)
    with pytest.warns(DeprecationWarning) as caught:
        old = kernel_flow(K, Y, beta=10.0, checkpoint_rate=0.5, checkpoint_step=7, progress=False, max_steps=150)
    assert sorted(str(w.message).split("'")[1] for w in caught) == ["beta", "checkpoint_rate", "checkpoint_step"]
    assert torch.equal(old.F_train, new.F_train) and strip_wall(old.history[0]) == strip_wall(new.history[0])
    x, y = data(20, 1)
    a = train(net(2), x, y, 1.0, record_spacing=5, record_rate=0.5, max_steps=150, progress=False, kernel_points=0)
    with pytest.warns(DeprecationWarning) as caught:
        b = train(net(2), x, y, 1.0, checkpoint_spacing=5, checkpoint_rate=0.5, max_steps=150, progress=False,
                  kernel_points=0)
    assert sorted(str(w.message).split("'")[1] for w in caught) == ["checkpoint_rate", "checkpoint_spacing"]
    assert [r["step"] for r in a.history[0]] == [r["step"] for r in b.history[0]]
    with pytest.raises(TypeError, match="checkpoint_step"):
        train(net(2), x, y, 1.0, checkpoint_step=5, progress=False)
    with pytest.raises(TypeError, match="bogus"):
        kernel_flow(K, Y, bogus=1)


def test_infinite_limits_mean_none():
    K, Y, _, _ = kernel_problem()
    a = kernel_flow(K, Y, max_time=math.inf, max_wall=math.inf, progress=False)
    b = kernel_flow(K, Y, progress=False)
    assert torch.equal(a.F_train, b.F_train) and a.config["max_time"] is None
    with pytest.raises(ValueError, match="max_time"):
        kernel_flow(K, Y, max_time=-1.0, progress=False)


# ------------------------------------------------------------------------------------------ result shape
def test_one_result_shape():
    K, Y, Kt, Yt = kernel_problem(E=2)
    kres = kernel_flow(K, Y[0], K_test_train=Kt, y_test=Yt[0], progress=False)
    x, y = data(20, 4)
    xt, yt = data(8, 5)
    fres = train(net(6), x, y, 1.0, x_test=xt, y_test=yt, progress=False, kernel_points=0)
    for res, n, m in ((kres, K.shape[0], Kt.shape[0]), (fres, 20, 8)):
        assert isinstance(res, DynamicsResult)
        assert res.F_train.shape == (1, n) and res.F_test.shape == (1, m)      # K = 1 keeps its axis
        assert res.outputs["train"] is res.F_train and res.outputs["test"] is res.F_test
        assert res.t.shape == res.steps.shape == res.attempts.shape == (1,)
        assert len(res.history) == 1 and res.history[0][-1]["step"] == int(res.steps[0])
        assert res.final[0]["status"] == res.statuses[0] and res.history[0][0]["event"] == "scheduled"
        assert res.history_of(0) is res.history[0]
    assert "t1_code_over_h" in fres.final[0] and "t_code_over_h" in fres.history[0][0]


# ------------------------------------------------------------------------------------------ format versions
def test_results_carry_the_format_version_and_newer_ones_are_refused(tmp_path):
    K, Y, _, _ = kernel_problem()
    kres = kernel_flow(K, Y, progress=False, max_steps=20)
    kres.save(tmp_path / "k")
    blob = torch.load(tmp_path / "k.pt", weights_only=False)
    assert blob["format_version"] == FORMAT_VERSION
    assert json.loads((tmp_path / "k.json").read_text())["format_version"] == FORMAT_VERSION
    back = KernelFlowResult.load(tmp_path / "k")
    assert torch.equal(back.F_train, kres.F_train) and back.history == kres.history and back.final == kres.final
    blob["format_version"] = FORMAT_VERSION + 1
    torch.save(blob, tmp_path / "new.pt")
    with pytest.raises(ValueError, match=f"format version {FORMAT_VERSION + 1}"):
        KernelFlowResult.load(tmp_path / "new")
    with pytest.raises(ValueError, match="holds a 'KernelFlowResult' result"):
        FlowResult.load(tmp_path / "k")
    ck = tmp_path / "ck.pt"
    kernel_flow(K, Y, progress=False, max_steps=5, checkpoint=ck)
    st = torch.load(ck, weights_only=False)
    assert st["format_version"] == FORMAT_VERSION
    st["format_version"] = 7
    torch.save(st, ck)
    with pytest.raises(ValueError, match="format version 7"):
        kernel_flow(K, Y, progress=False, resume=ck)
    x, y = data(16, 7)
    tck = tmp_path / "t.ckpt"
    train(net(8), x, y, 1.0, max_steps=5, checkpoint=tck, progress=False, kernel_points=0)
    st = torch.load(tck, weights_only=False)
    assert st["format_version"] == FORMAT_VERSION
    torch.save({**st, "format_version": 3}, tck)
    with pytest.raises(ValueError, match="format version 3"):
        train(net(8), x, y, 1.0, resume=tck, progress=False, kernel_points=0)


def _as_v1_trainer_result(res: FlowResult) -> dict:
    """What the previous main's FlowResult.save wrote into <stem>.pt (no format version)."""
    old_rec = lambda r: {**{("t1_over_h_code" if k == "t1_code_over_h" else k): v for k, v in r.items()},  # noqa
                         **({"event": "checkpoint"} if r.get("event") == "scheduled" else {})}
    flat = [{"net": k, **old_rec(r)} for k, h in enumerate(res.history) for r in h]
    a = res.nets[0]
    return {"summary": {"status": res.status, "statuses": res.statuses, "final": [old_rec(f) for f in res.final],
                        "ensemble": res.ensemble, "config": res.config, "ensemble_history": res.ensemble_history},
            "history": flat, "arch": dict(d=a.d, h=a.h, L=a.L, activation=a.activation, beta=a.beta),
            "dtype": str(a.weights[0].dtype), "weights": [[w.detach() for w in m.weights] for m in res.nets],
            "outputs": {k: v for k, v in res.outputs.items()}}


def test_files_of_the_previous_format_load(tmp_path):
    x, y = data(20, 9)
    xt, yt = data(6, 10)
    res = train([net(11), net(12)], x, y, 1.0, x_test=xt, y_test=yt, progress=False, max_steps=40, kernel_points=0)
    torch.save(_as_v1_trainer_result(res), tmp_path / "old.pt")
    back = FlowResult.load(tmp_path / "old")
    same = lambda a, b: json.dumps(a) == json.dumps(b)  # noqa: E731 - NaN-aware comparison of records
    assert same(back.history, res.history) and same(back.final, res.final) and back.statuses == res.statuses
    assert torch.equal(back.F_test, res.F_test) and torch.equal(back.t, res.t) and torch.equal(back.steps, res.steps)
    assert all(torch.equal(p, q) for a, b in zip(back.nets, res.nets) for p, q in zip(a.weights, b.weights))
    K, Y, Kt, Yt = kernel_problem()
    kres = kernel_flow(K, Y, K_test_train=Kt, y_test=Yt, progress=False)
    cfg = {{"loss_beta": "beta", "record_spacing": "checkpoint_step", "record_rate": "checkpoint_rate"}.get(k, k): v
           for k, v in kres.config.items()}
    old = dict(F_train=kres.F_train, F_test=kres.F_test, c=kres.c, t=kres.t, steps=kres.steps,
               attempts=kres.attempts, status=kres.status, statuses=kres.statuses,
               history=[[{k: v for k, v in r.items() if k != "event"} for r in h] for h in kres.history],
               config=cfg, wall=kres.wall, single=False)
    torch.save(old, tmp_path / "oldk.pt")
    kb = KernelFlowResult.load(tmp_path / "oldk.pt")
    assert torch.equal(kb.F_test, kres.F_test) and kb.config == kres.config and kb.statuses == kres.statuses
    assert kb.final[1]["step"] == kres.final[1]["step"]


def test_checkpoints_of_the_previous_format_resume_bit_for_bit(tmp_path):
    # trainer: a version-1 checkpoint (host = dict of per-net lists, flat history, "version": 1)
    x, y = data(24, 13)
    nets = [net(14), net(15)]
    full = train(nets, x, y, 1.0, max_steps=200, progress=False, kernel_points=0)
    ck = tmp_path / "t.ckpt"
    train(nets, x, y, 1.0, max_steps=60, checkpoint=ck, progress=False, kernel_points=0)
    st = torch.load(ck, weights_only=False)
    names = {"g_sq": "gsq", "n_under": "nd", "mean_sq": "msq", "next_record": "next_ckpt", "n_records": "n_ckpt"}
    host = {names.get(k, k): [s[k] for s in st["nets"]] for k in st["nets"][0]}
    flat = [{"net": k, **r, "event": "checkpoint" if r["event"] == "scheduled" else r["event"]}
            for k, h in enumerate(st["history"]) for r in h]
    torch.save(dict(version=1, config=st["config"], engine=st["engine"], host=host, history=flat, wall=st["wall"],
                    ensemble=None), ck)
    res = train(nets, x, y, 1.0, max_steps=200, resume=ck, progress=False, kernel_points=0)
    assert all(torch.equal(p, q) for a, b in zip(res.nets, full.nets) for p, q in zip(a.weights, b.weights))
    assert [strip_wall(h) for h in res.history] == [strip_wall(h) for h in full.history]
    # solver: a version-1 checkpoint (no version field, next_ck, beta / checkpoint_* config names)
    K, Y, _, _ = kernel_problem(seed=16)
    kfull = kernel_flow(K, Y, progress=False)
    kck = tmp_path / "k.pt"
    kernel_flow(K, Y, progress=False, max_iterations=30, checkpoint=kck)
    st = torch.load(kck, weights_only=False)
    ren = {"loss_beta": "beta", "record_spacing": "checkpoint_step", "record_rate": "checkpoint_rate"}
    old = {k: v for k, v in st.items() if k not in ("format_version", "kind", "next_record")}
    old.update(next_ck=st["next_record"], config={ren.get(k, k): v for k, v in st["config"].items()},
               history=[[{k: v for k, v in r.items() if k != "event"} for r in h] for h in st["history"]])
    torch.save(old, kck)
    kres = kernel_flow(K, Y, progress=False, resume=kck)
    assert torch.equal(kres.F_train, kfull.F_train) and torch.equal(kres.c, kfull.c)


# ------------------------------------------------------------------------------------------ JSON and run folders
def test_one_json_writer_nan_policy_and_versions(tmp_path):
    p = tmp_path / "a.json"
    write_json(p, {"nan": math.nan, "inf": math.inf, "ninf": -math.inf, "t": torch.tensor([1.0, 2.0]),
                   "big": torch.zeros(100), "n": torch.tensor(3)})
    obj = json.loads(p.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert obj == {"format_version": FORMAT_VERSION, "nan": None, "inf": "inf", "ninf": "-inf", "t": [1.0, 2.0],
                   "big": "<tensor (100,)>", "n": 3}
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"done": True, "alpha": 1.0}))      # the previous main's file
    assert read_summary(str(run))["done"] is True
    (run / "summary.json").write_text(json.dumps({"format_version": 99, "done": True}))
    with pytest.raises(ValueError, match="format version 99"):
        read_summary(str(run))


# ------------------------------------------------------------------------------------------ progress bars
def test_progress_off_when_stderr_is_not_a_terminal(capsys):
    x, y = data(16, 17)
    K, Y, _, _ = kernel_problem()
    train(net(18), x, y, 1.0, max_steps=30, kernel_points=0)          # progress=None: stderr is captured here
    kernel_flow(K, Y, max_steps=30)
    err = capsys.readouterr().err
    assert "\r" not in err and "it/s" not in err and "step" not in err
    kernel_flow(K, Y, max_steps=30, progress=True)                       # forced on
    assert "\r" in capsys.readouterr().err


def test_run_folder_files_carry_the_format_version(tmp_path):
    pytest.importorskip("sklearn")
    from ntk_fast.runs.experiment import RunConfig, run_experiment
    from ntk_fast.runs.sweep import run_sweep
    cfg = dict(dataset="digits", p=40, p_test=20, d=8, h=8, L=2, max_steps=15, kernel_points=8, init_kernel=True)
    counts = run_sweep([("a", RunConfig(**cfg))], str(tmp_path / "sw"), progress=False, log=lambda *a: None)
    assert counts["done"] == 1
    run = tmp_path / "sw" / "a"
    for f in ("config.json", "train.json", "init_kernel.json", "summary.json", "../sweep.json", "../results.json"):
        assert json.loads((run / f).read_text())["format_version"] == FORMAT_VERSION, f
    for f in ("train.pt", "init_kernel.pt", "outputs.pt"):
        assert torch.load(run / f, weights_only=False)["format_version"] == FORMAT_VERSION, f
    s = json.loads((run / "summary.json").read_text())
    assert s["init_kernel"]["status"] and "t1_code_over_h" in s["train"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"format_version": 5, **RunConfig(**cfg).to_json()}))
    with pytest.raises(ValueError, match="format version 5"):
        run_experiment(RunConfig(**cfg), str(other), progress=False, log=lambda *a: None)
