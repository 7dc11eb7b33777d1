"""The few torch.distributed calls the on-disk Gram needs, each also valid without a process group.

Without an initialised process group (or without torch.distributed) the caller is rank 0 of a world of 1
and every collective is a no-op.  Errors are agreed on collectively (:func:`agree`): a rank that fails
still takes part in the next collective with its message, so its peers raise too instead of waiting in a
barrier until the process group's timeout.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple, TypeVar

import torch

T = TypeVar("T")


class DiskGramError(ValueError):
    """A problem with an on-disk Gram (manifest, array file, or a failure on another rank)."""


def _group_active() -> bool:
    dist = torch.distributed
    return bool(dist.is_available() and dist.is_initialized())


def rank_world() -> Tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if not _group_active():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def agree(error: Optional[BaseException]) -> None:
    """Collective: every rank passes its error (or None); if any rank failed, every rank raises.

    One process: the error itself is re-raised unchanged.  Several ranks: one all_gather_object of the
    messages (this is also the barrier between phases), then :class:`DiskGramError` naming the failing ranks.
    """
    if not _group_active():
        if error is not None:
            raise error
        return
    world = torch.distributed.get_world_size()
    msgs = [None] * world
    mine = None if error is None else f"{type(error).__name__}: {error}"
    torch.distributed.all_gather_object(msgs, mine)
    failed = [(r, m) for r, m in enumerate(msgs) if m is not None]
    if failed:
        text = "; ".join(f"rank {r}: {m}" for r, m in failed)
        if error is not None and len(failed) == 1:
            raise DiskGramError(text) from error
        raise DiskGramError(text)


def run_agreed(fn: Callable[[], T]) -> T:
    """Run ``fn`` on this rank, then :func:`agree` on its outcome; returns fn's result when every rank succeeded."""
    result, err = None, None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - handed to agree(), which re-raises on every rank
        err = e
    agree(err)
    return result
