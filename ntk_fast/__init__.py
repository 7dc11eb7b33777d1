"""ntk_fast: fast empirical NTK Gram matrices and lazy/feature training dynamics of deep FC networks."""
from ntk_fast.ops.gram import extension_available, gram
from ntk_fast.models.fc import FCNet, activation_normaliser
from ntk_fast.dynamics.trainer import FlowResult, train
from ntk_fast.dynamics.solver import KernelFlowResult, frozen_kernel_run, kernel_flow, kernel_regression, mse_flow
from ntk_fast.ntk.empirical import empirical_ntk, fcnet_fans, gram_flops, structured_features, supports_structured
from ntk_fast.limits import limit_kernels

__all__ = ["FCNet", "FlowResult", "KernelFlowResult", "activation_normaliser", "empirical_ntk",
           "extension_available", "fcnet_fans", "frozen_kernel_run", "gram", "gram_flops", "kernel_flow",
           "kernel_regression", "mse_flow", "structured_features", "supports_structured", "train"]
__version__ = "0.1.0"
