"""Issue 16 item 4: ``gram`` streams the Gram to disk (under torchrun, or --to-disk) with the reference off
unless asked, after a free-space check, with per-rank timings in summary.json; ``kernel --gram DIR`` runs
kernel_flow on that on-disk Gram, on one process or split across torchrun ranks."""
import json
import os
import subprocess
import sys
from collections import namedtuple

import numpy as np
import pytest
import torch

from ntk_fast import cli, data
from ntk_fast.distributed import commands
from ntk_fast.dynamics.solver import kernel_flow
from ntk_fast.models.fc import FCNet
from ntk_fast.ntk.empirical import empirical_ntk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
P = 256                                 # float64 rows of 2048 bytes: tiles of 64 rows (4 blocks, 10 upper tiles)
GRAM = ["gram", "--dataset", "digits", "--p", str(P), "--h", "16", "--L", "2", "--dtype", "float64", "--tile", "64"]
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


def _reference():
    x, y, _, _ = data.binary_dataset("digits", p=P, p_test=1, seed=0)
    net = FCNet(x.shape[1], 16, 2, activation="softplus", beta=5.0, dtype=torch.float64,
                generator=torch.Generator().manual_seed(0))
    return empirical_ntk(net, x), y


def _torchrun(args, timeout=240):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    r = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "ntk_fast"] + args, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


@pytest.mark.slow           # about 40 s on the 2-core VM: 2 torchrun launches of 2 ranks each
@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not installed next to this python")
def test_torchrun_gram_then_kernel_on_two_ranks(tmp_path):
    g, k = str(tmp_path / "g"), str(tmp_path / "k")
    _torchrun(GRAM + ["--out", g, "--pg-timeout", "60"])
    K, y = _reference()
    got = np.load(os.path.join(g, "gram.npy"))
    np.testing.assert_allclose(got, K.numpy(), rtol=1e-12, atol=1e-12)
    assert np.array_equal(got, got.T)
    np.testing.assert_array_equal(np.load(os.path.join(g, "labels.npy")), y.numpy())
    s = json.load(open(os.path.join(g, "summary.json")))
    assert s["out_of_core"] and s["world_size"] == 2 and s["tiles_this_run"] == 10
    assert "max_rel_diff_vs_reference" not in s                     # streaming: reference off by default
    assert [r["rank"] for r in s["per_rank"]] == [0, 1] and all(r["tiles"] > 0 for r in s["per_rank"])
    assert all(r["wall_seconds"] > 0 and r["rss_anon_peak_bytes"] > 0 for r in s["per_rank"])
    assert all(0 < r["compute_seconds"] <= r["wall_seconds"] and 0 < r["write_seconds"] <= r["wall_seconds"]
               for r in s["per_rank"])
    r = _torchrun(["kernel", "--gram", g, "--out", k, "--max-steps", "300", "--pg-timeout", "60"])
    assert "on 2 rank(s)" in r.stdout
    s = json.load(open(os.path.join(k, "summary.json")))
    want = kernel_flow(K, y, max_steps=300)
    assert s["world_size"] == 2 and s["statuses"] == want.statuses and s["steps"] == want.steps.tolist()
    np.testing.assert_allclose(s["t"], want.t.numpy(), rtol=1e-12, atol=0)
    assert len(s["per_rank"]) == 2 and os.path.exists(os.path.join(k, "kernel_flow.pt"))


def test_gram_to_disk_one_process_reference_and_rerun(tmp_path, capsys):
    out = tmp_path / "g"
    assert cli.main(GRAM + ["--out", str(out), "--to-disk", "--reference"]) == 0
    s = json.load(open(out / "summary.json"))
    assert s["out_of_core"] and s["tiles_this_run"] == 10 and s["max_rel_diff_vs_reference"] < 1e-12
    assert cli.main(GRAM + ["--out", str(out), "--to-disk"]) == 0      # rerun: every tile is already done
    s = json.load(open(out / "summary.json"))
    assert s["tiles_this_run"] == 0 and "max_rel_diff_vs_reference" not in s
    K, y = _reference()
    assert cli.main(["kernel", "--gram", str(out), "--out", str(tmp_path / "k"), "--max-steps", "50",
                     "--no-progress"]) == 0
    s = json.load(open(tmp_path / "k" / "summary.json"))
    want = kernel_flow(K, y, max_steps=50)
    assert s["statuses"] == want.statuses and s["world_size"] == 1
    np.testing.assert_allclose(s["t"], want.t.numpy(), rtol=1e-12, atol=0)


def test_disk_space_checked_first_and_missing_gram_named(tmp_path, monkeypatch, capsys):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(commands.shutil, "disk_usage", lambda p: usage(10 ** 6, 10 ** 6, 1000))
    called = []
    monkeypatch.setattr(data, "binary_dataset", lambda *a, **kw: called.append(1))
    assert cli.main(GRAM + ["--out", str(tmp_path / "g"), "--to-disk"]) == 2
    err = capsys.readouterr().err
    assert "needs 512 KiB" in err and "1000 B free" in err and not called     # refused before loading data
    assert cli.main(["kernel", "--gram", str(tmp_path / "nothing"), "--out", str(tmp_path / "k")]) == 2
    assert "gram.npy is missing" in capsys.readouterr().err
