"""Plain-torch loops written the way the paper's reference code works, for tests (correctness) and benchmarks
(speed), so that both use the same loop: reference_loops.net_flow_loop, reference_loops.kernel_flow_loop."""
from ntk_fast.testing.reference_loops import kernel_flow_loop, net_flow_loop

__all__ = ["kernel_flow_loop", "net_flow_loop"]
