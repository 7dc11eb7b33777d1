"""Helpers for tests and benchmarks: plain-torch loops written the way the paper's reference code works, so that
tests (correctness) and benchmarks (speed) use the same loop (reference_loops.net_flow_loop,
reference_loops.kernel_flow_loop); a dispatch mode that refuses what a CUDA graph cannot capture
(no_sync.NoHostSync), so that CPU tests guard the captured regions."""
from ntk_fast.testing.no_sync import HostSyncError, NoHostSync
from ntk_fast.testing.reference_loops import kernel_flow_loop, net_flow_loop

__all__ = ["HostSyncError", "NoHostSync", "kernel_flow_loop", "net_flow_loop"]
