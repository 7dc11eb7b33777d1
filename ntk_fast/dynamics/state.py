"""Host-side state of a trainer run: one :class:`NetState` per net, and the resume file (checkpoint).

A checkpoint (format version 2) is a torch file {format_version, kind: "train", config, engine (the engine's
tensors), nets (one NetState dict per net), history (one record list per net), ensemble (the tracker), wall}.
Checkpoints of version 1 ({version: 1, host: dict of per-net lists, history: one flat list}) are converted.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, List

from ntk_fast.dynamics.results import load_checkpoint, nested_history

_V1_HOST_NAMES = {"gsq": "g_sq", "nd": "n_under", "msq": "mean_sq", "next_ckpt": "next_record",
                  "n_ckpt": "n_records"}


@dataclass
class NetState:
    """Bookkeeping of one net (floats and ints on the host; the tensors live in the engine)."""
    t: float = 0.0                 # flow time
    dt: float = 1.0                # step size of the next attempt
    step: int = 0                  # accepted steps
    attempts: int = 0
    rejections: int = 0            # consecutive rejections
    g_sq: float = math.nan         # |g|^2 of the state
    loss: float = math.nan         # L(w) of the state
    n_under: int = 0               # training points with y F < 1
    mean_sq: float = 0.0           # mean F^2 on the training set
    l0: float = math.nan           # mean l at t = 0 (= alpha^2 L(w0))
    next_record: int = 0           # the next step of the record schedule
    n_records: int = 0
    last_dt: float = 0.0           # dt, dgrad, dout of the last accepted step
    last_dgrad: float = 0.0
    last_dout: float = 0.0
    t1: float = math.nan           # first t with mean l <= t1_fraction * l0
    t_grow: float = math.nan       # first t with rms(f - f0) >= grow_factor * rms(f0)
    status: str = "running"


def read_checkpoint(path: Any) -> Dict[str, Any]:
    """A trainer checkpoint as {config, engine, nets: [NetState], history: [[record]], ensemble, wall}, from a file
    of version 2 or 1; errors name the file."""
    what = "train(resume=...)"
    blob = load_checkpoint(path, what)
    if "format_version" not in blob:
        blob = load_checkpoint(path, what, ("version", "config", "engine", "host", "history"))
        if blob["version"] != 1:
            raise ValueError(f"train: {path} is not a flow checkpoint of version 1")
        host = {_V1_HOST_NAMES.get(k, k): v for k, v in blob["host"].items()}
        K = blob["config"]["K"]
        nets = [NetState(**{k: v[i] for k, v in host.items()}) for i in range(K)]
        history = nested_history([r for r in blob["history"] if r["event"] != "final"], K)
        return dict(config=blob["config"], engine=blob["engine"], nets=nets, history=history,
                    ensemble=blob.get("ensemble"), wall=blob["wall"])
    blob = load_checkpoint(path, what, ("config", "engine", "nets", "history", "wall"))
    if blob.get("kind") != "train":
        raise ValueError(f"train: {path} is not a trainer checkpoint (kind {blob.get('kind')!r})")
    return dict(config=blob["config"], engine=blob["engine"], nets=[NetState(**s) for s in blob["nets"]],
                history=[[r for r in h if r["event"] != "final"] for h in blob["history"]],
                ensemble=blob.get("ensemble"), wall=blob["wall"])


def checkpoint_blob(config: Dict[str, Any], engine: Dict[str, Any], nets: List[NetState],
                    history: List[List[Dict[str, Any]]], ensemble: Dict[str, Any], wall: float) -> Dict[str, Any]:
    """The dict a trainer checkpoint stores (atomic_save adds format_version)."""
    return dict(kind="train", config=config, engine=engine, nets=[dataclasses.asdict(s) for s in nets],
                history=[list(h) for h in history], ensemble=ensemble, wall=wall)
