"""Result helpers shared by the trainer (:mod:`ntk_fast.dynamics.trainer`) and the frozen-kernel solver (:mod:`ntk_fast.dynamics.solver`).

Status vocabulary (per net of the trainer, per problem of the solver; the overall status of a run is
:func:`overall_status` of the per-item list):

    "converged"       the margin is reached: y_i F_i >= 1 for every training point
    "max_time"        flow time t >= max_time
    "max_steps"       max_steps accepted steps
    "max_wall"        max_wall seconds of wall time
    "max_iterations"  max_iterations passes over Theta (solver only: every problem stops at the same pass)
    "nonfinite"       a NaN or infinite state / trial
    "diverging"       the loss rose over a window of accepted steps (solver: ntk_fast.guards.DivergenceMonitor;
                      a kernel that is not positive semi-definite)
    "stalled"         no step can be accepted (trainer: max_rejections consecutive rejections with finite
                      trials; solver: dt underflows 1e-300)
    "running"         not stopped (only inside a run and in checkpoints)

Results are saved as ``<stem>.pt`` (torch.save) and ``<stem>.json`` (a JSON summary), both atomically
(:func:`atomic_save`, :func:`atomic_write_json`).
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np
import torch

STATUSES = ("running", "converged", "max_time", "max_steps", "max_wall", "max_iterations", "nonfinite", "diverging",
            "stalled")
# Stops by a budget: a resumed run re-decides them with its own limits.
RESUMABLE = ("running", "max_time", "max_steps", "max_wall", "max_iterations")
# Order in which a non-converged item decides the overall status.
_PRECEDENCE = ("nonfinite", "diverging", "stalled", "max_wall", "max_iterations", "max_steps", "max_time", "running")


def overall_status(statuses: Sequence[str]) -> str:
    """"converged" when every item converged, else the first other status present in the order nonfinite,
    diverging, stalled, max_wall, max_iterations, max_steps, max_time, running."""
    statuses = list(statuses)
    if all(s == "converged" for s in statuses):
        return "converged"
    for s in _PRECEDENCE:
        if s in statuses:
            return s
    return statuses[0]


def stem_of(path: Any) -> str:
    """``path`` without a trailing ".pt" (the common stem of a result's .pt and .json files)."""
    path = os.fspath(path)
    return path[:-3] if path.endswith(".pt") else path


def _tmp_name(path: str) -> str:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    return f"{path}.tmp{os.getpid()}"


def atomic_save(obj: Any, path: Any) -> None:
    """torch.save to a temporary file in the same folder, then os.replace (atomic on POSIX)."""
    path = os.fspath(path)
    tmp = _tmp_name(path)
    torch.save(obj, tmp)
    os.replace(tmp, path)


def json_default(o: Any) -> Any:
    """JSON fallback: numpy scalars -> Python numbers, tensors and arrays -> lists, anything else -> str.
    Non-finite floats are written as json writes them (NaN, Infinity), which json.load reads back."""
    if isinstance(o, (np.floating, np.integer, np.bool_)):
        return o.item()
    if isinstance(o, (torch.Tensor, np.ndarray)):
        return o.tolist()
    return str(o)


def atomic_write_json(obj: Any, path: Any, indent: int = 1) -> None:
    """json.dump ``obj`` (with :func:`json_default`) to a temporary file in the same folder, then os.replace."""
    path = os.fspath(path)
    tmp = _tmp_name(path)
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=indent, default=json_default)
    os.replace(tmp, path)


def load_checkpoint(path: Any, what: str, keys: Sequence[str] = ()) -> dict:
    """torch.load a result or checkpoint file written by ntk_fast, with errors that name the file.

    Raises FileNotFoundError when ``path`` does not exist, and ValueError when it cannot be unpickled (truncated,
    overwritten, not a torch file), is not a dict, or lacks one of ``keys``. ``what`` names the caller in the
    message ("train resume", "KernelFlowResult.load", ...). The file is only read, never modified.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: no such file: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # pickle, zip and EOF errors all mean the same thing to the user
        raise ValueError(f"{what}: {path} is corrupt or not an ntk_fast file "
                         f"({type(exc).__name__}: {exc})") from exc
    if not isinstance(blob, dict):
        raise ValueError(f"{what}: {path} holds a {type(blob).__name__}, not an ntk_fast result or checkpoint")
    missing = [k for k in keys if k not in blob]
    if missing:
        raise ValueError(f"{what}: {path} is not an ntk_fast result or checkpoint of this kind "
                         f"(missing {', '.join(missing)})")
    return blob
