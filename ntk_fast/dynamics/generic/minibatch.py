"""ADAM and SGD (momentum) on minibatches, as the paper's ADAM runs (reference code: article:main_adam.py).

Each step of model k draws its minibatch as ``torch.randperm(n, generator=g_k)[:batch_size]`` (the reference's
``randperm(ptr)[:bs]``), g_k a CPU torch.Generator seeded with ``seed + k``; then one optimizer step on the
minibatch loss L_B = c(alpha) mean_{i in B} l_i (:mod:`ntk_fast.dynamics.generic.losses`).

Time: the history's ``t`` is ``lr * step`` (for SGD without momentum the gradient-flow time that the steps
discretise; for ADAM a nominal clock in the same units); ``step`` counts optimizer steps and ``epoch`` is
step * batch_size / n.  The margin stop (y_i F_i >= 1 on the whole training set) is checked at the record
steps only (``observables.next_record(step, record_rate, record_spacing)``, default 0.1 and 1000: the
reference's ``loglinspace(0.1, 1000)``), each one a full-training-set forward pass.  Limits (the shared
:class:`ntk_fast.dynamics.config.FlowConfig`, plus max_epochs): max_steps, max_epochs, max_time (on t),
max_wall (seconds of this call); a non-finite minibatch loss or weight stops the model as "nonfinite".
"""
from __future__ import annotations

import math
import time
from typing import Optional

import torch

from ntk_fast.dynamics import observables as obs
from ntk_fast.dynamics.config import FlowConfig
from ntk_fast.dynamics.generic.common import Run, step_bar, still_running
from ntk_fast.dynamics.generic.optim import RowAdam, RowSGD


def run_minibatch(run: Run, cfg: FlowConfig, dynamics: str, lr: float, batch_size: int, seed: int,
                  opt_kwargs: dict, max_epochs: Optional[float], t1_fraction: float):
    """The ADAM / SGD loop of the K models of ``run`` (see the module docstring); returns the GenericResult."""
    K, n = run.K, run.n
    if not 1 <= batch_size <= n:
        raise ValueError(f"train: batch_size must be in [1, n = {n}], got {batch_size}")
    config = run.config(dynamics, lr=lr, batch_size=batch_size, seed=seed,
                        **{k: (list(v) if isinstance(v, tuple) else v) for k, v in opt_kwargs.items()})
    W = run.ens.buffer()            # the working copies' weights: the optimizer updates them in place
    opt = RowAdam(W, lr, **opt_kwargs) if dynamics == "adam" else RowSGD(W, lr, **opt_kwargs)
    gens = [torch.Generator().manual_seed(int(seed) + k) for k in range(K)]
    if cfg.resume is not None:
        blob = run.load(cfg.resume, config)
        W.copy_(blob["state"]["W"])
        opt.load(blob["state"]["opt"])
        for g, s in zip(gens, blob["state"]["gens"]):
            g.set_state(s)
        S = blob["host"]
    else:
        S = dict(step=[0] * K, batch_loss=[math.nan] * K, next_rec=[0] * K, n_sched=[0] * K, t1=[math.nan] * K,
                 l0=[None] * K, status=["running"] * K)

    def record(k, event, Fk, scheduled):
        st = S["step"][k]
        extra = dict(step=st, t=lr * st, epoch=st * batch_size / n, batch_loss=S["batch_loss"][k], dt=lr)
        rec = run.record(k, W, Fk, extra, event, S["n_sched"][k], scheduled)
        if scheduled:
            S["n_sched"][k] += 1
        if S["l0"][k] is None:
            S["l0"][k] = rec["train_mean_l"]
        if math.isnan(S["t1"][k]) and rec["train_mean_l"] <= t1_fraction * S["l0"][k]:
            S["t1"][k] = lr * st
        return rec

    def limit(k):
        st = S["step"][k]
        if lr * st >= cfg.time_limit:
            return "max_time"
        if st >= cfg.max_steps:
            return "max_steps"
        if max_epochs is not None and st * batch_size >= max_epochs * n:
            return "max_epochs"
        return None

    def record_models(ks, final=False):
        """Record models ks at their current step (one full-training-set pass) and apply the margin stop."""
        if not ks:
            return
        F = run.train_outputs(W)
        for k in ks:
            scheduled = not final and S["step"][k] >= S["next_rec"][k]
            rec = record(k, "final" if final else "scheduled" if scheduled else "stopped", F[k], scheduled)
            if final:
                continue
            if scheduled:
                S["next_rec"][k] = obs.next_record(S["step"][k], cfg.record_rate, cfg.record_spacing)
            if run.margin_stop and rec["train_nd"] == 0:
                S["status"][k] = "converged"
                rec["event"] = "converged"
            elif not math.isfinite(rec["train_loss"]):
                S["status"][k] = "nonfinite"

    if cfg.resume is None:
        record_models(list(range(K)))
    for k in range(K):
        if S["status"][k] == "running" and limit(k):
            S["status"][k] = limit(k)

    def save():
        run.save(cfg.checkpoint, config, dict(W=W.cpu().clone(), opt=opt.state(), gens=[g.get_state() for g in gens]),
                 S)

    bar = step_bar(cfg.progress, f"{dynamics} K={K} alpha={run.alpha:g}")
    t_wall, last_save = time.perf_counter(), time.perf_counter()
    try:
        while True:
            active = still_running(S, K, t_wall, cfg.wall_limit)
            if not active:
                break
            due = _step(run, W, opt, gens, S, active, batch_size, limit)
            record_models(due)
            run.flush_ensemble(S["status"])
            if bar is not None:
                bar.update(1)
            if cfg.checkpoint is not None and time.perf_counter() - last_save >= cfg.checkpoint_every:
                save()
                last_save = time.perf_counter()
    finally:
        if bar is not None:
            bar.close()
    record_models(list(range(K)), final=True)
    save()
    return run.result(W, S, config)


def _step(run: Run, W, opt, gens, S, active, batch_size: int, limit):
    """One minibatch step of the active models (each its own minibatch); returns the models due for a record
    (on the record schedule or stopped by a budget)."""
    n, K = run.n, run.K
    idx = torch.stack([torch.randperm(n, generator=gens[k])[:batch_size] if k in active
                       else torch.arange(batch_size) for k in range(K)]).to(run.ens.device)
    lv, G, _ = run.ens.value_and_grad(W, run.x[idx], run.y[idx], torch.gather(run.f0, 1, idx), run.loss_fn,
                                      shared=False, keep=False)
    opt.step(W, G, active)
    due = []
    for k in active:
        S["step"][k] += 1
        S["batch_loss"][k] = float(lv[k])
        if not math.isfinite(S["batch_loss"][k]):           # (non-finite weights show at the next step's loss)
            S["status"][k] = "nonfinite"
            continue
        stop = limit(k)
        if S["step"][k] >= S["next_rec"][k] or stop is not None:
            due.append(k)
        if stop is not None:
            S["status"][k] = stop
    return due
