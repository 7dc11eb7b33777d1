"""Guards against bad input and faults: memory budget, non-Gram kernels, unsolved regressions, divergence.

See docs/errors.md for what each public entry point does with bad input.
"""
from ntk_fast.guards.memory import MemoryBudgetError, available_bytes, fmt_bytes, require_memory
from ntk_fast.guards.psd import check_gram, lanczos_extremes, PSD_EPS
from ntk_fast.guards.divergence import DivergenceMonitor
from ntk_fast.guards.solve import SolveReport, solve_report

DEFAULT_MAX_STEPS = 1_000_000   # default step budget of train and kernel_flow (accepted steps per net/problem)

__all__ = ["MemoryBudgetError", "available_bytes", "fmt_bytes", "require_memory", "check_gram", "lanczos_extremes",
           "PSD_EPS", "DivergenceMonitor", "SolveReport", "solve_report", "DEFAULT_MAX_STEPS"]
