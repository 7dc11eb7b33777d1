"""A dispatch mode that refuses what a CUDA graph cannot capture, so that CPU tests guard captured regions.

Inside ``torch.cuda.graph`` capture, an op that makes the host wait for the device (``.item()``, ``float(t)``,
``if t.any():``, a copy to the host) fails or silently freezes a value into the graph, and an op whose output
shape depends on the data (``nonzero``, boolean-mask indexing, ``unique``) needs such a wait.  Allocation is
legal (it uses the graph's private pool).  :class:`NoHostSync` raises :class:`HostSyncError` naming the op on
the first of these, so a region run under it on the CPU is checked for what would break its capture on a GPU::

    with NoHostSync():
        engine._attempt_ops(0, 1)

What it refuses (by the ops' tags, so it follows torch's own classification):

* ``Tag.data_dependent_output``: ``aten._local_scalar_dense`` (``.item()``, ``float(t)``, ``bool(t)``),
  ``aten.equal`` and the like;
* ``Tag.dynamic_output_shape``: ``aten.nonzero``, ``aten.index.Tensor`` (mask indexing), ``aten._unique2``, ...;
* a tensor made from host data inside the region (``aten.lift_fresh``: ``torch.tensor(...)``,
  ``torch.from_numpy``), which on a GPU means a host-to-device copy of pageable memory;
* a copy that ends on the host: ``aten._to_copy`` / ``aten.copy_`` with a CPU destination and a non-CPU
  source.  On a CPU-only run every tensor is on the host, so a copy can only be recognised by its explicit
  destination: ``_to_copy`` with ``device="cpu"`` is refused there too (``t.to("cpu", copy=True)``).
  ``t.cpu()``, ``t.numpy()`` and ``t.tolist()`` of a CPU tensor never reach the dispatcher and are not seen
  on the CPU (on a GPU, ``.cpu()`` is a ``_to_copy`` and is refused).

``allow`` names ops (``"aten.nonzero.default"``) to let through.  Cost: one Python call per op.
"""
from __future__ import annotations

from typing import Iterable, List

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostSyncError", "NoHostSync"]

_COPIES = ("aten._to_copy.default", "aten.copy_.default", "aten._copy_from.default",
           "aten._copy_from_and_resize.default")


class HostSyncError(RuntimeError):
    """An op that forces a host synchronisation or a data-dependent shape ran under :class:`NoHostSync`."""


def _devices(x) -> List[torch.device]:
    if isinstance(x, torch.Tensor):
        return [x.device]
    if isinstance(x, (list, tuple)):
        return [d for item in x for d in _devices(item)]
    return []


def _host_copy(name: str, args, kwargs) -> bool:
    """True when the copy op ``name`` writes to the host: from a non-CPU source, or with an explicit CPU target."""
    if name == "aten._to_copy.default":
        dst = kwargs.get("device")
        return dst is not None and torch.device(dst).type == "cpu"
    dst, srcs = args[0], _devices(args[1:2])
    return dst.device.type == "cpu" and any(s.type != "cpu" for s in srcs)


class NoHostSync(TorchDispatchMode):
    """Raise :class:`HostSyncError` on ops that cannot be captured in a CUDA graph (see the module docstring).

    ``seen`` lists the names of the ops that ran (for tests that want to know the region did something).
    """

    def __init__(self, allow: Iterable[str] = ()):
        super().__init__()
        self.allow = set(allow)
        self.seen: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        self.seen.append(name)
        if name not in self.allow:
            why = None
            if torch.Tag.data_dependent_output in func.tags:
                why = "reads a tensor's value on the host (a device synchronisation)"
            elif torch.Tag.dynamic_output_shape in func.tags:
                why = "has an output shape that depends on the data (a device synchronisation)"
            elif name == "aten.lift_fresh.default":
                why = "makes a tensor from host data (torch.tensor / from_numpy: a host-to-device copy)"
            elif name in _COPIES and _host_copy(name, args, kwargs):
                why = "copies to the host (a device synchronisation)"
            if why is not None:
                raise HostSyncError(f"{name} {why}; it cannot run inside a captured CUDA graph")
        return func(*args, **kwargs)
