"""Shared state of a generic run: data and model checks, the alpha-scaled loss, records, checkpoints, result.

Records (``history``, one dict per record and model, key ``net`` = model index; ``event`` is "scheduled" on
the record schedule, "converged" where the margin is met, "stopped" where a budget stops a model off the
schedule, "final" at the end of the call, as in the FC trainer; a resumed run drops the "stopped" and "final"
records of the file it resumes)
hold the fields of the fused trainer's records that make sense for any model: step, t, wall, train_loss (L), train_mean_l (mean l), train_err,
train_nd (points with y F < 1), train_rms_F, dw (|w - w0| per parameter tensor), dw_total, w0_norm, and with a
test set test_loss, test_err, test_nd, test_rms_F; optionally kernel_change.  The flow adds attempts, dt,
next_dt, dgrad, dout, grad_norm; ADAM/SGD add epoch and batch_loss.

Ensembles (K > 1) with a test set also get ensemble records (``ensemble_history``: variance of the K test
outputs and error of the mean predictor at every scheduled step, then "final") from the FC trainer's
:class:`ntk_fast.dynamics.ensemble.EnsembleTracker`, saved in the resume file with the rest.
"""
from __future__ import annotations

import copy
import hashlib
import math
import time
import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ntk_fast.dynamics import observables as obs
from ntk_fast.dynamics.ensemble import EnsembleTracker
from ntk_fast.dynamics.generic.functional import FlatEnsemble
from ntk_fast.dynamics.generic.losses import LossSpec, check_labels, is_pm1
from ntk_fast.dynamics.results import DynamicsResult, atomic_save, load_checkpoint, stem_of
from ntk_fast.dynamics.trainer import FlowResult

CKPT_VERSION = 2          # 2: record events as the FC trainer's, ensemble tracker state
# budget stops that a resumed run re-decides with its own limits
RESUMABLE = ("running", "max_time", "max_steps", "max_epochs", "max_wall")


def check_data(x: Any, y: Any, spec: LossSpec, dtype: torch.dtype, device: torch.device, xname: str, yname: str):
    """x (n, ...) finite, y (n,) finite (+-1 for margin losses); returned in the model's dtype and device."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"train: {xname} must be a tensor with points along dim 0, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0]:
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"train: {yname} must be a tensor of shape ({x.shape[0]},) matching {xname}, got {shape}")
    if not torch.isfinite(x).all():
        raise ValueError(f"train: {xname} contains NaN or infinite values")
    check_labels(spec, y, yname)
    return (x.detach().to(dtype=dtype, device=device).contiguous(),
            y.detach().to(dtype=dtype, device=device).contiguous())


def digest(*ts: torch.Tensor) -> str:
    h = hashlib.sha1()
    for t in ts:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class Run:
    """Everything a dynamics loop needs besides its own update: the models, data, loss and bookkeeping."""

    def __init__(self, models: List[nn.Module], x, y, alpha: float, spec: LossSpec, c: float, loss_beta: float,
                 x_test, y_test, batched: Optional[bool], chunk: Optional[int], kernel_points, kernel_every: int):
        self.models = models
        self.ens = FlatEnsemble(models, batched)
        self.K, self.P = self.ens.K, self.ens.P
        dt, dev = self.ens.dtype, self.ens.device
        self.x, self.y = check_data(x, y, spec, dt, dev, "x", "y")
        self.x_test = self.y_test = None
        if (x_test is None) != (y_test is None):
            raise ValueError("train: give both x_test and y_test, or neither")
        if x_test is not None:
            self.x_test, self.y_test = check_data(x_test, y_test, spec, dt, dev, "x_test", "y_test")
            if self.x_test.shape[1:] != self.x.shape[1:]:
                raise ValueError(f"train: x_test has per-point shape {tuple(self.x_test.shape[1:])}, expected "
                                 f"{tuple(self.x.shape[1:])} like x")
        self.n = self.x.shape[0]
        self.alpha, self.spec, self.c, self.beta, self.chunk = alpha, spec, c, loss_beta, chunk
        self.margin_stop = is_pm1(self.y)
        self.W0 = self.ens.W.clone()
        self.f0 = self.ens.forward(self.W0, self.x, chunk)
        self.f0_test = self.ens.forward(self.W0, self.x_test, chunk) if self.x_test is not None else None
        self.w0_norm = torch.linalg.norm(self.W0.double(), dim=1).tolist()
        self.history: List[Dict[str, Any]] = []
        self._F_cache: Optional[tuple] = None          # (W, W._version, train outputs): see train_outputs
        self.tracker = EnsembleTracker(self.K)
        self.track = self.K > 1 and self.x_test is not None
        self.wall0, self.wall_before = time.perf_counter(), 0.0
        self._setup_kernel(kernel_points, kernel_every)

    # --------------------------------------------------------------------------------------------- loss
    def loss_fn(self, f: torch.Tensor, y: torch.Tensor, f0: torch.Tensor) -> torch.Tensor:
        """L = c(alpha) mean_i l(F_i, y_i),  F = alpha (f - f0)."""
        return self.c * self.spec.per_point(self.alpha * (f - f0), y, self.beta).mean()

    def stats(self, F: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
        """loss, mean l, error, nd, rms F of one model's outputs F (n,) on labels y."""
        lmean = float(self.spec.per_point(F, y, self.beta).double().mean())
        return dict(loss=self.c * lmean, mean_l=lmean, err=float(obs.error(F, y)), nd=int(obs.under_margin(F, y)),
                    rms_F=float(obs.rms(F)))

    def step_stats(self, F: torch.Tensor) -> Tuple[List[float], List[int]]:
        """(mean l, nd) of the train outputs F (m, n) of m models in one pass (what a step needs; one host sync
        for all of them instead of the five of :meth:`stats` per model)."""
        lm = self.spec.per_point(F, self.y, self.beta).double().mean(1)
        nd = obs.under_margin(F, self.y).to(lm.dtype)
        both = torch.stack([lm, nd]).tolist()
        return both[0], [int(v) for v in both[1]]

    def wall(self) -> float:
        return self.wall_before + time.perf_counter() - self.wall0

    # --------------------------------------------------------------------------------------------- kernel
    def _setup_kernel(self, kernel_points, kernel_every: int) -> None:
        self.kernel_every = int(kernel_every)
        self.test_every = 1
        self.xk = obs.kernel_points_of(kernel_points, self.x, self.x_test)
        self.theta0 = None
        if self.xk is not None:
            self._work = [copy.deepcopy(m) for m in self.models]
            self.theta0 = [self.theta(k, self.W0[k]) for k in range(self.K)]

    def theta(self, k: int, row: torch.Tensor) -> torch.Tensor:
        from ntk_fast.ntk.empirical import empirical_ntk
        return empirical_ntk(self.ens.load_into(self._work[k], row), self.xk)

    # --------------------------------------------------------------------------------------------- records
    def record(self, k: int, W: torch.Tensor, F: torch.Tensor, extra: Dict[str, Any], event: str, n_sched: int,
               scheduled: bool) -> Dict[str, Any]:
        """Append the record of model k (weights row W[k], train outputs F (n,) = alpha (f - f0)); ``scheduled``:
        a step of the record schedule, the n_sched-th of model k (test_every, kernel_every count these)."""
        dw = [float(torch.linalg.norm((a[k] - b[k]).double())) for a, b in
              zip(self.ens.param_rows(W), self.ens.param_rows(self.W0))]
        rec = dict(net=int(k), event=event, **extra, wall=self.wall())
        rec.update({f"train_{kk}": v for kk, v in self.stats(F, self.y).items()})
        rec.update(dw=dw, dw_total=math.sqrt(sum(v * v for v in dw)), w0_norm=self.w0_norm[k])
        if self.x_test is not None and (not scheduled or n_sched % self.test_every == 0):
            Ft = self.test_outputs(W[k:k + 1], [k])[0]
            rec.update({f"test_{kk}": v for kk, v in self.stats(Ft, self.y_test).items()})
            if self.track:
                self.tracker.add(k, int(extra["step"]), float(extra["t"]), Ft, scheduled)
        if self.theta0 is not None and (event == "final" or (self.kernel_every > 0 and scheduled
                                                             and n_sched % self.kernel_every == 0)):
            rec["kernel_change"] = obs.kernel_change(self.theta(k, W[k]), self.theta0[k])
        self.history.append(rec)
        return rec

    def flush_ensemble(self, status: List[str], at_end: bool = False) -> None:
        """Ensemble records of the scheduled steps every model has passed (models not running count as stopped)."""
        if not self.track:
            return
        for k, s in enumerate(status):
            if s != "running":
                self.tracker.stop(k)
        self.tracker.flush(self.y_test, self.wall(), at_end=at_end)

    def test_outputs(self, Wsub: torch.Tensor, ks: List[int]) -> torch.Tensor:
        """alpha (f - f0) on the test set for the models ks whose rows are Wsub."""
        f = torch.stack([self.ens.forward_row(Wsub[i], k, self.x_test, self.chunk) for i, k in enumerate(ks)])
        return self.alpha * (f - self.f0_test[ks])

    def train_outputs(self, W: torch.Tensor) -> torch.Tensor:
        """alpha (f - f0) on the training set, (K, n).  Asked again for the same tensor W with no in-place change
        since (same ``W._version``: a budget stop's record, the final record and the result at the end of a
        run) it returns the outputs already computed instead of a new full-set forward pass."""
        cached = self._F_cache
        if cached is not None and cached[0] is W and cached[1] == W._version:
            return cached[2]
        F = self.alpha * (self.ens.forward(W, self.x, self.chunk) - self.f0)
        self._F_cache = (W, W._version, F)
        return F

    # --------------------------------------------------------------------------------------------- files
    def config(self, dynamics: str, **more) -> Dict[str, Any]:
        return dict(dynamics=dynamics, alpha=self.alpha, loss=self.spec.name, loss_prefactor=self.c,
                    loss_beta=self.beta, K=self.K, n=self.n, P=self.P, dtype=str(self.ens.dtype),
                    model=type(self.models[0]).__name__, data=digest(self.x, self.y), **more)

    def save(self, path: Optional[str], config: Dict[str, Any], state: Dict[str, Any], S: Dict[str, Any]) -> None:
        if path is None:
            return
        atomic_save(dict(version=CKPT_VERSION, kind="generic", config=config, state=state, host=copy.deepcopy(S),
                         history=list(self.history), ensemble=self.tracker.state(), wall=self.wall(),
                         W0=self.W0.cpu(), f0=self.f0.cpu()), path)

    def load(self, path: str, config: Dict[str, Any]) -> Dict[str, Any]:
        blob = load_checkpoint(path, "train(resume=...)", ("version", "kind", "config", "state", "host", "history"))
        if blob["kind"] != "generic" or blob["version"] != CKPT_VERSION:
            raise ValueError(f"train: {path} is not a generic-trainer checkpoint of version {CKPT_VERSION}")
        for key, v in config.items():
            if blob["config"].get(key) != v:
                raise ValueError(f"train: resume={path} was written with {key}={blob['config'].get(key)!r}, "
                                 f"but this call has {key}={v!r}")
        self.W0.copy_(blob["W0"])
        self.f0.copy_(blob["f0"])
        self.history = [r for r in blob["history"] if r["event"] not in ("final", "stopped")]
        self.wall_before = blob["wall"]
        status = blob["host"]["status"]
        for k, s in enumerate(status):
            if s in RESUMABLE:
                status[k] = "running"
        self.tracker = EnsembleTracker.from_state(blob["ensemble"], self.K, self.ens.device)
        self.tracker.resumed([k for k, s in enumerate(status) if s == "running"])
        return blob

    # --------------------------------------------------------------------------------------------- result
    def result(self, W: torch.Tensor, S: Dict[str, Any], config: Dict[str, Any]) -> "GenericResult":
        from ntk_fast.dynamics.results import overall_status
        self.flush_ensemble(S["status"], at_end=True)
        F = self.train_outputs(W)
        outputs = {"train": F, "f0_train": self.f0.clone()}
        ens = None
        if self.x_test is not None:
            Ft = self.test_outputs(W, list(range(self.K)))
            outputs.update(test=Ft, f0_test=self.f0_test.clone())
            if self.K > 1:
                ens = obs.ensemble_stats(Ft, self.y_test)
        finals = []
        for k in range(self.K):
            last = [r for r in self.history if r["net"] == k][-1]
            fin = {kk: v for kk, v in last.items() if kk != "event"}
            fin.update(status=S["status"][k], t1=S["t1"][k], weight_change=last["dw_total"] / last["w0_norm"])
            finals.append(fin)
        nets = [self.ens.load_into(copy.deepcopy(m), W[k]) for k, m in enumerate(self.models)]
        statuses = list(S["status"])
        history = [[r for r in self.history if r["net"] == k] for k in range(self.K)]
        t = torch.tensor([float(f.get("t", 0.0)) for f in finals], dtype=torch.float64)
        steps = torch.tensor([int(f.get("step", 0)) for f in finals], dtype=torch.int64)
        attempts = torch.tensor([int(f.get("attempts", f.get("step", 0))) for f in finals], dtype=torch.int64)
        return GenericResult(status=overall_status(statuses), statuses=statuses, F_train=F,
                             F_test=outputs.get("test"), t=t, steps=steps, attempts=attempts, history=history,
                             final=finals, config=config, nets=nets, f0_train=outputs["f0_train"],
                             f0_test=outputs.get("f0_test"), ensemble=ens,
                             ensemble_history=list(self.tracker.records))


@dataclass
class GenericResult(FlowResult):
    """:class:`~ntk_fast.dynamics.results.FlowResult` of the generic trainer: the same fields (one result shape:
    F_train (K, n), t/steps/attempts (K,), history per model, final); ``nets`` are copies of the given modules
    holding the trained parameters.  ``save`` writes their state dicts (load them back with
    ``GenericResult.load(path, models)``, ``models`` being modules of the same architecture)."""

    def _extra_blob(self) -> Dict[str, Any]:
        cpu = lambda t: None if t is None else t.detach().cpu()  # noqa: E731
        return {"state_dicts": [{k: v.detach().cpu() for k, v in m.state_dict().items()} for m in self.nets],
                "f0_train": cpu(self.f0_train), "f0_test": cpu(self.f0_test), "ensemble": self.ensemble,
                "ensemble_history": self.ensemble_history}

    @classmethod
    def load(cls, path: str, models: Optional[List[nn.Module]] = None) -> "GenericResult":
        blob = load_checkpoint(stem_of(path) + ".pt", "GenericResult.load", ("state_dicts", "F_train", "history"))
        nets = []
        if models is not None:
            if len(models) != len(blob["state_dicts"]):
                raise ValueError(f"GenericResult.load: {len(blob['state_dicts'])} models saved, {len(models)} given")
            for m, sd in zip(models, blob["state_dicts"]):
                m.load_state_dict(sd)
                nets.append(m)
        base = {f.name: blob[f.name] for f in dataclasses.fields(DynamicsResult) if f.name in blob}
        return cls(**base, nets=nets, f0_train=blob["f0_train"], f0_test=blob["f0_test"], ensemble=blob["ensemble"],
                   ensemble_history=blob.get("ensemble_history", []))


def still_running(S: Dict[str, Any], K: int, t_wall: float, max_wall: float) -> List[int]:
    """The models still running; when the wall-clock budget is spent they all stop as "max_wall" (empty list)."""
    active = [k for k in range(K) if S["status"][k] == "running"]
    if active and time.perf_counter() - t_wall >= max_wall:
        for k in active:
            S["status"][k] = "max_wall"
        return []
    return active


def step_bar(progress: bool, desc: str):
    """The loops' progress bar (ntk_fast.progress policy: progress=None means only on a terminal)."""
    from ntk_fast.progress import progress_bar
    return progress_bar(progress, desc=desc, unit="step")
