"""ntk_fast: fast empirical NTK Gram matrices and lazy/feature training dynamics of deep FC networks."""
from ._ops import extension_available, gram
from .fc import FCNet, activation_normaliser
from .flow import FlowResult, train
from .kernel import KernelFlowResult, frozen_kernel_run, kernel_flow, kernel_regression, mse_flow
from .ntk import empirical_ntk, fcnet_fans, gram_flops, structured_features, supports_structured

__all__ = ["FCNet", "FlowResult", "KernelFlowResult", "activation_normaliser", "empirical_ntk",
           "extension_available", "fcnet_fans", "frozen_kernel_run", "gram", "gram_flops", "kernel_flow",
           "kernel_regression", "mse_flow", "structured_features", "supports_structured", "train"]
__version__ = "0.1.0"
