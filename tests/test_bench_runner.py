"""The side-by-side benchmark runner (bench/runner/) at a tiny size with the in-process methods only (no timing
assertions)."""
import glob
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.runner import main as bench_runner  # noqa: E402
from bench.runner.problem import Dims, flops_model, param_groups  # noqa: E402


def test_runner_tiny_table_and_json(tmp_path, capsys):
    rc = bench_runner.main(["--n", "48", "--h", "32", "--d", "20", "--L", "2", "--dtype", "float64",
                            "--methods", "ntk_fast,reference,func_jacobian,func_ntvp,brute_force",
                            "--repeats", "1", "--warmup", "0", "--probe-n", "16", "--matmul-n", "128",
                            "--max-seconds", "1e9",   # a busy machine must not turn a row into an extrapolation
                            "--out-dir", str(tmp_path), "--tag", "tiny", "--quiet", "--no-malloc-tuning"])
    assert rc == 0
    out = capsys.readouterr().out
    for label in ("ntk_fast (features + fused Gram op)", "plain torch structured", "torch.func Jacobian contraction",
                  "torch.func NTK-vector products", "brute force", "max rel err vs float64", "% of torch.mm"):
        assert label in out
    files = glob.glob(str(tmp_path / "*-tiny.json"))
    assert len(files) == 1 and os.path.exists(files[0][:-5] + ".md")
    res = json.load(open(files[0]))
    assert res["matmul_gflops"]["float64"] > 0
    (case,) = res["cases"]
    assert (case["n"], case["h"], case["d"], case["L"]) == (48, 32, 20, 2)
    rows = {r["method"]: r for r in case["rows"]}
    assert set(rows) == {"ntk_fast", "reference", "func_jacobian", "func_ntvp", "brute_force"}
    for r in rows.values():
        assert r["status"] == "ok", r
        assert r["measured_n"] == 48 and r["seconds"] > 0 and r["flops"] > 0
        # every method computes the same kernel: float64 agreement with ntk_fast's float64 Gram
        assert r["max_rel_err"] < 1e-10, r
    # counted flops: the structured symmetric half + features for ntk_fast, twice the Gram for the reference
    dims = Dims(20, 32, 2, 8)
    assert rows["ntk_fast"]["flops"] == pytest.approx(dims.F(48) + 48 * 48 * dims.S)
    assert rows["reference"]["flops"] == pytest.approx(dims.F(48) + 2 * 48 * 48 * dims.S)


def test_runner_extrapolates_and_skips(tmp_path, capsys):
    # a time limit no call can meet forces measurement at the probe size and extrapolation to n;
    # peers whose environment is missing are skipped with a note
    rc = bench_runner.main(["--n", "64", "--h", "16", "--d", "10", "--L", "1", "--dtype", "float32",
                            "--methods", "func_ntvp,neural_tangents,nngeometry", "--peers-subprocess",
                            "--peers-python", str(tmp_path / "none"), "--nt-python", str(tmp_path / "none"),
                            "--repeats", "1", "--warmup", "0", "--probe-n", "16", "--max-seconds", "0",
                            "--matmul-n", "128", "--no-save", "--quiet", "--no-malloc-tuning"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "(extrap.)" in out and "skipped" in out


def test_flop_models_scale():
    dims = Dims(784, 1024, 3, 4)
    n1, n2 = 1000, 4000
    # Gram-type methods are quadratic in n at large n
    for m in ("ntk_fast", "reference", "func_ntvp", "neural_tangents"):
        ratio = flops_model(m, dims, n2, {}) / flops_model(m, dims, n1, {})
        assert 4 < ratio <= 16
    # parameter groups of the brute force cap the Jacobian bytes
    groups = param_groups([784 * 1024, 1024 * 1024, 1024 * 1024, 1024], 256, 4)
    assert [i for g in groups for i in g] == [0, 1, 2, 3] and len(groups) == 2


def test_unknown_method_is_an_error(capsys):
    assert bench_runner.main(["--methods", "nope", "--no-save", "--no-malloc-tuning"]) == 2
