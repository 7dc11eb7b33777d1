"""One experiment of the paper in a run folder: data, network(s), training, frozen-kernel runs, summary.

Notation is the article's (docs/design.md section 5): last layer over sqrt(h), F = alpha (f - f0), loss
1/(alpha^2 n) sum l(y F).  The reference code (feature_lazy) uses alpha_code = sqrt(h) alpha and
t_code / h = t / (sqrt(h) alpha); summaries store both ``alpha`` and ``alpha_sqrt_h`` (= alpha_code).

A run folder holds (every file with ``format_version``; folders written before versions existed are read as
version 1, newer versions are refused with an error naming the version)::

    config.json         the RunConfig (written first)
    checkpoint.pt       the trainer's resumable checkpoint (while training; removed when the run is done)
    train.pt/.json      the trainer's result (ntk_fast.dynamics.trainer.FlowResult.save)
    outputs.pt          tensors: labels, f0 and F of every net on train and test, and of the kernel runs
    init_kernel.pt/.json   frozen-kernel run with Theta(w0)    (when asked; KernelFlowResult.save)
    final_kernel.pt/.json  frozen-kernel run with Theta(w_T)   (when asked)
    summary.json        the JSON summary, written last and atomically: its presence marks the run done

``run_experiment`` skips a done folder, and resumes an interrupted training from checkpoint.pt.
Networks: net r of an ensemble of K is initialised with torch.Generator().manual_seed(seed + r), so an
ensemble of K equals K single runs with seeds seed .. seed + K - 1 (same init for every alpha and h-free).
Models (``model``): "fc" (FCNet, width h, L hidden layers), "cnn" (the paper's CV, h channels), "resnet"
(WideResNet without batch norm, ``depth``, h = readout channels 64 widen, a multiple of 64); the CNN and the
ResNet take the images as squares (1 channel, or 3 for CIFAR's 3 x 32 x 32), so no PCA.  ``h`` is always the
width of the readout (1/sqrt(h)), so alpha sqrt(h) is the reference code's alpha for every model.
Dynamics (``dynamics``): "flow" (the adaptive gradient flow: the fused trainer for "fc", the generic one
otherwise), "adam" / "sgd" (minibatches of ``batch_size``, ``lr``, ``momentum`` (sgd), ``max_epochs``; model r's
minibatch order is seeded with seed + r); see ntk_fast.dynamics.trainer.train.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from ntk_fast import data
from ntk_fast.data import DTYPES
from ntk_fast.models.fc import FCNet
from ntk_fast.dynamics.generic import DYNAMICS
from ntk_fast.dynamics.results import FormatVersionError, atomic_save, read_json, write_json

SUMMARY = "summary.json"
_OPERATIONAL = ("alpha_sqrt_h", "checkpoint_every", "max_wall")     # may change when a run is resumed
MODELS = ("fc", "cnn", "resnet")


@dataclass
class RunConfig:
    """Everything that defines a run (article notation; alpha multiplies F = f - f0).

    Data: dataset, p (train points), p_test, data_seed, d (PCA dim, None = none), whitening, data_root.
    Net: model ("fc", "cnn", "resnet"), h (readout width: FC width, CNN channels, ResNet 64 widen), L (FC hidden
    layers), depth (ResNet), activation, act_beta (softplus beta), seed (init seed), ensemble (K nets, seeds
    seed + r).
    Dynamics: dynamics ("flow", "adam", "sgd"), alpha, loss, loss_beta, max_dgrad, max_dout, tau (flow);
    lr, batch_size, momentum (sgd), max_epochs (adam/sgd); budgets max_time (t), max_steps, max_wall (seconds,
    per training and per kernel run).  Runs: regular (train the net), init_kernel /
    final_kernel (frozen-kernel dynamics with Theta(w0) / Theta(w_T)), kernel_points (test points for
    the kernel change |Theta_T - Theta_0| / |Theta_0|), checkpoint_every (seconds).
    """
    dataset: str = "digits"
    p: int = 500
    p_test: Optional[int] = 1000
    data_seed: int = 0
    d: Optional[int] = None
    whitening: bool = True
    data_root: Optional[str] = None
    h: int = 100
    L: int = 3
    activation: str = "softplus"
    act_beta: float = 5.0
    seed: int = 0
    ensemble: int = 1
    alpha: float = 1.0
    loss: str = "softhinge"
    loss_beta: float = 20.0
    max_dgrad: float = 1e-4
    max_dout: float = 0.1
    tau: float = 0.0
    max_time: float = math.inf
    max_steps: Optional[int] = None
    max_wall: float = math.inf
    regular: bool = True
    init_kernel: bool = False
    final_kernel: bool = False
    kernel_points: int = 256
    dtype: str = "float64"
    device: str = "cpu"
    checkpoint_every: float = 60.0
    model: str = "fc"
    depth: int = 10
    dynamics: str = "flow"
    lr: float = 1e-3
    batch_size: int = 32
    momentum: float = 0.0
    max_epochs: Optional[float] = None

    @property
    def alpha_sqrt_h(self) -> float:
        """alpha sqrt(h): the lazy/feature control parameter, equal to the reference code's alpha."""
        return self.alpha * math.sqrt(self.h)

    def to_json(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)
        out["alpha_sqrt_h"] = self.alpha_sqrt_h
        return out

    @classmethod
    def from_json(cls, obj: Dict[str, Any]) -> "RunConfig":
        kw = {}
        for f in dataclasses.fields(cls):
            if f.name in obj:
                v = obj[f.name]
                kw[f.name] = float(v) if isinstance(v, str) and v in ("inf", "-inf") else v
        return cls(**kw)

    def check(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ValueError(f"alpha must be a positive finite number, got {self.alpha}")
        if self.ensemble < 1:
            raise ValueError(f"ensemble must be >= 1, got {self.ensemble}")
        if not self.h >= 1:
            raise ValueError(f"h must be >= 1, got {self.h}")
        if not (self.regular or self.init_kernel):
            raise ValueError("nothing to run: ask for regular training and/or the init-kernel run")
        if self.final_kernel and not self.regular:
            raise ValueError("final_kernel needs regular training (Theta at the end of training)")
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.dynamics not in DYNAMICS:
            raise ValueError(f"dynamics must be one of {DYNAMICS}, got {self.dynamics!r}")
        if self.model == "resnet" and (self.h < 64 or self.h % 64):
            raise ValueError(f"h of the resnet is its readout width 64 widen: a multiple of 64, got {self.h}")
        if self.model != "fc" and self.d is not None:
            raise ValueError(f"the {self.model} takes images: no PCA (d must be None, got {self.d})")


LOCK = "running.pid"


@contextlib.contextmanager
def run_lock(folder: str):
    """Hold ``folder/running.pid`` (this process's pid, created exclusively) while a run works in ``folder``.

    A second process (another sweep, a second terminal) on the same folder gets a RuntimeError naming the pid
    that holds it instead of two runs writing the same checkpoint.  A lock left by a process that no longer
    exists (killed with -9, machine restarted) is taken over.  Same-host only: pids of other machines sharing
    the folder cannot be checked.
    """
    path = os.path.join(folder, LOCK)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open(path) as f:
                    pid = int(f.read().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid > 0 and pid != os.getpid() and _alive(pid):
                raise RuntimeError(f"{folder} is being run by process {pid} (lock {path}); wait for it, or "
                                   f"remove {path} if that process is not an ntk_fast run") from None
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)                              # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        break
    else:
        raise RuntimeError(f"could not take the lock {path}")
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_summary(folder: str) -> Optional[Dict[str, Any]]:
    """The summary of a done run folder, else None (also for an unreadable file, so that the run is redone);
    FormatVersionError for a summary of a newer format version."""
    path = os.path.join(folder, SUMMARY)
    if not os.path.exists(path):
        return None
    try:
        return read_json(path, "read_summary")
    except FormatVersionError:
        raise
    except (OSError, ValueError):
        return None


def make_nets(cfg: RunConfig, d: int) -> List[torch.nn.Module]:
    """The K models of a run (``cfg.model``) for inputs of d features: model r initialised from
    torch.Generator().manual_seed(seed + r) (on the CPU)."""
    dtype = DTYPES[cfg.dtype]
    gens = [torch.Generator().manual_seed(cfg.seed + r) for r in range(cfg.ensemble)]
    if cfg.model == "fc":
        return [FCNet(d, cfg.h, cfg.L, activation=cfg.activation, beta=cfg.act_beta, dtype=dtype,
                      generator=g).to(cfg.device) for g in gens]
    channels = next((c for c in (1, 3) if d % c == 0 and math.isqrt(d // c) ** 2 == d // c), None)
    if channels is None:
        raise ValueError(f"the {cfg.model} needs square images of 1 or 3 channels, got {d} input features")
    if cfg.model == "cnn":
        from ntk_fast.models.cnn import CV
        return [CV(cfg.h, in_channels=channels, activation=cfg.activation, beta=cfg.act_beta, dtype=dtype,
                   generator=g).to(cfg.device) for g in gens]
    from ntk_fast.models.resnet import WideResNet
    return [WideResNet(cfg.depth, cfg.h // 64, in_channels=channels, activation=cfg.activation,
                       beta=cfg.act_beta, dtype=dtype, generator=g).to(cfg.device) for g in gens]


def _dynamics_kwargs(cfg: RunConfig) -> Dict[str, Any]:
    """train's keywords for cfg.dynamics: none for the flow, the optimizer's for ADAM/SGD."""
    if cfg.dynamics == "flow":
        return {}
    kw: Dict[str, Any] = dict(dynamics=cfg.dynamics, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed,
                              max_epochs=cfg.max_epochs)
    if cfg.dynamics == "sgd":
        kw["momentum"] = cfg.momentum
    return kw


def load_run_data(cfg: RunConfig):
    """(x_train, y_train, x_test, y_test) of a run, in its dtype and on its device."""
    xtr, ytr, xte, yte = data.load_dataset(cfg.dataset, cfg.p, cfg.p_test, seed=cfg.data_seed, d=cfg.d,
                                           whitening=cfg.whitening, root=cfg.data_root, dtype=DTYPES[cfg.dtype])
    dev = torch.device(cfg.device)
    return xtr.to(dev), ytr.to(dev), xte.to(dev), yte.to(dev)


def kernel_run(net: FCNet, xtr, ytr, xte, yte, cfg: RunConfig, progress: Optional[bool]) -> Any:
    """Frozen-kernel dynamics dF/dt = -(1/n) Theta (l'(y F) y) with Theta the NTK of ``net`` at its weights
    (ntk_fast.dynamics.solver.frozen_kernel_run), same loss, step rule, margin stop and budgets as the trainer."""
    from ntk_fast.dynamics.solver import frozen_kernel_run
    return frozen_kernel_run(net, xtr, ytr, xte, yte, **_shared_kwargs(cfg), progress=progress)


def _shared_kwargs(cfg: RunConfig) -> Dict[str, Any]:
    """The keyword arguments train and kernel_flow share (ntk_fast.dynamics.config.FlowConfig) from a RunConfig."""
    return dict(loss=cfg.loss, loss_beta=cfg.loss_beta, max_dgrad=cfg.max_dgrad, max_dout=cfg.max_dout,
                max_steps=cfg.max_steps, max_time=cfg.max_time, max_wall=cfg.max_wall)


def _outputs_of(res: Any) -> Dict[str, torch.Tensor]:
    """{"train": F (K, n), "test": ...} of a result (ntk_fast.dynamics.results.DynamicsResult), on the CPU."""
    return {k: v.detach().cpu() for k, v in res.outputs.items()}


def _kernel_summary(res: Any, yte: torch.Tensor) -> Dict[str, Any]:
    """Status, t, steps, wall, the last record and the test error of a frozen-kernel run (problem 0)."""
    s: Dict[str, Any] = {"status": res.statuses[0], "t": float(res.t[0]), "steps": int(res.steps[0]),
                         "attempts": int(res.attempts[0]), "wall": res.wall}
    if res.history[0]:
        s["last_record"] = {k: v for k, v in res.history[0][-1].items() if isinstance(v, (int, float, str))}
    if res.F_test is not None:
        Ft = res.F_test[0].detach().cpu().double()
        s["test_err"] = float(((Ft * yte.cpu().double()) <= 0).double().mean())
    return s


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| (Euclidean norms)."""
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    return float((a - b).norm() / b.norm()) if float(b.norm()) > 0 else math.nan


def run_experiment(cfg: RunConfig, folder: str, progress: Optional[bool] = None, log=print) -> Dict[str, Any]:
    """Run (or finish, or skip) the experiment ``cfg`` in ``folder``; return its summary (see module doc).

    The summary holds config, alpha_sqrt_h, status, final observables of net 0 (t, step, train/test error,
    kernel_change, t1, weight_change), per-net test errors, ensemble stats (K > 1), kernel runs and the
    relative gap |F_net - F_kernel| / |F_kernel| of test outputs between the trainer and the init-kernel run.
    """
    cfg.check()
    cfg_path = os.path.join(folder, "config.json")
    if os.path.exists(cfg_path):
        try:
            old = RunConfig.from_json(read_json(cfg_path, "run_experiment"))
        except FormatVersionError:
            raise
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"{cfg_path} is corrupt or not an ntk_fast run config ({exc}); the folder is left "
                             "as it is: repair the file or use a new folder") from exc
        diff = {k: (getattr(old, k), getattr(cfg, k)) for k in cfg.to_json()
                if k not in _OPERATIONAL and getattr(old, k) != getattr(cfg, k)}
        if diff:
            raise ValueError(f"{folder} holds a run with another config (old, new: {diff}); use a new folder")
    done = read_summary(folder)
    if done is not None:
        log(f"{folder}: done already, skipped")
        return done
    os.makedirs(folder, exist_ok=True)
    with run_lock(folder):
        write_json(cfg_path, cfg.to_json())
        wall0 = time.perf_counter()
        xtr, ytr, xte, yte = load_run_data(cfg)
        nets = make_nets(cfg, xtr.shape[1])
        summary: Dict[str, Any] = {"config": cfg.to_json(), "alpha": cfg.alpha, "alpha_sqrt_h": cfg.alpha_sqrt_h,
                                   "h": cfg.h, "seed": cfg.seed, "n_train": int(xtr.shape[0]),
                                   "n_test": int(xte.shape[0]), "input_dim": int(xtr.shape[1])}
        tensors: Dict[str, Any] = {"y_train": ytr.cpu(), "y_test": yte.cpu()}
        trained = None
        if cfg.regular:
            from ntk_fast.dynamics.trainer import train
            ckpt = os.path.join(folder, "checkpoint.pt")
            resume = ckpt if os.path.exists(ckpt) else None
            if resume:
                log(f"{folder}: resuming from {ckpt}")
            res = train(nets if cfg.ensemble > 1 else nets[0], xtr, ytr, cfg.alpha, x_test=xte, y_test=yte,
                        **_shared_kwargs(cfg), tau=cfg.tau, kernel_points=cfg.kernel_points, checkpoint=ckpt,
                        checkpoint_every=cfg.checkpoint_every, resume=resume, progress=progress,
                        **_dynamics_kwargs(cfg))
            res.save(os.path.join(folder, "train"))
            trained = res
            fin = res.final[0]
            keep = ("status", "step", "attempts", "t", "epoch", "t_code_over_h", "train_err", "train_nd", "test_err",
                    "test_nd", "train_mean_l", "test_rms_F", "kernel_change", "t1", "t1_code_over_h", "t_grow",
                    "weight_change", "wall")
            summary.update({"status": res.status, "resumed": resume is not None,
                            "train": {k: fin.get(k) for k in keep if k in fin},
                            "test_err_per_net": [f.get("test_err") for f in res.final],
                            "kernel_change_per_net": [f.get("kernel_change") for f in res.final],
                            "ensemble": res.ensemble})
            outs = _outputs_of(res)
            tensors.update({f"regular_{k}": v for k, v in outs.items()})
        if cfg.init_kernel or cfg.final_kernel:
            runs = ([("init_kernel", nets[0])] if cfg.init_kernel else []) + \
                   ([("final_kernel", trained.nets[0])] if cfg.final_kernel else [])
            for name, net in runs:
                log(f"{folder}: {name.replace('_', ' ')} run")
                kres = kernel_run(net, xtr, ytr, xte, yte, cfg, progress)
                ks = _kernel_summary(kres, yte)
                kouts = _outputs_of(kres)
                tensors.update({f"{name}_{k}": v for k, v in kouts.items()})
                if trained is not None and "test" in kouts and "regular_test" in tensors:
                    ks["test_output_gap_vs_net"] = _rel_diff(tensors["regular_test"][0], kouts["test"][0])
                summary[name] = ks
                kres.save(os.path.join(folder, name))                 # <name>.pt + <name>.json
        atomic_save(tensors, os.path.join(folder, "outputs.pt"))
        summary["wall"] = time.perf_counter() - wall0
        summary["done"] = True
        write_json(os.path.join(folder, SUMMARY), summary)
        ckpt = os.path.join(folder, "checkpoint.pt")
        if os.path.exists(ckpt):
            os.remove(ckpt)
        return summary
