"""First-use self-check of the compiled ops on a GPU: the policy, kept apart from the checks themselves.

The first time an op (``gram``, ``gram_full``, ``flow_step``, ``flow_grad_stats``, ``flow_loss``, ``softplus_act``,
``kernel_flow_step``, ``limit_kernels``) is about to run natively on a CUDA device in a process, its doctor
check (:mod:`ntk_fast.diagnostics.doctor`: small edge-case inputs, every precision of the op, compared with
the op's pure-torch reference in float64) runs once on that device.  If the op gives wrong values or raises,
the op is disabled for the rest of the process (:func:`ntk_fast.ops._loader.disable`; every wrapper then runs
the reference, on every device) and one ``RuntimeWarning`` says why (``_loader.use_reference`` warns once per
op).  Cost: milliseconds per op and device (a few tiny launches, one device synchronisation).

When the check does not run (nothing is recorded, so a later eager call on that device checks):

* the device is not a CUDA device (the CPU ops are checked by the CPU CI; ``python -m ntk_fast doctor``);
* ``NTK_FAST_SELF_CHECK=0`` (or ``false``, ``off``, ``no``) in the environment;
* a CUDA graph is being captured on the current stream (the check synchronises) or ``torch.compile`` is
  tracing (the wrapper is then a trace, not a run).

Per (op, device) the outcome is kept, so the check runs at most once for each.  The policy takes the device as
a string or ``torch.device`` and the check as a replaceable function, so the tests exercise it on the CPU.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Tuple, Union

import torch

from ntk_fast.ops import _loader
from ntk_fast.ops.checks import compiling

__all__ = ["CHECKED_DEVICE_TYPES", "ENV", "enabled", "native_on", "outcome", "reset", "should_check"]

ENV = "NTK_FAST_SELF_CHECK"
CHECKED_DEVICE_TYPES: Tuple[str, ...] = ("cuda",)   # device types whose first use is checked

DeviceLike = Union[str, torch.device]
_outcome: Dict[Tuple[str, str], bool] = {}          # (op, "cuda:<i>") -> passed
_running: set = set()                              # (op, device) keys whose check is under way


def enabled() -> bool:
    """False when the environment variable NTK_FAST_SELF_CHECK is 0 / false / off / no."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def _device(device: DeviceLike) -> torch.device:
    """torch.device with an index: a bare "cuda" is the current CUDA device (0 when CUDA is not initialised)."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        idx = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else 0
        dev = torch.device("cuda", idx)
    return dev


def _capturing_or_tracing() -> bool:
    """True inside CUDA graph capture on the current stream or while torch.compile traces."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def should_check(op: str, device: DeviceLike) -> bool:
    """True when the first-use check of ``op`` on ``device`` is due now (see the module docstring)."""
    dev = _device(device)
    key = (op, str(dev))
    if dev.type not in CHECKED_DEVICE_TYPES or key in _outcome or key in _running:
        return False
    return enabled() and not _capturing_or_tracing()


def _run_doctor(op: str, device: torch.device) -> List:
    """The doctor's rows for ``op`` on ``device`` (no disabling: the policy does that)."""
    from ntk_fast.diagnostics import doctor     # late: the doctor imports the op families
    return doctor.run_checks([device], [op], disable_failing=False)


_runner: Callable[[str, torch.device], List] = _run_doctor   # replaced by the tests


def _check(op: str, dev: torch.device) -> bool:
    """Run the check of ``op`` on ``dev`` once, record it, and disable the op when it fails."""
    key = (op, str(dev))
    _running.add(key)
    try:
        rows = _runner(op, dev)
    finally:
        _running.discard(key)
    bad = [r for r in rows if not r.passed and r.note != "missing"]
    _outcome[key] = not bad
    if bad:
        r = bad[0]
        what = r.note or f"max error {r.max_err:.1e} > {r.tol:.0e} relative to its float64 reference"
        _loader.disable(op, f"its first-use self-check failed on {dev} ({r.precision}: {what}); "
                            f"`python -m ntk_fast doctor` prints every check, {ENV}=0 turns the self-check off")
    return not bad


def native_on(op: str, device: DeviceLike) -> bool:
    """True when a call of ``op`` on ``device`` should go to the compiled kernel: the op is registered and not
    disabled, after its first-use self-check on that device when one is due (:func:`should_check`)."""
    if not _loader.native(op):
        return False
    if compiling():                  # traced, not run: no check, no dictionary lookups in the graph
        return True
    dev_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    if dev_type not in CHECKED_DEVICE_TYPES:     # the CPU hot path (every trainer step): nothing more to decide
        return True
    if should_check(op, device):
        _check(op, _device(device))
    return _loader.native(op)


def outcome(op: str, device: DeviceLike):
    """True / False when the check of ``op`` on ``device`` ran and passed / failed in this process, else None."""
    return _outcome.get((op, str(_device(device))))


def reset() -> None:
    """Forget every outcome (tests; ops disabled by a failed check stay disabled: ``_loader.enable``)."""
    _outcome.clear()
