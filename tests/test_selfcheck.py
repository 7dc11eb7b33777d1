"""The first-use self-check policy (ntk_fast.ops.selfcheck) on the CPU: when it runs (CUDA devices only, once per
op and device, never inside graph capture or torch.compile tracing, off by NTK_FAST_SELF_CHECK=0), and what a
failing op leads to (one warning, the op disabled, its wrappers on the reference) -- with fake checks on fake
"cuda:<i>" devices, and end to end with the real doctor check of a deliberately wrong op on the CPU."""
import warnings

import pytest
import torch

from ntk_fast.diagnostics import doctor
from ntk_fast.diagnostics.doctor import CheckResult
from ntk_fast.ops import _loader, selfcheck
from ntk_fast.ops import flow as flow_ops
from ntk_fast.ops import reference as ref

pytestmark = pytest.mark.skipif(not _loader.extension_available(), reason="extension not built")


@pytest.fixture
def clean(monkeypatch):
    """Fresh policy state; disabled ops and warn-once marks restored afterwards."""
    disabled, warned = dict(_loader._disabled), set(_loader._warned)
    selfcheck.reset()
    monkeypatch.delenv(selfcheck.ENV, raising=False)
    yield
    selfcheck.reset()
    _loader._disabled.clear()
    _loader._disabled.update(disabled)
    _loader._warned.clear()
    _loader._warned.update(warned)


class FakeRunner:
    """Stands for the doctor: records its calls, fails the ops in ``failing``."""

    def __init__(self, failing=()):
        self.calls, self.failing = [], set(failing)

    def __call__(self, op, dev):
        self.calls.append((op, str(dev)))
        ok = op not in self.failing
        return [CheckResult(op, str(dev), "float64", 0.0 if ok else 0.5, 1e-10, ok),
                CheckResult(op, str(dev), "float32", 0.0, 1e-4, True)]


def test_checks_cuda_once_per_op_and_device(monkeypatch, clean):
    run = FakeRunner()
    monkeypatch.setattr(selfcheck, "_runner", run)
    assert not selfcheck.should_check("gram", "cpu")                 # CPU ops are not checked at first use
    assert selfcheck.native_on("gram", "cpu") and run.calls == []
    for _ in range(3):
        assert selfcheck.native_on("gram", "cuda:0")
    assert run.calls == [("gram", "cuda:0")]
    assert selfcheck.native_on("gram", torch.device("cuda", 1))      # another device: its own check
    assert selfcheck.native_on("flow_step", "cuda:0")                # another op: its own check
    assert selfcheck.native_on("gram", "cuda")                       # bare "cuda" is cuda:0 here: done already
    assert run.calls == [("gram", "cuda:0"), ("gram", "cuda:1"), ("flow_step", "cuda:0")]
    assert selfcheck.outcome("gram", "cuda:1") is True and selfcheck.outcome("gram", "cuda:7") is None


def test_failing_op_warns_once_and_is_disabled(monkeypatch, clean):
    run = FakeRunner(failing={"flow_loss"})
    monkeypatch.setattr(selfcheck, "_runner", run)
    assert selfcheck.native_on("flow_loss", "cuda:0") is False
    assert selfcheck.outcome("flow_loss", "cuda:0") is False
    assert not _loader.native("flow_loss")
    reason = _loader.status()["flow_loss"]
    assert "first-use self-check failed on cuda:0 (float64" in reason and selfcheck.ENV in reason
    # Disabled for the process: no further checks, on any device (the CPU included).
    assert selfcheck.native_on("flow_loss", "cuda:1") is False
    assert selfcheck.native_on("flow_loss", "cpu") is False
    assert run.calls == [("flow_loss", "cuda:0")]
    assert selfcheck.native_on("flow_grad_stats", "cuda:0")          # the other ops are unaffected


@pytest.mark.parametrize("value", ["0", "off", "False", "no"])
def test_environment_variable_turns_it_off(monkeypatch, clean, value):
    run = FakeRunner(failing={"gram"})
    monkeypatch.setattr(selfcheck, "_runner", run)
    monkeypatch.setenv(selfcheck.ENV, value)
    assert selfcheck.native_on("gram", "cuda:0") and run.calls == []
    monkeypatch.setenv(selfcheck.ENV, "1")
    assert not selfcheck.native_on("gram", "cuda:0") and run.calls == [("gram", "cuda:0")]


def test_not_during_capture_or_tracing(monkeypatch, clean):
    run = FakeRunner()
    monkeypatch.setattr(selfcheck, "_runner", run)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert selfcheck.native_on("softplus_act", "cuda:0") and run.calls == []
    assert selfcheck.outcome("softplus_act", "cuda:0") is None       # not recorded: a later eager call checks
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert selfcheck.native_on("softplus_act", "cuda:0") and run.calls == []
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    assert selfcheck.native_on("softplus_act", "cuda:0") and run.calls == [("softplus_act", "cuda:0")]


def test_missing_op_is_not_a_failure(monkeypatch, clean):
    monkeypatch.setattr(selfcheck, "_runner", lambda op, dev: [CheckResult(op, str(dev), "float64", float("nan"),
                                                                           1e-10, False, "missing")])
    assert selfcheck.native_on("kernel_flow_step", "cuda:0") and _loader.native("kernel_flow_step")


def test_a_check_that_calls_the_wrapper_does_not_recurse(monkeypatch, clean):
    seen = []

    def runner(op, dev):
        seen.append(op)
        assert selfcheck.native_on(op, dev)          # re-entry while its check runs: no second check
        return FakeRunner()(op, dev)
    monkeypatch.setattr(selfcheck, "_runner", runner)
    assert selfcheck.native_on("gram", "cuda:0") and seen == ["gram"]


def test_end_to_end_wrong_op_on_cpu(monkeypatch, clean):
    """The real doctor check of a wrong flow_grad_stats, with the CPU treated as a checked device: the wrapper
    warns once, returns the reference's values and keeps using the reference."""
    monkeypatch.setattr(selfcheck, "CHECKED_DEVICE_TYPES", ("cpu", "cuda"))
    real = doctor._native
    monkeypatch.setattr(doctor, "_native", lambda op: (lambda g, gp: real(op)(g, gp) * 1.01)
                        if op == "flow_grad_stats" else real(op))
    gen = torch.Generator().manual_seed(5)
    g, gp = torch.randn(3, 101, generator=gen, dtype=torch.float64), torch.randn(3, 101, generator=gen,
                                                                                 dtype=torch.float64)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = flow_ops.flow_grad_stats(g, gp)
        again = flow_ops.flow_grad_stats(g, gp)
    msgs = [str(x.message) for x in w if issubclass(x.category, RuntimeWarning)]
    assert len(msgs) == 1 and "'flow_grad_stats'" in msgs[0] and "self-check failed on cpu" in msgs[0]
    want = ref.flow_grad_stats(g, gp)
    assert torch.equal(got, want) and torch.equal(again, want)
    assert not _loader.native("flow_grad_stats") and selfcheck.outcome("flow_grad_stats", "cpu") is False
    # A correct op passes its check and stays native.
    f = torch.randn(2, 9, dtype=torch.float64)
    flow_ops.flow_loss(f, f.clone(), torch.ones(9, dtype=torch.float64), f.clone(), 1.0)
    assert selfcheck.outcome("flow_loss", "cpu") is True and _loader.native("flow_loss")
