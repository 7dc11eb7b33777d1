"""Adaptive-step gradient flow of any model (the fused FC trainer's dynamics and step rule, generic path).

    trial:  w' = w - dt g                                   (tau = 0)
            v' = x v - (1 - x) g,  w' = w + dt v',  x = exp(-dt/tau)   (tau > 0)
    accept  iff dgrad = |g - g'|^2/(|g||g'|) < max_dgrad and dout = max_i |F'_i - F_i| < max_dout
            (:class:`ntk_fast.dynamics.steprule.StepRule`; dt *= 1.1 below half the bounds, /= 10 on rejection)

One forward and one backward pass (torch.func.grad of the full-batch loss) per attempt; an accepted trial's
(F', g') become the state.  ``t`` is the sum of the accepted dt, as in the fused trainer, so the same FC
weights give the same trajectory (to float64 rounding).  Records: accepted-step numbers of
``observables.next_record(step, record_rate, record_spacing)`` (default 0.01, 100); limits, step rule,
resume file and progress bar from the shared :class:`ntk_fast.dynamics.config.FlowConfig`.
"""
from __future__ import annotations

import math
import time

import torch

from ntk_fast.dynamics import observables as obs
from ntk_fast.dynamics.config import FlowConfig
from ntk_fast.dynamics.generic.common import Run, step_bar, still_running
from ntk_fast.dynamics.steprule import StepRule, dgrad_from_norms


def _trial(W, G, V, dts, tau):
    h = dts[:, None]
    if tau > 0:
        xx = torch.exp(-h / tau)
        Vt = xx * V - (1 - xx) * G
        return W + h * Vt, Vt
    return W - h * G, None


def _fresh_state(run: Run, lv, G: torch.Tensor, F: torch.Tensor) -> dict:
    """The host state of K models at t = 0 (per model: clock, step size, counters, |g|^2, loss at 0, status)."""
    K = run.K
    gsq = (G.double() ** 2).sum(1).tolist()
    l0, nd = run.step_stats(F)
    return dict(t=[0.0] * K, dt=[1.0] * K, step=[0] * K, attempts=[0] * K, rejections=[0] * K, gsq=gsq,
                l0=l0, next_rec=[0] * K, n_sched=[0] * K,
                last=[(0.0, 0.0, 0.0)] * K, t1=[math.nan] * K, nd=nd,
                status=["running" if math.isfinite(lv[k]) else "nonfinite" for k in range(K)])


def run_flow(run: Run, cfg: FlowConfig, tau: float, t1_fraction: float, max_rejections: int):
    """The flow loop of the K models of ``run`` (see the module docstring); returns the GenericResult."""
    K, alpha, rule = run.K, run.alpha, cfg.rule
    dev, dtype = run.ens.device, run.ens.dtype
    config = run.config("flow", max_dgrad=rule.max_dgrad, max_dout=rule.max_dout, grow=rule.grow,
                        shrink=rule.shrink, grow_fraction=rule.grow_fraction, tau=tau)

    def vg(W):
        lv, G, f = run.ens.value_and_grad(W, run.x, run.y, run.f0, run.loss_fn, shared=True)
        return lv, G, alpha * (f - run.f0)

    if cfg.resume is not None:
        blob = run.load(cfg.resume, config)
        st = blob["state"]
        W, G, F = (st[k].to(dev) for k in ("W", "G", "F"))
        V = st["V"].to(dev) if tau > 0 else None
        S = blob["host"]
    else:
        W = run.ens.W.clone()
        lv, G, F = vg(W)
        V = torch.zeros_like(W) if tau > 0 else None
        S = _fresh_state(run, lv, G, F)

    def record(k, event, scheduled=False):
        dt_, dg, do = S["last"][k]
        extra = dict(step=S["step"][k], attempts=S["attempts"][k], t=S["t"][k], dt=dt_, next_dt=S["dt"][k],
                     dgrad=dg, dout=do, grad_norm=math.sqrt(S["gsq"][k]))
        run.record(k, W, F[k], extra, event, S["n_sched"][k], scheduled)
        if scheduled:
            S["n_sched"][k] += 1

    def limit(k):
        if S["t"][k] >= cfg.time_limit:
            return "max_time"
        if S["step"][k] >= cfg.max_steps:
            return "max_steps"
        return None

    if cfg.resume is None:
        for k in range(K):
            if S["status"][k] == "running":
                record(k, "scheduled", True)
                S["next_rec"][k] = obs.next_record(0, cfg.record_rate, cfg.record_spacing)
                if run.margin_stop and S["nd"][k] == 0:
                    S["status"][k] = "converged"
    for k in range(K):
        if S["status"][k] == "running" and limit(k):
            S["status"][k] = limit(k)

    def save():
        state = dict(W=W.cpu().clone(), G=G.cpu().clone(), F=F.cpu().clone())
        if V is not None:
            state["V"] = V.cpu().clone()
        run.save(cfg.checkpoint, config, state, S)

    bar = step_bar(cfg.progress, f"flow K={K} alpha={alpha:g}")
    t_wall, last_save = time.perf_counter(), time.perf_counter()
    try:
        while True:
            active = still_running(S, K, t_wall, cfg.wall_limit)
            if not active:
                break
            dts = torch.tensor([S["dt"][k] if k in active else 0.0 for k in range(K)], dtype=dtype, device=dev)
            Wt, Vt = _trial(W, G, V, dts, tau)
            lt, Gt, Ft = vg(Wt)
            acc = _decide(S, active, rule, G, Gt, F, Ft, lt, max_rejections)
            if len(acc) == K:           # every model moves: the trial tensors become the state
                W, G, F, V = Wt, Gt, Ft, (Vt if V is not None else None)
            elif acc:
                idx = torch.tensor(acc, device=dev)
                W[idx], G[idx], F[idx] = Wt[idx], Gt[idx], Ft[idx]
                if V is not None:
                    V[idx] = Vt[idx]
            mean_l, nds = run.step_stats(F[acc]) if acc else ([], [])
            for k, ml, nd in zip(acc, mean_l, nds):
                S["nd"][k] = nd
                if math.isnan(S["t1"][k]) and ml <= t1_fraction * S["l0"][k]:
                    S["t1"][k] = S["t"][k]
                stop = "converged" if (run.margin_stop and nd == 0) else limit(k)
                scheduled = S["step"][k] >= S["next_rec"][k]
                if scheduled or stop is not None:
                    if scheduled:
                        S["next_rec"][k] = obs.next_record(S["step"][k], cfg.record_rate, cfg.record_spacing)
                    record(k, "converged" if stop == "converged" else "scheduled" if scheduled else "stopped",
                           scheduled)
                if stop is not None:
                    S["status"][k] = stop
            run.flush_ensemble(S["status"])
            if bar is not None:
                bar.update(len(acc))
            if cfg.checkpoint is not None and time.perf_counter() - last_save >= cfg.checkpoint_every:
                save()
                last_save = time.perf_counter()
    finally:
        if bar is not None:
            bar.close()
    for k in range(K):
        record(k, "final")
    save()
    return run.result(W, S, config)


def _decide(S, active, rule: StepRule, G, Gt, F, Ft, lt, max_rejections: int):
    """Apply the step rule to the trial of every active model: update the host state S (t, step, dt, last
    (dt, dgrad, dout), |g|^2, rejections, status on too many rejections) and return the accepted models."""
    gpsq = (Gt.double() ** 2).sum(1).tolist()
    diffsq = ((G.double() - Gt.double()) ** 2).sum(1).tolist()
    douts = (Ft - F).abs().amax(1).tolist()
    finite = torch.isfinite(Ft).all(1).tolist()
    acc = []
    for k in active:
        S["attempts"][k] += 1
        dout = douts[k] if finite[k] else math.nan
        dgrad = dgrad_from_norms(S["gsq"][k], gpsq[k], diffsq[k]) if math.isfinite(gpsq[k] + diffsq[k]) else math.nan
        ok, new_dt = rule.decide(dgrad, dout, S["dt"][k])
        if ok:
            acc.append(k)
            S["t"][k] += S["dt"][k]
            S["step"][k] += 1
            S["last"][k] = (S["dt"][k], dgrad, float(dout))
            S["gsq"][k] = gpsq[k]
            S["rejections"][k] = 0
        else:
            S["rejections"][k] += 1
            if S["rejections"][k] >= max_rejections:
                S["status"][k] = "stalled" if finite[k] and math.isfinite(lt[k]) else "nonfinite"
        S["dt"][k] = new_dt
    return acc
