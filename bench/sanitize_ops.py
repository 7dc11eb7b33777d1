"""Small CUDA cases of every compiled op, for compute-sanitizer (memcheck, racecheck, synccheck) in
bench/gpu_all.sh:

    compute-sanitizer --tool memcheck --error-exitcode 1 python bench/sanitize_ops.py [DEVICE]

Runs the doctor's checks (every op, every precision, edge-case sizes: widths of one column, sizes that are not
multiples of the tiles, the packed layout) with the Gram op under each shared-memory configuration
(NTK_FAST_GRAM_SMEM_LIMIT: the H100, A100 and RTX/L4 choices and the two-stage float64 one), plus contiguous
but misaligned Gram inputs, a streamed Gram into host memory and a packed float32 kernel_flow_step with
n < 64.  ``python bench/sanitize_ops.py cpu`` runs the same cases on the CPU.  Sizes are tiny so that the instrumented run takes seconds per tool.  Exit status 1 when a check
gives wrong values (the sanitizer's own findings set its --error-exitcode).
"""
from __future__ import annotations

import os
import sys

import torch

os.environ["NTK_FAST_SELF_CHECK"] = "0"          # the doctor's checks below are the self-check

from ntk_fast.diagnostics import doctor  # noqa: E402
from ntk_fast.ntk.stream import gram_streamed  # noqa: E402
from ntk_fast.ops.packed import pack_symmetric  # noqa: E402
from ntk_fast.ops.reference import gram_reference, kernel_flow_step_ref  # noqa: E402

SMEM_LIMITS = (None, 163 * 1024, 99 * 1024, 80 * 1024)   # bytes (None: the device's own limit)


def _extra_cases(dev: torch.device) -> float:
    """Misaligned Gram inputs, a streamed Gram to the host, packed float32 kernel_flow_step (n < 64);
    returns the worst normwise relative error."""
    gen = torch.Generator().manual_seed(1)
    n, k = 70, 12
    bufs = [torch.randn(n * k + 1, generator=gen, dtype=torch.float64) for _ in range(2)]
    A = [torch.empty(n * k + 1, dtype=torch.float32, device=dev)[1:].view(n, k).copy_(bufs[0][1:].view(n, k))]
    D = [torch.empty(n * k + 1, dtype=torch.float32, device=dev)[1:].view(n, k).copy_(bufs[1][1:].view(n, k))]
    ref = gram_reference([A[0].cpu().double()], [D[0].cpu().double()], None, None, [1.0])
    errs = [doctor._rel_err([(torch.ops.ntk_fast.gram(A, D, None, None, [1.0], 0, "highest"), ref)])]
    host = gram_streamed(A, D, None, None, [1.0], panel_rows=32)
    errs.append(doctor._rel_err([(host, ref)]))
    m, E = 40, 2
    X = torch.randn(m, m + 3, generator=gen, dtype=torch.float64)
    theta = pack_symmetric(X @ X.T / m, 64).float()
    y = torch.where(torch.randn(E, m, generator=gen) > 0, 1.0, -1.0)
    f, g, r, c = (torch.randn(E, m, generator=gen) for _ in range(4))
    dt, active = torch.full((E,), 0.1), torch.tensor([True, True])
    args = (theta, y, f, g, r, c, dt, active)
    got = torch.ops.ntk_fast.kernel_flow_step(*(t.to(dev) for t in args), "softhinge", 20.0, 64, 0)
    want = kernel_flow_step_ref(*(t.double() if t.is_floating_point() else t for t in args), "softhinge", 20.0, 64)
    errs.append(doctor._rel_err(zip(got, want)))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return max(errs)


def main() -> int:
    dev = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda:0")   # "cpu" checks this script itself
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("sanitize_ops: no CUDA GPU visible; nothing to do")
        return 0
    bad = 0
    for limit in SMEM_LIMITS:
        if limit is None:
            os.environ.pop("NTK_FAST_GRAM_SMEM_LIMIT", None)
        else:
            os.environ["NTK_FAST_GRAM_SMEM_LIMIT"] = str(limit)
        ops = None if limit is None else ["gram"]
        res = doctor.run_checks([dev], ops, disable_failing=False)
        print(f"-- shared-memory limit {limit or 'of the device'}")
        print(doctor.format_table(res))
        bad += sum(not r.passed for r in res)
    os.environ.pop("NTK_FAST_GRAM_SMEM_LIMIT", None)
    err = _extra_cases(dev)
    print(f"-- misaligned / streamed Gram, packed float32 kernel_flow_step: max error {err:.1e}")
    bad += err > 1e-4
    print("sanitize_ops: " + ("OK" if not bad else f"{bad} check(s) FAILED"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
