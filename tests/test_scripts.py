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
