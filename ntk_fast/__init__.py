"""ntk_fast: fast empirical NTK Gram matrices and lazy/feature training dynamics of deep FC networks.

The names below are what users call; everything else lives in the subpackages (layout: docs/design.md).
"""
from ntk_fast import data
from ntk_fast.ops._loader import extension_available
from ntk_fast.ops.gram import gram
from ntk_fast.ops.gram_full import gram_full
from ntk_fast.ntk.stream import gram_streamed
from ntk_fast.models.fc import FCNet, activation_normaliser
from ntk_fast.dynamics.trainer import FlowResult, train
from ntk_fast.dynamics.solver import KernelFlowResult, frozen_kernel_run, kernel_flow, kernel_regression, mse_flow
from ntk_fast.models.cnn import CV
from ntk_fast.ntk.plan import Plan, ntk_plan
from ntk_fast.ntk.empirical import empirical_ntk, structured_features, supports_structured
from ntk_fast.limits import limit_kernels
from ntk_fast.diagnostics.doctor import check_cuda
from ntk_fast import sphere, spectrum

__all__ = ["CV", "FCNet", "FlowResult", "KernelFlowResult", "Plan", "activation_normaliser", "check_cuda", "data",
           "empirical_ntk", "extension_available", "frozen_kernel_run", "gram", "gram_full", "gram_streamed", "kernel_flow",
           "kernel_regression", "limit_kernels", "mse_flow", "ntk_plan", "sphere", "spectrum", "structured_features",
           "supports_structured", "train"]
__version__ = "0.1.0"
