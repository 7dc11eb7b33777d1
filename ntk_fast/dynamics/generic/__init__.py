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
from ntk_fast.dynamics.generic.losses import GENERIC_LOSSES, default_loss, get_spec, prefactor
from ntk_fast.dynamics.config import PathLike, check_alpha, flow_config

DYNAMICS = ("flow", "adam", "sgd")
__all__ = ["DYNAMICS", "GENERIC_LOSSES", "GenericResult", "train_any"]


def _models(model_or_models) -> list:
    ms = [model_or_models] if isinstance(model_or_models, nn.Module) else \
        list(model_or_models) if isinstance(model_or_models, (list, tuple)) else None
    if not ms or not all(isinstance(m, nn.Module) for m in ms):
        raise ValueError(f"train: model must be an nn.Module or a non-empty list of them, got "
                         f"{type(model_or_models).__name__}")
    return ms


def _adam_kwargs(betas, eps) -> Dict[str, Any]:
    """ADAM's (betas, eps) checked as torch.optim.Adam checks them: 0 <= beta < 1, eps >= 0."""
    try:
        b1, b2 = (float(b) for b in betas)
    except (TypeError, ValueError):
        raise ValueError(f"train: betas must be a pair of numbers, got {betas!r}") from None
    if not (0 <= b1 < 1 and 0 <= b2 < 1):
        raise ValueError(f"train: betas must lie in [0, 1), got {betas!r}")
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"train: eps must be a finite number >= 0, got {eps!r}")
    return dict(betas=(b1, b2), eps=float(eps))


def _sgd_kwargs(momentum, dampening, nesterov) -> Dict[str, Any]:
    """SGD's momentum (finite, >= 0, as torch.optim.SGD checks it), dampening (finite) and nesterov."""
    if not (momentum >= 0 and math.isfinite(momentum)):
        raise ValueError(f"train: momentum must be a finite number >= 0, got {momentum!r}")
    if not math.isfinite(dampening):
        raise ValueError(f"train: dampening must be a finite number, got {dampening!r}")
    return dict(momentum=float(momentum), dampening=float(dampening), nesterov=bool(nesterov))


def train_any(model: Union[nn.Module, Sequence[nn.Module]], x: torch.Tensor, y: torch.Tensor, alpha: float, *,
              dynamics: str = "flow", x_test: Optional[torch.Tensor] = None, y_test: Optional[torch.Tensor] = None,
              loss: Optional[str] = None, loss_beta: float = 20.0, max_dgrad: float = 1e-4, max_dout: float = 0.1,
              grow: float = 1.1, shrink: float = 10.0, grow_fraction: float = 0.5,
              record_rate: Optional[float] = None, record_spacing: Optional[int] = None,
              max_time: Optional[float] = None, max_steps: Optional[float] = None, max_wall: Optional[float] = None,
              checkpoint: Optional[PathLike] = None, checkpoint_every: float = 600.0,
              resume: Optional[PathLike] = None, progress: Optional[bool] = None,
              loss_prefactor: Optional[float] = None, tau: float = 0.0, max_rejections: int = 40,
              lr: float = 1e-3, batch_size: int = 32, seed: int = 0, betas=(0.9, 0.999), eps: float = 1e-8,
              momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False,
              max_epochs: Optional[float] = None, kernel_every: int = 0,
              kernel_points: Union[int, torch.Tensor, None] = 0, t1_fraction: float = 0.5,
              batched: Optional[bool] = None, chunk: Optional[int] = None, test_every: int = 1,
              **renamed: Any) -> GenericResult:
    """Train a module (or K modules of one architecture: an ensemble) on (x, y) in the alpha-scaled setting.

    Args:
        model: nn.Module (or list) with output (n,) or (n, 1); every parameter with requires_grad=True is
            trained, biases included; BatchNorm/Dropout must be in eval mode.
        x (n, ...), y (n,): training set (labels in {-1, +1} for margin losses, real for "mse").
        alpha > 0: F = alpha (f - f0).  dynamics: "flow", "adam" or "sgd".
        x_test, y_test: optional test set, evaluated at the records and at the end.
        Shared with train and kernel_flow, under the same names and defaults
            (:class:`ntk_fast.dynamics.config.FlowConfig`): loss ("softhinge" with beta_l = loss_beta, "qhinge",
            "hinge", "mse"; default "softhinge" for the flow and "hinge" for ADAM/SGD, the paper's ADAM runs),
            the flow's step rule (max_dgrad, max_dout, grow, shrink, grow_fraction), the record schedule
            (record_rate, record_spacing: default 0.01, 100 for the flow, 0.1, 1000 for ADAM/SGD), the limits
            (max_time on t, max_steps (default 1e6, math.inf lifts it given another budget), max_wall seconds;
            None = no limit), the resume file (checkpoint, checkpoint_every, resume) and progress (None: only on a terminal).
        loss_prefactor: overrides c(alpha).  tau, max_rejections: the flow's momentum time and stall rule.
        lr, batch_size, seed (minibatch order of model k: seed + k), betas, eps (ADAM), momentum, dampening,
            nesterov (SGD): the minibatch optimizers (torch.optim's update rules).  max_epochs: ADAM/SGD budget.
        kernel_points: m > 0 (first m test points, else train points) or an (m, ...) tensor: the kernel change
            |Theta(w_t) - Theta(w0)|_F / |Theta(w0)|_F at the end (and every kernel_every-th scheduled record)
            through :func:`ntk_fast.ntk.empirical.empirical_ntk`.  Cost: one Jacobian of m points per model
            (about m forward+backward passes) and an (m, m) Gram of P columns, m^2 P flops; 0 (default) is off.
        batched: vmap over the K models (None: when the model allows it, except convolutions on the CPU),
            False: loop, True: vmap.  chunk: points per
            forward call when evaluating full sets (memory).  test_every: test observables at every
            test_every-th scheduled record (and at every other record).
        Old names checkpoint_rate / checkpoint_spacing (now record_rate / record_spacing) warn and still work.
    Returns a :class:`GenericResult` (a FlowResult: status, statuses, history, nets, final, ensemble,
    ensemble_history, outputs, config).  Ensembles with a test set get ensemble records (variance and error of
    the mean predictor) through :class:`ntk_fast.dynamics.ensemble.EnsembleTracker`, as the FC trainer.
    """
    if dynamics not in DYNAMICS:
        raise ValueError(f"train: dynamics must be one of {DYNAMICS}, got {dynamics!r}")
    models = _models(model)
    alpha = check_alpha(alpha)
    spec = get_spec(loss or default_loss(dynamics))
    c = prefactor(spec, alpha, loss_prefactor)
    rate, spacing = (0.01, 100) if dynamics == "flow" else (0.1, 1000)
    shared = dict(loss=spec.name, loss_beta=loss_beta, max_dgrad=max_dgrad, max_dout=max_dout, grow=grow,
                  shrink=shrink, grow_fraction=grow_fraction,
                  record_rate=rate if record_rate is None else record_rate,
                  record_spacing=spacing if record_spacing is None else record_spacing,
                  max_time=max_time, max_steps=max_steps, max_wall=max_wall, checkpoint=checkpoint,
                  checkpoint_every=float(checkpoint_every), resume=resume, progress=progress)
    if max_epochs is not None and not max_epochs >= 0:
        raise ValueError(f"train: max_epochs must be >= 0, got {max_epochs}")
    cfg = flow_config("train", shared, renamed, ("checkpoint_spacing", "checkpoint_rate"),
                      other_budgets={"max_epochs": max_epochs is not None and not math.isinf(max_epochs)})
    if not isinstance(test_every, int) or test_every < 1:
        raise ValueError(f"train: test_every must be a positive int, got {test_every!r}")
    run = Run(models, x, y, alpha, spec, c, cfg.loss_beta, x_test, y_test, batched, chunk, kernel_points,
              kernel_every)
    run.test_every = test_every
    if dynamics == "flow":
        if max_epochs is not None:
            raise ValueError("train: max_epochs is for dynamics 'adam'/'sgd' (the flow is full batch: use max_steps)")
        from ntk_fast.dynamics.generic.flow import run_flow
        if not (tau >= 0 and math.isfinite(tau)):
            raise ValueError(f"train: tau must be a finite number >= 0, got {tau}")
        return run_flow(run, cfg, float(tau), float(t1_fraction), int(max_rejections))
    from ntk_fast.dynamics.generic.minibatch import run_minibatch
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"train: lr must be a positive finite number, got {lr}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool):
        raise ValueError(f"train: batch_size must be an int, got {batch_size!r}")
    opt_kwargs = _adam_kwargs(betas, eps) if dynamics == "adam" else _sgd_kwargs(momentum, dampening, nesterov)
    return run_minibatch(run, cfg, dynamics, float(lr), batch_size, int(seed), opt_kwargs, max_epochs,
                         float(t1_fraction))
