"""Results of the dynamics (trainer and frozen-kernel solver) and the files ntk_fast writes.

One result shape (:class:`DynamicsResult`) for both entry points.  Every tensor has a leading axis of the K
runs it describes (the K nets of a trainer ensemble, the E problems of a solver call), also for K = 1:

    F_train (K, n), F_test (K, m) or None   the outputs F = alpha (f - f0) (trainer) or -Theta c (solver)
    outputs                                 a dict property {"train": F_train, "test": F_test (when given)}
    t (K,) float64, steps (K,), attempts (K,) int64   flow time, accepted steps and attempts per run
    status, statuses                        the overall status and one per run (vocabulary below)
    history                                 history[k]: the list of records (dicts) of run k, in order
    final                                   final[k]: the last record of run k with its status (and summaries)
    config, wall                            the arguments (JSON-safe) and seconds spent

Records are history entries (event "scheduled": a step of the log-linear record schedule; "converged": the
step that reached the margin; "stopped": the step where a limit stopped a net off the schedule (trainer);
"final": the end state); "checkpoint" means only the resume file.

Status vocabulary (per run; :func:`overall_status` makes the overall one):

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

Files.  Every file ntk_fast writes carries ``format_version`` (:data:`FORMAT_VERSION`); files without it were
written before versions existed (version 1) and are read through converters; a newer version is refused with
an error naming it.  Results are saved as ``<stem>.pt`` (torch.save) and ``<stem>.json`` (summary and history),
both atomically; every JSON file goes through :func:`write_json` (one NaN policy: NaN -> null, +-inf -> "inf"
/ "-inf").
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

# Version 1: files of the releases before format versions (no field); 2: this layout.
FORMAT_VERSION = 2
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


# ------------------------------------------------------------------------------------------- files
def stem_of(path: Any) -> str:
    """``path`` without a trailing ".pt" (the common stem of a result's .pt and .json files)."""
    path = os.fspath(path)
    return path[:-3] if path.endswith(".pt") else path


def _tmp_name(path: str) -> str:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    return f"{path}.tmp{os.getpid()}"


def atomic_save(obj: Any, path: Any) -> None:
    """torch.save to a temporary file in the same folder, then os.replace (atomic on POSIX).  A dict gets
    ``format_version`` = FORMAT_VERSION."""
    path = os.fspath(path)
    if isinstance(obj, dict):
        obj = {"format_version": FORMAT_VERSION, **obj}
    tmp = _tmp_name(path)
    torch.save(obj, tmp)
    os.replace(tmp, path)


def json_safe(o: Any) -> Any:
    """A JSON-safe copy: NaN -> None (null), +-inf -> "inf" / "-inf", numpy and 0-d tensors -> numbers, small
    tensors -> lists, large ones -> a "<tensor (shape)>" note, anything else -> str."""
    if isinstance(o, dict):
        return {str(k): json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_safe(v) for v in o]
    if isinstance(o, torch.Tensor):
        return json_safe(o.tolist()) if o.numel() <= 64 else f"<tensor {tuple(o.shape)}>"
    if isinstance(o, np.ndarray):
        return json_safe(o.tolist()) if o.size <= 64 else f"<array {tuple(o.shape)}>"
    if isinstance(o, float) and not math.isfinite(o):
        return None if math.isnan(o) else ("inf" if o > 0 else "-inf")
    if isinstance(o, (np.floating, np.integer, np.bool_)):
        return json_safe(o.item())
    if isinstance(o, (str, int, float, bool)) or o is None:
        return o
    return str(o)


def write_json(path: Any, obj: Dict[str, Any], indent: int = 1) -> None:
    """The one JSON writer: ``format_version`` first, then :func:`json_safe` of ``obj``, written to a temporary
    file in the same folder and renamed (atomic)."""
    path = os.fspath(path)
    tmp = _tmp_name(path)
    with open(tmp, "w") as fh:
        json.dump({"format_version": FORMAT_VERSION, **json_safe(obj)}, fh, indent=indent)
    os.replace(tmp, path)


class FormatVersionError(ValueError):
    """A file of a format version this code does not read (newer, or not a version)."""


def format_version(blob: Dict[str, Any], path: Any, what: str) -> int:
    """The format version of a file's contents: 1 when absent (written before versions), else the field;
    ValueError naming the version when it is newer than this code reads or not an integer."""
    v = blob.get("format_version", 1)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise FormatVersionError(f"{what}: {os.fspath(path)} has an invalid format_version {v!r}")
    if v > FORMAT_VERSION:
        raise FormatVersionError(f"{what}: {os.fspath(path)} has format version {v}, newer than this ntk_fast reads "
                         f"(up to {FORMAT_VERSION}); upgrade ntk_fast to read it")
    return v


def read_json(path: Any, what: str) -> Dict[str, Any]:
    """json.load a file ntk_fast wrote, checking its format version (see :func:`format_version`)."""
    with open(os.fspath(path)) as fh:
        obj = json.load(fh)
    if isinstance(obj, dict):
        format_version(obj, path, what)
    return obj


def load_checkpoint(path: Any, what: str, keys: Sequence[str] = ()) -> dict:
    """torch.load a result or checkpoint file written by ntk_fast, with errors that name the file.

    Raises FileNotFoundError when ``path`` does not exist, and ValueError when it cannot be unpickled (truncated,
    overwritten, not a torch file), is not a dict, has a newer format version, or lacks one of ``keys``.
    ``what`` names the caller in the message.  The file is only read, never modified.
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
    format_version(blob, path, what)
    missing = [k for k in keys if k not in blob]
    if missing:
        raise ValueError(f"{what}: {path} is not an ntk_fast result or checkpoint of this kind "
                         f"(missing {', '.join(missing)})")
    return blob


# ------------------------------------------------------------------------------------------ result
@dataclass
class DynamicsResult:
    """The common result of :func:`ntk_fast.train` and :func:`ntk_fast.kernel_flow` (see the module docstring
    for the fields; tensors keep their leading K axis also for K = 1)."""
    status: str
    statuses: List[str]
    F_train: torch.Tensor
    F_test: Optional[torch.Tensor]
    t: torch.Tensor
    steps: torch.Tensor
    attempts: torch.Tensor
    history: List[List[Dict[str, Any]]]
    final: List[Dict[str, Any]]
    config: Dict[str, Any] = field(default_factory=dict)
    wall: float = 0.0

    @property
    def outputs(self) -> Dict[str, torch.Tensor]:
        """{"train": F_train (K, n), "test": F_test (K, m)} ("test" only with a test set)."""
        out = {"train": self.F_train}
        if self.F_test is not None:
            out["test"] = self.F_test
        return out

    def history_of(self, k: int = 0) -> List[Dict[str, Any]]:
        """The records of run k (= history[k])."""
        return self.history[k]

    def summary(self) -> Dict[str, Any]:
        """JSON-ready summary: status, statuses, t, steps, attempts, wall, config and final."""
        return {"kind": type(self).__name__, "status": self.status, "statuses": list(self.statuses),
                "t": self.t.tolist(), "steps": self.steps.tolist(), "attempts": self.attempts.tolist(),
                "wall": self.wall, "config": self.config, "final": self.final}

    # subclasses: tensors/objects of their own in the .pt, and the conversion of version-1 files
    def _extra_blob(self) -> Dict[str, Any]:
        return {}

    @classmethod
    def _from_blob(cls, blob: Dict[str, Any]) -> Dict[str, Any]:
        return {}

    @classmethod
    def _from_v1(cls, blob: Dict[str, Any], path: str) -> "DynamicsResult":  # pragma: no cover - overridden
        raise ValueError(f"{cls.__name__}.load: {path} has no format version and is not a file of this kind")

    def save(self, path: Any) -> None:
        """Write ``<stem>.pt`` (every field) and ``<stem>.json`` (summary and history), atomically; a trailing
        .pt of ``path`` is dropped first."""
        stem = stem_of(path)
        base = {f.name: getattr(self, f.name) for f in dataclasses.fields(DynamicsResult)}
        tens = {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in base.items()}
        atomic_save({"kind": type(self).__name__, **tens, **self._extra_blob()}, stem + ".pt")
        write_json(stem + ".json", {**self.summary(), "history": self.history})

    @classmethod
    def load(cls, path: Any) -> "DynamicsResult":
        """Read what :meth:`save` wrote (tensors on the CPU); files of version 1 are converted."""
        p = stem_of(path) + ".pt"
        what = f"{cls.__name__}.load"
        blob = load_checkpoint(p, what)
        if format_version(blob, p, what) == 1:
            return cls._from_v1(blob, p)
        if blob.get("kind") != cls.__name__:
            raise ValueError(f"{what}: {p} holds a {blob.get('kind')!r} result, not a {cls.__name__}")
        names = [f.name for f in dataclasses.fields(DynamicsResult)]
        missing = [k for k in names if k not in blob]
        if missing:
            raise ValueError(f"{what}: {p} is not an ntk_fast result of this kind (missing {', '.join(missing)})")
        return cls(**{k: blob[k] for k in names}, **cls._from_blob(blob))


def _rename(d: Dict[str, Any], renames: Dict[str, str]) -> Dict[str, Any]:
    return {renames.get(k, k): v for k, v in d.items()}


# Version-1 names of the trainer's records and finals, and of its record events.
V1_RECORD_NAMES = {"t1_over_h_code": "t1_code_over_h"}
V1_EVENTS = {"checkpoint": "scheduled"}


def v1_record(r: Dict[str, Any]) -> Dict[str, Any]:
    """A trainer record or final of version 1 in today's names (event "checkpoint" -> "scheduled", no "net")."""
    out = _rename({k: v for k, v in r.items() if k != "net"}, V1_RECORD_NAMES)
    if "event" in out:
        out["event"] = V1_EVENTS.get(out["event"], out["event"])
    return out


def nested_history(flat: List[Dict[str, Any]], K: int) -> List[List[Dict[str, Any]]]:
    """The version-1 trainer history (one flat list with a "net" index) as one list per net."""
    return [[v1_record(r) for r in flat if r["net"] == k] for k in range(K)]


@dataclass
class FlowResult(DynamicsResult):
    """Outcome of :func:`ntk_fast.train` (a :class:`DynamicsResult` for K nets).

    nets: the trained nets (``net``: the first); f0_train (K, n), f0_test (K, m): the outputs f(w0) (``outputs``
    also holds them); final[k]: the last record of net k with status, t1, t_grow, t1_code_over_h and
    weight_change; ensemble: ensemble observables of the test outputs at the end (K > 1 with a test set);
    ensemble_history: one record per step s of the shared record schedule, made once every net has passed s or
    stopped: the ensemble observables (var, ens_err, mean_err, rms_mean_F) of the nets' test outputs at step s
    (a net stopped earlier contributes its final output), with t_mean, t_min, t_max and the nets stopped.
    """
    nets: List[Any] = field(default_factory=list)
    f0_train: Optional[torch.Tensor] = None
    f0_test: Optional[torch.Tensor] = None
    ensemble: Optional[Dict[str, float]] = None
    ensemble_history: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def net(self):
        return self.nets[0]

    @property
    def outputs(self) -> Dict[str, torch.Tensor]:
        """{"train", "test"} as for every result, plus "f0_train" and "f0_test"."""
        out = dict(DynamicsResult.outputs.fget(self))
        for k in ("f0_train", "f0_test"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        return out

    def summary(self) -> Dict[str, Any]:
        return {**super().summary(), "ensemble": self.ensemble, "ensemble_history": self.ensemble_history}

    def _extra_blob(self) -> Dict[str, Any]:
        a = self.nets[0]
        cpu = lambda t: None if t is None else t.detach().cpu()  # noqa: E731
        return {"arch": dict(d=a.d, h=a.h, L=a.L, activation=a.activation, beta=a.beta),
                "weights": [[w.detach().cpu() for w in m.weights] for m in self.nets],
                "f0_train": cpu(self.f0_train), "f0_test": cpu(self.f0_test), "ensemble": self.ensemble,
                "ensemble_history": self.ensemble_history}

    @staticmethod
    def _nets(arch: Dict[str, Any], weights: List[List[torch.Tensor]]) -> List[Any]:
        from ntk_fast.models.fc import FCNet
        nets = []
        for ws in weights:
            m = FCNet(arch["d"], arch["h"], arch["L"], activation=arch["activation"], beta=arch["beta"],
                      dtype=ws[0].dtype, device="meta").to_empty(device="cpu")
            with torch.no_grad():
                for p, w in zip(m.weights, ws):
                    p.copy_(w)
            nets.append(m)
        return nets

    @classmethod
    def _from_blob(cls, blob: Dict[str, Any]) -> Dict[str, Any]:
        return {"nets": cls._nets(blob["arch"], blob["weights"]), "f0_train": blob["f0_train"],
                "f0_test": blob["f0_test"], "ensemble": blob["ensemble"],
                "ensemble_history": blob["ensemble_history"]}

    @classmethod
    def _from_v1(cls, blob: Dict[str, Any], path: str) -> "FlowResult":
        """A FlowResult file of version 1: {summary, history (flat, "net" keys), arch, dtype, weights, outputs}."""
        missing = [k for k in ("arch", "summary", "weights", "history") if k not in blob]
        if missing:
            raise ValueError(f"FlowResult.load: {path} is not an ntk_fast result or checkpoint of this kind "
                             f"(missing {', '.join(missing)})")
        s, outs = blob["summary"], blob.get("outputs", {})
        K = len(blob["weights"])
        final = [v1_record(f) for f in s["final"]]
        return cls(status=s["status"], statuses=s["statuses"], F_train=outs.get("train"), F_test=outs.get("test"),
                   t=torch.tensor([f["t"] for f in final], dtype=torch.float64),
                   steps=torch.tensor([f["step"] for f in final]), attempts=torch.tensor([f["attempts"] for f in final]),
                   history=nested_history(blob["history"], K), final=final, config=s.get("config", {}),
                   wall=max(f.get("wall", 0.0) for f in final), nets=cls._nets(blob["arch"], blob["weights"]),
                   f0_train=outs.get("f0_train"), f0_test=outs.get("f0_test"), ensemble=s.get("ensemble"),
                   ensemble_history=[v1_record(r) for r in s.get("ensemble_history", [])])


@dataclass
class KernelFlowResult(DynamicsResult):
    """Outcome of :func:`ntk_fast.kernel_flow` (a :class:`DynamicsResult` for K problems): also c (K, n), the
    accumulated int (1/n) r(F) dt with F_train = -Theta c (and F_test = -Theta_test,train c)."""
    c: Optional[torch.Tensor] = None

    def _extra_blob(self) -> Dict[str, Any]:
        return {"c": self.c.detach().cpu() if self.c is not None else None}

    @classmethod
    def _from_blob(cls, blob: Dict[str, Any]) -> Dict[str, Any]:
        return {"c": blob["c"]}

    @classmethod
    def _from_v1(cls, blob: Dict[str, Any], path: str) -> "KernelFlowResult":
        """A KernelFlowResult file of version 1: its dataclass fields (F_train, F_test, c, t, steps, attempts,
        status, statuses, history (nested), config, wall, single)."""
        need = ("F_train", "F_test", "c", "t", "steps", "attempts", "status", "statuses", "history")
        missing = [k for k in need if k not in blob]
        if missing:
            raise ValueError(f"KernelFlowResult.load: {path} is not an ntk_fast result or checkpoint of this kind "
                             f"(missing {', '.join(missing)})")
        final = [{**(h[-1] if h else {}), "status": s} for h, s in zip(blob["history"], blob["statuses"])]
        config = _rename(blob.get("config", {}), V1_KERNEL_CONFIG)
        return cls(status=blob["status"], statuses=blob["statuses"], F_train=blob["F_train"], F_test=blob["F_test"],
                   t=blob["t"], steps=blob["steps"], attempts=blob["attempts"], history=blob["history"], final=final,
                   config=config, wall=blob.get("wall", 0.0), c=blob["c"])


# Version-1 names in the solver's config (results and checkpoints).
V1_KERNEL_CONFIG = {"beta": "loss_beta", "checkpoint_step": "record_spacing", "checkpoint_rate": "record_rate"}
