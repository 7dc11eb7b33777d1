"""Row-panel streaming of the Gram op into a host tensor or a memory-mapped file.

``gram_streamed`` computes ``out = sum_l s_l (D1_l D2_l^T) o (A1_l A2_l^T)`` panel by panel when the
features are on a GPU but the result lives on the host (a CPU tensor, possibly over a numpy memmap) or
does not fit in GPU memory.  The features stay on the GPU; only two panels of ``panel_rows`` x ``n2``
exist on the device at a time.

Pipeline (CUDA features): panel p is computed with ``torch.ops.ntk_fast.gram.out`` on the current
stream into device buffer ``p % 2``; a second (copy) stream waits for it with an event and copies it into
pinned host buffer ``p % 2``; meanwhile the host thread waits for panel p - 1's copy event and copies
that panel from its pinned buffer into ``out`` (and, in symmetric mode, its transpose into the lower
part).  So the GPU computes panel p while the DMA engine moves panel p - 1 and the host scatters it.

Symmetric mode (``a2 = d2 = None``) computes only the upper part: for the panel of rows [r0, r1) the
diagonal block with the op's symmetric mode (exactly symmetric) and the block of columns [r1, n) with
the non-symmetric mode; the host writes the panel and mirrors the off-diagonal block.  That is about
half the flops of the full Gram, as in the op itself.

On CPU features the same panel logic runs without streams (each panel is one call of the CPU op), so it
can be tested anywhere.

What fits on an 80 GB GPU (features + two panel buffers; the Gram itself is on the host or on disk):
the features take ``n * sum_l (fan_in_l + fan_out_l) * itemsize`` bytes: for the paper's net with
d = 784, h = 1024, L = 3 (fan_in 784, 1024, 1024, 1024; fan_out 1024, 1024, 1024, 1) that is
6881 values per point, 27.5 kB in float32 and 55 kB in float64.  With two panel buffers of
``panel_rows * n * itemsize`` bytes each (default: at most 1 GiB each), n up to about 2.8 million points
(float32) or 1.4 million (float64) fits; then the host side must hold or map n^2 * itemsize bytes
(31 TB at n = 2.8 M in float32), which is the real limit.  For comparison, with ``out`` on the GPU itself
(the plain op), n^2 * itemsize + features must fit: n up to about 135 000 in float32 and 95 000 in
float64 on 80 GB.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from ntk_fast.ntk.padding import pad_features
from ntk_fast.ntk.panels import Panel, row_panels, store_panel
from ntk_fast.ops import gram as gram_ops
from ntk_fast.ops._loader import use_reference
from ntk_fast.ops.reference import gram_reference
from ntk_fast.ops.selfcheck import native_on
from ntk_fast.progress import progress_bar

__all__ = ["gram_streamed", "default_panel_rows"]


def default_panel_rows(n1: int, n2: int, itemsize: int, device: torch.device,
                       max_buffer_bytes: int = 1 << 30, memory_fraction: float = 0.5) -> int:
    """Rows per panel: two device buffers and two pinned host buffers of ``rows * n2 * itemsize`` bytes.

    On CUDA at most ``memory_fraction`` of the free device memory goes to the two device buffers, and each
    buffer is at most ``max_buffer_bytes``; rows are rounded down to a multiple of the kernel's tile (128).
    On the CPU, panels of 512 rows (the op itself parallelises within a panel).
    """
    row_bytes = max(1, n2 * itemsize)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(max_buffer_bytes, int(free * memory_fraction) // 2)
    else:
        budget = min(max_buffer_bytes, 512 * row_bytes)
    rows = max(1, budget // row_bytes)
    tile = gram_ops.CUDA_TILE
    if rows >= tile:
        rows = rows // tile * tile
    return int(max(1, min(rows, n1)))


def _as_list(x, name: str) -> List[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        raise TypeError(f"gram_streamed: {name} must be a list of per-layer tensors, got a single tensor")
    return list(x)


def _gram_into(a1, d1, a2, d2, scales, precision: str, dst: torch.Tensor) -> None:
    """dst = Gram of (a1, d1) with (a2, d2) (None: symmetric), one op call (arguments checked by the caller)."""
    if native_on("gram", dst.device):
        torch.ops.ntk_fast.gram.out(a1, d1, a2, d2, scales, 0, precision, out=dst)
    else:
        use_reference("gram")
        dst.copy_(gram_reference(a1, d1, a2, d2, scales))


def _compute_panel(a1, d1, a2, d2, scales, symmetric: bool, p: Panel, precision: str, dst: torch.Tensor) -> None:
    """dst (r1 - r0, n2 - c0) = Gram block of rows [r0, r1) and columns [c0, n2) (on the features' device).

    Symmetric: c0 = r0, the diagonal block [r0, r1)^2 with the symmetric op, the rest non-symmetric.
    """
    m = p.r1 - p.r0
    rows_a = [a[p.r0:p.r1] for a in a1]
    rows_d = [d[p.r0:p.r1] for d in d1]
    if symmetric:
        _gram_into(rows_a, rows_d, None, None, scales, precision, dst[:, :m])
        if dst.shape[1] > m:
            _gram_into(rows_a, rows_d, [a[p.r1:] for a in a1], [d[p.r1:] for d in d1], scales, precision,
                       dst[:, m:])
    else:
        _gram_into(rows_a, rows_d, a2, d2, scales, precision, dst)


def gram_streamed(a1: Sequence[torch.Tensor], d1: Sequence[torch.Tensor],
                  a2: Optional[Sequence[torch.Tensor]] = None, d2: Optional[Sequence[torch.Tensor]] = None,
                  scales: Optional[Sequence[float]] = None, out: Optional[torch.Tensor] = None, *,
                  panel_rows: Optional[int] = None, precision: str = "highest",
                  progress: Optional[bool] = None) -> torch.Tensor:
    """The Gram ``sum_l scales[l] (D1_l D2_l^T) o (A1_l A2_l^T)`` written panel by panel into a host ``out``.

    Args:
        a1, d1: per-layer features, lists of (n1, fan_in_l) and (n1, fan_out_l) tensors, all on one device
            (a CUDA device, or the CPU) with one dtype (float32 or float64).
        a2, d2: the same for the second set of points (n2 rows), or both None for the symmetric Gram of
            (a1, d1) with itself (only the upper part is computed, the rest is mirrored on the host).
        scales: one float per layer (default: all 1).
        out: (n1, n2) CPU tensor with any strides, e.g. ``torch.from_numpy(np.lib.format.open_memmap(...))``;
            its dtype may differ from the features' (values are converted on the host).  None allocates a
            CPU tensor of the features' dtype.  A CUDA ``out`` on the features' device is filled with one
            call of the op (no panels).
        panel_rows: rows per panel (default: ``default_panel_rows``).
        precision: "highest" or "tf32" (as for the op).
        progress: tqdm bar over panels (None: only when stderr is a terminal).

    Returns:
        ``out``.
    """
    a1 = _as_list(a1, "a1")
    d1 = _as_list(d1, "d1")
    if (a2 is None) != (d2 is None):
        raise ValueError("gram_streamed: give both a2 and d2, or neither (symmetric Gram)")
    symmetric = a2 is None
    a2 = None if a2 is None else _as_list(a2, "a2")
    d2 = None if d2 is None else _as_list(d2, "d2")
    if len(a1) == 0:
        raise ValueError("gram_streamed: a1 must hold at least one layer")
    if scales is None:
        scales = [1.0] * len(a1)
    scales = [float(s) for s in scales]
    if len(scales) != len(a1):
        raise ValueError(f"gram_streamed: scales must have one entry per layer ({len(a1)}), got {len(scales)}")
    if precision not in ("highest", "tf32"):
        raise ValueError(f"gram_streamed: precision must be 'highest' or 'tf32', got {precision!r}")

    ref = a1[0]
    device, dtype = ref.device, ref.dtype
    for name, lst in (("a1", a1), ("d1", d1), ("a2", a2 or []), ("d2", d2 or [])):
        for l, t in enumerate(lst):
            if not isinstance(t, torch.Tensor) or t.dim() != 2:
                raise ValueError(f"gram_streamed: {name}[{l}] must be a 2-D tensor")
            if t.device != device:
                raise ValueError(f"gram_streamed: {name}[{l}] is on {t.device} but a1[0] is on {device}")
    n1 = ref.shape[0]
    n2 = n1 if symmetric else a2[0].shape[0]

    if out is None:
        out = torch.empty((n1, n2), dtype=dtype)
    if tuple(out.shape) != (n1, n2):
        raise ValueError(f"gram_streamed: out must have shape ({n1}, {n2}), got {tuple(out.shape)}")
    if out.device.type == "cuda":
        if out.device != device:
            raise ValueError(f"gram_streamed: out is on {out.device} but the features are on {device}")
        return gram_ops.gram(a1, d1, a2, d2, scales, out=out, precision=precision)
    if out.device.type != "cpu":
        raise ValueError(f"gram_streamed: out must be a CPU tensor (or on the features' device), got {out.device}")
    if n1 == 0 or n2 == 0:
        return out

    itemsize = torch.empty((), dtype=dtype).element_size()
    if panel_rows is None:
        panel_rows = default_panel_rows(n1, n2, itemsize, device)
    panel_rows = int(panel_rows)
    if panel_rows < 1:
        raise ValueError(f"gram_streamed: panel_rows must be >= 1, got {panel_rows}")
    # Pad once here (CUDA features whose width is not a multiple of 16 bytes), not in every op call on a panel.
    a1, d1, a2, d2 = (None if x is None else pad_features(x) for x in (a1, d1, a2, d2))
    plan = row_panels(n1, panel_rows, symmetric)
    bar = progress_bar(progress, total=len(plan), desc="gram panels", unit="panel")

    cap = panel_rows * n2  # elements per buffer
    try:
        if device.type != "cuda":
            buf = torch.empty(cap, dtype=dtype, device=device)
            for p in plan:
                dst = buf[: (p.r1 - p.r0) * (n2 - p.c0)].view(p.r1 - p.r0, n2 - p.c0)
                _compute_panel(a1, d1, a2, d2, scales, symmetric, p, precision, dst)
                store_panel(out, dst, p, symmetric)
                if bar is not None:
                    bar.update(1)
            return out
        _stream_cuda(a1, d1, a2, d2, scales, symmetric, plan, precision, out, dtype, device, cap, bar)
        return out
    finally:
        if bar is not None:
            bar.close()


def _stream_cuda(a1, d1, a2, d2, scales, symmetric, plan, precision, out, dtype, device, cap, bar) -> None:
    with torch.cuda.device(device):
        compute = torch.cuda.current_stream(device)
        copier = torch.cuda.Stream(device)
        dev_buf = [torch.empty(cap, dtype=dtype, device=device) for _ in range(2)]
        host_buf = [torch.empty(cap, dtype=dtype, pin_memory=True) for _ in range(2)]
        computed = [torch.cuda.Event() for _ in range(2)]
        copied = [torch.cuda.Event() for _ in range(2)]
        pending = [None, None]  # plan entry whose copy into host_buf[b] is in flight

        def drain(b: int) -> None:
            p = pending[b]
            copied[b].synchronize()
            m, w = p.r1 - p.r0, out.shape[1] - p.c0
            store_panel(out, host_buf[b][: m * w].view(m, w), p, symmetric)
            pending[b] = None
            if bar is not None:
                bar.update(1)

        for i, p in enumerate(plan):
            b = i % 2
            if pending[b] is not None:  # only when the previous drain was skipped (never in this loop order)
                drain(b)
            m, w = p.r1 - p.r0, out.shape[1] - p.c0
            # dev_buf[b] was last read by the copy of panel i - 2: the compute stream waits for it.
            if i >= 2:
                compute.wait_event(copied[b])
            dst = dev_buf[b][: m * w].view(m, w)
            _compute_panel(a1, d1, a2, d2, scales, symmetric, p, precision, dst)
            computed[b].record(compute)
            with torch.cuda.stream(copier):
                copier.wait_event(computed[b])
                host_buf[b][: m * w].copy_(dev_buf[b][: m * w], non_blocking=True)
                copied[b].record(copier)
            pending[b] = p
            # While the GPU computes panel i, scatter panel i - 1 on the host.
            if i >= 1 and pending[1 - b] is not None:
                drain(1 - b)
        for b in ((len(plan) - 1) % 2, len(plan) % 2):
            if pending[b] is not None:
                drain(b)
        # The buffers were used on the copy stream: keep them alive until its work is done.
        copier.synchronize()
