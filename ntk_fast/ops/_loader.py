"""The one place that loads the compiled extension ``ntk_fast._C``.

Loading the library runs its static op registrations (``TORCH_LIBRARY(ntk_fast, ...)`` in
``csrc/register.cpp`` and the per-dispatch-key kernels beside each op's sources).  Availability is kept
per op, so that one op can fall back to its pure-torch reference (a stale build that lacks it, a failed
self-check on the user's GPU) while the others run native.

Use from an op family's module (``ntk_fast/ops/<family>.py``)::

    from ntk_fast.ops._loader import native, use_reference

    def my_op(...):
        if not native("my_op"):
            use_reference("my_op")          # warns once per process and op
            return reference.my_op(...)
        return torch.ops.ntk_fast.my_op(...)

Fakes are registered at import of the family module with :func:`register_fake`, which registers only
when the op exists in the loaded library (so ``import ntk_fast`` is enough for ``torch.compile`` to trace
any op).
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, Optional

import torch

try:
    from ntk_fast import _C  # noqa: F401  (loading registers the ops)

    LOADED = True
    LOAD_ERROR: Optional[BaseException] = None
except (ImportError, OSError) as exc:  # pragma: no cover - exercised by a test that hides the module
    LOADED = False
    LOAD_ERROR = exc

_disabled: Dict[str, str] = {}   # op name -> reason it runs its reference instead
_warned: set = set()

FALLBACK_TEXT = ("ntk_fast: {what}; op {op!r} uses its slow pure-torch reference. Rebuild the extension "
                 "with `pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`).")


def registered(op: str) -> bool:
    """True when the loaded library defines ``torch.ops.ntk_fast.<op>``."""
    return LOADED and hasattr(torch.ops.ntk_fast, op)


def native(op: str) -> bool:
    """True when calls to ``op`` should go to the compiled kernel (registered and not disabled)."""
    return registered(op) and op not in _disabled


def disable(op: str, reason: str) -> None:
    """Route ``op`` to its reference from now on in this process (e.g. after a failed self-check)."""
    _disabled[op] = reason


def enable(op: str) -> None:
    _disabled.pop(op, None)


def status() -> Dict[str, str]:
    """Op name -> "native", "disabled: <reason>" or "missing" for every op a family module has asked about."""
    names = set(_warned) | set(_disabled) | {n for n in _KNOWN}
    out = {}
    for n in sorted(names):
        if n in _disabled:
            out[n] = f"disabled: {_disabled[n]}"
        else:
            out[n] = "native" if registered(n) else "missing"
    return out


def use_reference(op: str) -> None:
    """Warn once per process and op that ``op`` runs its reference (the caller then calls it)."""
    if op in _warned:
        return
    _warned.add(op)
    if op in _disabled:
        warnings.warn(f"ntk_fast: op {op!r} uses its slow pure-torch reference for the rest of this process: "
                      f"{_disabled[op]}.", RuntimeWarning, stacklevel=3)
        return
    if not LOADED:
        what = f"the compiled extension ntk_fast._C could not be loaded ({LOAD_ERROR})"
    else:
        what = "the loaded extension ntk_fast._C does not define it (stale build)"
    warnings.warn(FALLBACK_TEXT.format(what=what, op=op), RuntimeWarning, stacklevel=3)


_KNOWN: set = set()


def register_fake(op: str) -> Callable[[Callable], Callable]:
    """Decorator: ``torch.library.register_fake("ntk_fast::<op>")`` when the op is registered, else a no-op."""
    _KNOWN.add(op.split(".")[0])

    def deco(fn: Callable) -> Callable:
        if registered(op.split(".")[0]):
            torch.library.register_fake(f"ntk_fast::{op}")(fn)
        return fn
    return deco


def extension_available() -> bool:
    """True when ``ntk_fast._C`` was loaded (individual ops may still be missing or disabled: see status())."""
    return LOADED
