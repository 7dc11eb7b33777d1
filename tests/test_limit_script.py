"""experiments/limit_kernels.py end to end on the small digits set: both parts, JSON content and figures."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytest.importorskip("matplotlib")


def test_limit_kernels_script_lazy_nets_follow_the_flow(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    out = {k: str(tmp_path / k) for k in ("a.png", "a.json", "b.png", "b.json")}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "limit_kernels.py"), "--dataset", "digits",
                        "--n", "50", "--n-test", "30", "--L", "2", "--widths", "16,64", "--seeds", "2",
                        "--net-widths", "16,128", "--net-seeds", "2", "--out", out["a.png"], "--results", out["a.json"],
                        "--net-out", out["b.png"], "--net-results", out["b.json"]],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    for k in ("a.png", "b.png"):
        assert os.path.getsize(out[k]) > 1000
    a = json.loads(open(out["a.json"]).read())
    assert [row["h"] for row in a["rows"]] == [16, 64] and a["data"] == "digits"
    b = json.loads(open(out["b.json"]).read())
    assert [row["h"] for row in b["rows"]] == [16, 128] and len(b["runs"]) == 4
    assert all(run["status"] == "converged" for run in b["runs"])
    # lazy (alpha sqrt(h) = 1e4): the net follows the kernel flow of its own initial eNTK closely ...
    assert all(run["gap_h0"] < 0.01 for run in b["runs"])
    # ... and the remaining gap to the Theta_inf flow is the finite-width kernel's, shrinking with h
    small, large = b["rows"]
    assert large["gap_inf"] < small["gap_inf"] and abs(large["gap_inf"] - large["gap_h0_inf"]) < 0.01
