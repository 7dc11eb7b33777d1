"""What the trainer (:func:`ntk_fast.train`) and the frozen-kernel solver (:func:`ntk_fast.kernel_flow`) share.

Both take these keyword arguments under the same names and defaults, gathered in one :class:`FlowConfig`:

    loss, loss_beta                          the margin loss l (ntk_fast.dynamics.losses) and its beta_l
    max_dgrad, max_dout, grow, shrink,       the adaptive step (ntk_fast.dynamics.steprule.StepRule)
    grow_fraction
    record_rate, record_spacing              the history's log-linear record schedule
                                             (ntk_fast.dynamics.observables.next_record)
    max_time, max_steps, max_wall            limits: flow time t, accepted steps (per net / problem; default
                                             DEFAULT_MAX_STEPS = 1e6, math.inf lifts it when max_time or
                                             max_wall is given), seconds (None: no limit; an infinite value
                                             means the same)
    checkpoint, checkpoint_every, resume     the resume file (written atomically every checkpoint_every seconds
                                             and at the end) and a file to resume from
    progress                                 tqdm bar: None (default) shows it only when stderr is a terminal

Old keyword names (``beta`` and ``checkpoint_step`` of kernel_flow, ``checkpoint_spacing`` and
``checkpoint_rate`` of train) still work, with a DeprecationWarning.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Optional, Union

from ntk_fast.dynamics.steprule import StepRule
from ntk_fast.guards import DEFAULT_MAX_STEPS
from ntk_fast.progress import progress_bar, progress_enabled  # noqa: F401  (progress_bar re-exported for the dynamics)

PathLike = Union[str, os.PathLike]

# old keyword -> new keyword (kept working with a DeprecationWarning)
RENAMED = {"beta": "loss_beta", "checkpoint_step": "record_spacing", "checkpoint_spacing": "record_spacing",
           "checkpoint_rate": "record_rate"}


@dataclass(frozen=True)
class FlowConfig:
    """The shared keyword arguments of train and kernel_flow (see the module docstring)."""
    loss: str = "softhinge"
    loss_beta: float = 20.0
    max_dgrad: float = 1e-4
    max_dout: float = 0.1
    grow: float = 1.1
    shrink: float = 10.0
    grow_fraction: float = 0.5
    record_rate: float = 0.01
    record_spacing: int = 100
    max_time: Optional[float] = None
    max_steps: Optional[int] = None
    max_wall: Optional[float] = None
    checkpoint: Optional[PathLike] = None
    checkpoint_every: float = 600.0
    resume: Optional[PathLike] = None
    progress: Optional[bool] = None

    def __post_init__(self):
        for name in ("max_time", "max_wall"):
            v = getattr(self, name)
            if v is not None:
                v = float(v)
                if not v >= 0:
                    raise ValueError(f"{name} must be >= 0 or None, got {v}")
                object.__setattr__(self, name, None if math.isinf(v) else v)
        if self.max_steps is not None and not self.max_steps >= 0:
            raise ValueError(f"max_steps must be >= 0, got {self.max_steps}")
        if self.max_steps is None:   # the default budget: no call runs forever (math.inf lifts it)
            object.__setattr__(self, "max_steps", DEFAULT_MAX_STEPS)
        if not (self.record_rate > 0 and math.isfinite(self.record_rate)):
            raise ValueError(f"record_rate must be a positive finite number, got {self.record_rate}")
        if not (isinstance(self.record_spacing, int) and self.record_spacing >= 1):
            raise ValueError(f"record_spacing must be an int >= 1, got {self.record_spacing!r}")
        if not self.checkpoint_every >= 0:
            raise ValueError(f"checkpoint_every must be >= 0 seconds, got {self.checkpoint_every}")
        object.__setattr__(self, "loss_beta", float(self.loss_beta))
        if not (self.loss_beta > 0 and math.isfinite(self.loss_beta)):     # softhinge's beta_l
            raise ValueError(f"loss_beta must be a positive finite number, got {self.loss_beta}")
        self.rule  # noqa: B018 - validates the step rule's numbers

    @property
    def rule(self) -> StepRule:
        return StepRule(max_dgrad=self.max_dgrad, max_dout=self.max_dout, grow=self.grow, shrink=self.shrink,
                        grow_fraction=self.grow_fraction)

    @property
    def time_limit(self) -> float:
        """max_time as a number (inf for no limit)."""
        return math.inf if self.max_time is None else self.max_time

    @property
    def wall_limit(self) -> float:
        """max_wall as a number (inf for no limit)."""
        return math.inf if self.max_wall is None else self.max_wall

    @property
    def show_progress(self) -> bool:
        return progress_enabled(self.progress)


def check_alpha(alpha: Any, caller: str = "train") -> float:
    """alpha as a float; a clear error unless it is a positive finite number."""
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"{caller}: alpha must be a number, got {alpha!r}") from None
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"{caller}: alpha must be a positive finite number, got {alpha}")
    return alpha


def renamed_kwargs(caller: str, legacy: Dict[str, Any], allowed: tuple, stacklevel: int = 3) -> Dict[str, Any]:
    """Map old keyword names of ``caller`` (those in ``allowed``) to the new ones, with a DeprecationWarning;
    TypeError for any other unknown keyword."""
    out = {}
    for old, v in legacy.items():
        if old not in allowed:
            raise TypeError(f"{caller}() got an unexpected keyword argument {old!r}")
        new = RENAMED[old]
        warnings.warn(f"{caller}: the keyword {old!r} is now {new!r}", DeprecationWarning, stacklevel=stacklevel)
        out[new] = v
    return out


def flow_config(caller: str, shared: Dict[str, Any], legacy: Dict[str, Any], allowed: tuple,
                other_budgets: Optional[Dict[str, bool]] = None) -> "FlowConfig":
    """The FlowConfig of a public entry point (train, kernel_flow): its keywords plus the old names in ``legacy``
    (renamed_kwargs), every validation error prefixed by ``caller``.

    No call runs without a budget: max_steps=math.inf (lifting the default step budget) needs max_time,
    max_wall or one of the caller's own budgets, ``other_budgets`` = {name: whether it was given} (e.g.
    {"max_epochs": True}), since the margin stop alone may never be met."""
    others = other_budgets or {}
    shared = {**shared, **renamed_kwargs(caller, legacy, allowed, stacklevel=4)}
    try:
        cfg = FlowConfig(**shared)
    except ValueError as exc:
        raise ValueError(f"{caller}: {exc}") from None
    if math.isinf(cfg.max_steps) and cfg.max_time is None and cfg.max_wall is None and not any(others.values()):
        names = ", ".join(["max_time", "max_steps", *others])
        raise ValueError(f"{caller}: give a budget ({names} or max_wall): max_steps=inf lifts the "
                         f"default step budget, and the margin stop alone may never be met")
    return cfg
