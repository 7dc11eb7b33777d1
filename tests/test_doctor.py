"""ntk_fast.diagnostics.doctor on the CPU: every op passes its self-check, a wrong or crashing op is reported
and disabled, and ``python -m ntk_fast doctor`` prints the table."""
import math

import pytest
import torch

from ntk_fast import cli
from ntk_fast.diagnostics import doctor
from ntk_fast.ops import _loader

pytestmark = pytest.mark.skipif(not _loader.extension_available(), reason="extension not built")


@pytest.fixture
def restore_ops():
    before = dict(_loader._disabled)
    yield
    _loader._disabled.clear()
    _loader._disabled.update(before)


def test_cpu_ops_pass(restore_ops):
    res = doctor.run_checks(["cpu"])
    assert {r.op for r in res} == set(doctor.OPS)
    assert {r.precision for r in res} == {"float64", "float32"}        # tf32 only on CUDA
    for r in res:
        assert r.passed, r
        assert 0.0 <= r.max_err <= r.tol
        assert _loader.native(r.op)


def test_wrong_op_is_disabled(monkeypatch, restore_ops):
    real = doctor._native

    def fake(op):
        f = real(op)
        if op == "flow_grad_stats":
            return lambda g, gp: f(g, gp) * (1 + 1e-3)      # a relative error of 1e-3: fails both precisions
        if op == "softplus_act":
            def boom(*a):
                raise RuntimeError("CUDA error: invalid argument")
            return boom
        return f
    monkeypatch.setattr(doctor, "_native", fake)
    res = doctor.run_checks(["cpu"], ["flow_grad_stats", "softplus_act", "flow_loss"])
    by = {(r.op, r.precision): r for r in res}
    assert not by["flow_grad_stats", "float64"].passed
    assert math.isclose(by["flow_grad_stats", "float64"].max_err, 1e-3, rel_tol=1e-6)
    assert not by["softplus_act", "float32"].passed and "invalid argument" in by["softplus_act", "float32"].note
    assert by["flow_loss", "float64"].passed
    assert not _loader.native("flow_grad_stats") and not _loader.native("softplus_act")
    assert _loader.native("flow_loss")
    assert _loader.status()["flow_grad_stats"].startswith("disabled: self-check failed on cpu")
    table = doctor.format_table(res)
    assert "FAIL" in table and "invalid argument" in table


def test_rel_err_flags_nonfinite_mismatch():
    ref = torch.tensor([1.0, 2.0])
    assert doctor._rel_err([(torch.tensor([1.0, float("nan")]), ref)]) == math.inf
    assert doctor._rel_err([(torch.tensor([1.0, 2.5]), ref)]) == pytest.approx(0.25)


def test_cli_doctor(capsys, restore_ops):
    rc = cli.main(["doctor", "--device", "cpu", "--op", "gram", "--op", "kernel_flow_step"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "gram" in out and "kernel_flow_step" in out and "pass" in out and "FAIL" not in out
    assert "gram: native" in out


def test_check_cuda_without_a_gpu_checks_the_cpu(capsys, monkeypatch, restore_ops):
    import ntk_fast
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    res = ntk_fast.check_cuda()
    out = capsys.readouterr().out
    assert "no CUDA GPU visible" in out and "limit_kernels" in out and "FAIL" not in out
    assert {r.device for r in res} == {"cpu"} and {r.op for r in res} == set(doctor.OPS)
    assert all(r.passed for r in res)
    quiet = ntk_fast.check_cuda(["cpu"], ["limit_kernels"], verbose=False)
    assert capsys.readouterr().out == "" and [r.precision for r in quiet] == ["float64", "float32"]
