"""Training any ``nn.Module`` in the alpha-scaled setting: gradient flow, ADAM and SGD (issue 14).

    F(x) = alpha (f(x; w) - f(x; w0)),     f: any module mapping (n, ...) -> (n,) or (n, 1)
    L(w) = c(alpha) / |B| sum_{i in B} l_i      (losses and c(alpha): ntk_fast.dynamics.generic.losses)

dynamics="flow": the fused FC trainer's adaptive-step gradient flow on the full training set
(:mod:`.flow`); "adam" / "sgd": minibatch optimizers as the paper's ADAM runs (:mod:`.minibatch`).
The parameters of the K models live in one flat (K, P) buffer evaluated with torch.func (:mod:`.functional`).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Union

import torch
from torch import nn

from ntk_fast.dynamics.generic.common import GenericResult, Run
from ntk_fast.dynamics.generic.losses import GENERIC_LOSSES, get_spec, prefactor
from ntk_fast.dynamics.steprule import StepRule

DYNAMICS = ("flow", "adam", "sgd")
__all__ = ["DYNAMICS", "GENERIC_LOSSES", "GenericResult", "train_any"]


def _models(model_or_models) -> list:
    ms = [model_or_models] if isinstance(model_or_models, nn.Module) else \
        list(model_or_models) if isinstance(model_or_models, (list, tuple)) else None
    if not ms or not all(isinstance(m, nn.Module) for m in ms):
        raise ValueError(f"train: model must be an nn.Module or a non-empty list of them, got "
                         f"{type(model_or_models).__name__}")
    return ms


def train_any(model: Union[nn.Module, Sequence[nn.Module]], x: torch.Tensor, y: torch.Tensor, alpha: float, *,
              dynamics: str = "flow", x_test: Optional[torch.Tensor] = None, y_test: Optional[torch.Tensor] = None,
              loss: Optional[str] = None, loss_beta: float = 20.0, loss_prefactor: Optional[float] = None,
              max_dgrad: float = 1e-4, max_dout: float = 0.1, tau: float = 0.0,
              lr: float = 1e-3, batch_size: int = 32, seed: int = 0, betas=(0.9, 0.999), eps: float = 1e-8,
              momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False,
              max_time: float = math.inf, max_steps: Optional[int] = None, max_epochs: Optional[float] = None,
              max_wall: float = math.inf, kernel_every: int = 0, kernel_points: Union[int, torch.Tensor, None] = 0,
              checkpoint: Optional[str] = None, checkpoint_every: float = 600.0, resume: Optional[str] = None,
              progress: bool = False, t1_fraction: float = 0.5, checkpoint_rate: Optional[float] = None,
              checkpoint_spacing: Optional[int] = None, max_rejections: int = 40, batched: Optional[bool] = None,
              chunk: Optional[int] = None, test_every: int = 1) -> GenericResult:
    """Train a module (or K modules of one architecture: an ensemble) on (x, y) in the alpha-scaled setting.

    Args:
        model: nn.Module (or list) with output (n,) or (n, 1); every parameter with requires_grad=True is
            trained, biases included; BatchNorm/Dropout must be in eval mode.
        x (n, ...), y (n,): training set (labels in {-1, +1} for margin losses, real for "mse").
        alpha > 0: F = alpha (f - f0).  dynamics: "flow", "adam" or "sgd".
        x_test, y_test: optional test set, evaluated at checkpoints and at the end.
        loss: "softhinge" (beta_l = loss_beta), "qhinge", "hinge", "mse"; default "softhinge" for the flow and
            "hinge" for ADAM/SGD (the paper's ADAM runs).  loss_prefactor: overrides c(alpha).
        max_dgrad, max_dout, tau, max_rejections: the flow's step rule and momentum (as the fused trainer).
        lr, batch_size, seed (minibatch order of model k: seed + k), betas, eps (ADAM), momentum, dampening,
            nesterov (SGD): the minibatch optimizers (torch.optim's update rules).
        max_time (t), max_steps, max_epochs (ADAM/SGD), max_wall (seconds of this call): budgets.
        kernel_points: m > 0 (first m test points, else train points) or an (m, ...) tensor: the kernel change
            |Theta(w_t) - Theta(w0)|_F / |Theta(w0)|_F at the end (and every kernel_every-th checkpoint) through
            :func:`ntk_fast.ntk.empirical.empirical_ntk`.
        checkpoint, checkpoint_every, resume: resumable checkpoint file (bit-exact resume: weights, optimizer
            state and minibatch generators included).
        checkpoint_rate, checkpoint_spacing: record schedule (flow default 0.01, 100; ADAM/SGD 0.1, 1000).
        batched: vmap over the K models (None: when the model allows it), False: loop.  chunk: points per
            forward call when evaluating full sets (memory).  test_every: test observables at every
            test_every-th scheduled checkpoint (and at every other record).
    Returns a :class:`GenericResult` (a FlowResult: status, statuses, history, nets, final, ensemble, outputs, config).
    """
    if dynamics not in DYNAMICS:
        raise ValueError(f"train: dynamics must be one of {DYNAMICS}, got {dynamics!r}")
    models = _models(model)
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"train: alpha must be a number, got {alpha!r}") from None
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"train: alpha must be a positive finite number, got {alpha}")
    spec = get_spec(loss or ("softhinge" if dynamics == "flow" else "hinge"))
    c = prefactor(spec, alpha, loss_prefactor)
    for name, v in (("max_steps", max_steps), ("max_epochs", max_epochs)):
        if v is not None and not v >= 0:
            raise ValueError(f"train: {name} must be >= 0, got {v}")
    if math.isinf(max_time) and math.isinf(max_wall) and max_steps is None and max_epochs is None:
        raise ValueError("train: give a budget (max_time, max_steps, max_epochs or max_wall): the margin stop "
                         "alone may never be met")
    run = Run(models, x, y, alpha, spec, c, float(loss_beta), x_test, y_test, batched, chunk, kernel_points,
              kernel_every)
    if not isinstance(test_every, int) or test_every < 1:
        raise ValueError(f"train: test_every must be a positive int, got {test_every!r}")
    run.test_every = test_every
    if dynamics == "flow":
        if max_epochs is not None:
            raise ValueError("train: max_epochs is for dynamics 'adam'/'sgd' (the flow is full batch: use max_steps)")
        from ntk_fast.dynamics.generic.flow import run_flow
        rule = StepRule(max_dgrad=max_dgrad, max_dout=max_dout)
        if not (tau >= 0 and math.isfinite(tau)):
            raise ValueError(f"train: tau must be a finite number >= 0, got {tau}")
        return run_flow(run, rule, float(tau), float(max_time), max_steps, float(max_wall), checkpoint,
                        float(checkpoint_every), resume, progress, float(t1_fraction),
                        0.01 if checkpoint_rate is None else float(checkpoint_rate),
                        100 if checkpoint_spacing is None else int(checkpoint_spacing), int(max_rejections))
    from ntk_fast.dynamics.generic.minibatch import run_minibatch
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"train: lr must be a positive finite number, got {lr}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool):
        raise ValueError(f"train: batch_size must be an int, got {batch_size!r}")
    opt_kwargs: Dict[str, Any] = dict(betas=tuple(betas), eps=eps) if dynamics == "adam" else \
        dict(momentum=momentum, dampening=dampening, nesterov=nesterov)
    return run_minibatch(run, dynamics, float(lr), batch_size, int(seed), opt_kwargs, float(max_time), max_steps,
                         max_epochs, float(max_wall), checkpoint, float(checkpoint_every), resume, progress,
                         float(t1_fraction), 0.1 if checkpoint_rate is None else float(checkpoint_rate),
                         1000 if checkpoint_spacing is None else int(checkpoint_spacing))
