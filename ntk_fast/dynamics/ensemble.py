"""Ensemble observables along a trainer run (K > 1 nets with a test set).

Nets keep their own clocks, so ensemble records are keyed by the steps of the shared record schedule: the test
outputs of each net at scheduled step s wait (on the device) until every net has passed s or stopped; a
stopped net contributes its last output.  Then one record is made (:meth:`EnsembleTracker.flush`) with
:func:`ntk_fast.dynamics.observables.ensemble_stats` of the K outputs.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ntk_fast.dynamics import observables as obs
from ntk_fast.dynamics.results import v1_record


class EnsembleTracker:
    """Pending test outputs per scheduled step and the ensemble records made so far (see the module doc)."""

    def __init__(self, K: int):
        self.K = K
        self.pending: Dict[int, Dict[int, Tuple[float, torch.Tensor]]] = {}
        self.last: Dict[int, Tuple[float, torch.Tensor]] = {}   # latest output of each net
        self.last_step: Dict[int, int] = {}
        self.stopped: set = set()
        self.records: List[Dict[str, Any]] = []

    def _record(self, event: str, step: int, entries, y_test, wall: float, stopped: int) -> None:
        ts = [t for t, _ in entries]
        st = obs.ensemble_stats(torch.stack([F for _, F in entries]), y_test)
        self.records.append(dict(event=event, step=step, t_mean=float(np.mean(ts)), t_min=min(ts), t_max=max(ts),
                                 nets_stopped=stopped, wall=wall, **st))

    def add(self, k: int, step: int, t: float, Ft: torch.Tensor, scheduled: bool) -> None:
        """Output of net k at its step ``step``; ``scheduled``: a step of the shared record schedule."""
        self.last[k] = (t, Ft.detach().clone())
        self.last_step[k] = step
        if scheduled and (not self.records or step > self.records[-1]["step"]):
            self.pending.setdefault(step, {})[k] = self.last[k]

    def stop(self, k: int) -> None:
        self.stopped.add(k)

    def flush(self, y_test: torch.Tensor, wall: float, at_end: bool = False) -> None:
        """Make the records of the pending steps that every net has passed (all of them at the end, where every
        net has stopped), then at the end one "final" record of the nets' last outputs."""
        for s in sorted(self.pending):
            got = self.pending[s]
            if any(k not in got and (k not in self.stopped and not at_end or k not in self.last)
                   for k in range(self.K)):
                break
            entries = [got.get(k, self.last.get(k)) for k in range(self.K)]
            self._record("scheduled", s, entries, y_test, wall, sum(k not in got for k in range(self.K)))
            del self.pending[s]
        if at_end and len(self.last) == self.K:
            self._record("final", max(self.last_step.values()), [self.last[k] for k in range(self.K)], y_test, wall,
                         self.K)

    def state(self) -> Dict[str, Any]:
        """The tracker for a checkpoint (tensors on the CPU)."""
        cpu = lambda e: (e[0], e[1].cpu())  # noqa: E731
        return {"K": self.K, "pending": {s: {k: cpu(e) for k, e in d.items()} for s, d in self.pending.items()},
                "last": {k: cpu(e) for k, e in self.last.items()}, "last_step": dict(self.last_step),
                "stopped": sorted(self.stopped), "records": list(self.records)}

    @classmethod
    def from_state(cls, st: Optional[Dict[str, Any]], K: int, device) -> "EnsembleTracker":
        """The tracker of a checkpoint (records of version 1 renamed); a checkpoint written before ensemble
        records existed starts a new one."""
        tr = cls(K)
        if st is None:
            return tr
        dev = lambda e: (e[0], e[1].to(device))  # noqa: E731
        tr.pending = {s: {k: dev(e) for k, e in d.items()} for s, d in st["pending"].items()}
        tr.last = {k: dev(e) for k, e in st["last"].items()}
        tr.last_step = dict(st["last_step"])
        tr.stopped = set(st["stopped"])
        tr.records = [v1_record(r) for r in st["records"] if r["event"] != "final"]
        return tr

    def resumed(self, running: Sequence[int]) -> None:
        """Nets that a resumed run trains on are no longer stopped."""
        self.stopped -= set(running)
