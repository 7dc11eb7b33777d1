"""Reference-code-style loops: the adaptive gradient flow written out plainly, as the paper's code runs it.

They are deliberately naive (autograd, a copy of the whole state every step, separate passes with host reads,
the step rule inline) and share nothing with the fused trainer and solver except the loss functions, so the
tests compare ntk_fast.train / ntk_fast.kernel_flow against them and the benchmarks time them side by side.

Article notation.  Net: F = alpha (f(w) - f(w0)), L(w) = (1 / (alpha^2 n)) sum_i l(y_i F_i),
trial w' = w - dt grad L (with momentum time tau > 0: v' = e^{-dt/tau} v - (1 - e^{-dt/tau}) grad L,
w' = w + dt v').  Kernel: dF/dt = -(1/n) Theta (l'(y o F) o y), trial F' = F - dt g with g = Theta l'(y o F) y / n,
and F = -Theta c with dc/dt = l'(y o F) o y / n.  Step rule: accept when
dgrad = |g - g'|^2 / (|g| |g'|) < max_dgrad and dout = max_i |F'_i - F_i| < max_dout; after an accepted step
dt *= 1.1 when both are under half their bounds; a rejected attempt divides dt by 10.  Stop when every
y_i F_i >= 1, or after max_steps accepted steps or max_attempts attempts.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Optional

import torch

from ntk_fast.dynamics.losses import get_loss
from ntk_fast.dynamics.steprule import StepRule, dgrad_from_norms


def _dgrad(g: torch.Tensor, g2: torch.Tensor) -> float:
    ng, ng2 = float(g.norm()), float(g2.norm())
    return 0.0 if ng == 0 or ng2 == 0 else float(((g - g2) ** 2).sum()) / (ng * ng2)


def _budget_left(steps: int, attempts: int, max_steps: Optional[int], max_attempts: Optional[int]) -> bool:
    return (max_steps is None or steps < max_steps) and (max_attempts is None or attempts < max_attempts)


def net_flow_loop(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, alpha: float, *, loss: str = "softhinge",
                  beta: float = 20.0, max_dgrad: float = 1e-4, max_dout: float = 0.1, tau: float = 0.0,
                  max_steps: Optional[int] = None, max_attempts: Optional[int] = None) -> dict:
    """Train a copy of ``net`` (x: (n, d), y: (n,) in {-1, +1}) by the adaptive flow of the module docstring.

    Cost per attempt: one forward and one backward pass (autograd), plus a copy of the state per step.
    Returns {"net", "t", "steps", "attempts", "traj": [(t, dt) per accepted step], "F": (n,),
    "converged", "attempt_seconds": wall time of every attempt}.
    """
    if max_steps is None and max_attempts is None:
        raise ValueError("net_flow_loop: give max_steps or max_attempts (a bound on the loop)")
    lf, _ = get_loss(loss)
    net = copy.deepcopy(net)
    params = [p for p in net.parameters() if p.requires_grad]
    with torch.no_grad():
        f0 = net(x)

    def loss_and_grad():
        for p in params:
            p.grad = None
        F = alpha * (net(x) - f0)
        (lf(y * F, beta).mean() / alpha ** 2).backward()
        return F.detach(), torch.cat([p.grad.reshape(-1) for p in params])

    F, g = loss_and_grad()
    v = torch.zeros_like(g)
    t, dt, steps, attempts, traj, seconds = 0.0, 1.0, 0, 0, [], []
    while _budget_left(steps, attempts, max_steps, max_attempts) and not bool((y * F >= 1).all()):
        t0 = time.perf_counter()
        saved = copy.deepcopy(net.state_dict())                  # the reference code copies the state every step
        w = torch.cat([p.detach().reshape(-1) for p in params])
        while _budget_left(steps, attempts, max_steps, max_attempts):
            attempts += 1
            if tau > 0:
                decay = math.exp(-dt / tau)
                v_new = decay * v - (1 - decay) * g
                w_new = w + dt * v_new
            else:
                v_new, w_new = v, w - dt * g
            with torch.no_grad():
                o = 0
                for p in params:
                    p.copy_(w_new[o:o + p.numel()].view_as(p))
                    o += p.numel()
            F2, g2 = loss_and_grad()
            dout, dgrad = float((F2 - F).abs().max()), _dgrad(g, g2)
            if dgrad < max_dgrad and dout < max_dout:
                t += dt
                traj.append((t, dt))
                if dgrad < 0.5 * max_dgrad and dout < 0.5 * max_dout:
                    dt *= 1.1
                F, g, v = F2, g2, v_new
                steps += 1
                seconds.append(time.perf_counter() - t0)
                break
            dt /= 10
            net.load_state_dict(saved)
            seconds.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
    return dict(net=net, t=t, steps=steps, attempts=attempts, traj=traj, F=F, converged=bool((y * F >= 1).all()),
                attempt_seconds=seconds)


def kernel_flow_loop(K: torch.Tensor, y: torch.Tensor, *, loss: str = "softhinge", beta: float = 20.0,
                     rule: Optional[StepRule] = None, max_steps: Optional[int] = None,
                     max_attempts: Optional[int] = None) -> dict:
    """The frozen-kernel flow on Theta = K ((n, n), full storage) with labels y ((n,), {-1, +1}), from F = 0.

    Cost per attempt: one full matrix-vector product (2 n^2 flops, n^2 elements read), separate passes for
    the statistics, and a copy of the state.  Returns {"F", "c", "t", "steps", "attempts", "wall",
    "per_attempt_ms", "margin_min", "converged"}.
    """
    if max_steps is None and max_attempts is None and loss == "qhinge":
        raise ValueError("kernel_flow_loop: qhinge reaches the margin only asymptotically; give max_steps")
    rule = rule or StepRule()
    n = K.shape[0]
    _, lp = get_loss(loss)
    F = torch.zeros(n, dtype=K.dtype)
    c = torch.zeros(n, dtype=K.dtype)
    g = K @ (lp(y * F, beta) * y) / n
    t, dt, steps, attempts = 0.0, 1.0, 0, 0
    start = time.perf_counter()
    while _budget_left(steps, attempts, max_steps, max_attempts) and not bool((y * F >= 1).all()):
        state = {"F": F.clone(), "g": g.clone(), "c": c.clone(), "t": t}   # copied every attempt, as the reference
        Fp = state["F"] - dt * state["g"]
        gp = K @ (lp(y * Fp, beta) * y) / n                               # full matrix-vector product
        gs = state["g"]
        dgrad = dgrad_from_norms(float(gs @ gs), float(gp @ gp), float((gs - gp) @ (gs - gp)))
        dout = float((Fp - state["F"]).abs().max())                       # separate passes
        ok, new_dt = rule.decide(dgrad, dout, dt)
        attempts += 1
        if ok:
            c = state["c"] + dt * lp(y * state["F"], beta) * y / n
            F, g, t, steps = Fp, gp, state["t"] + dt, steps + 1
        dt = new_dt
    wall = time.perf_counter() - start
    return {"F": F, "c": c, "t": t, "steps": steps, "attempts": attempts, "wall": wall,
            "per_attempt_ms": 1e3 * wall / max(attempts, 1), "margin_min": float((y * F).min()),
            "converged": bool((y * F >= 1).all())}
