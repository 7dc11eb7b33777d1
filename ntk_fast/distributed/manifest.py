"""The manifest of an on-disk Gram: what it holds (``PATH.manifest.json``, written once by rank 0) and which
tiles are finished (``PATH.done.rank<r>.json``, one file per rank, each written only by its rank).

A tile is listed as done only after its rows were flushed to the array file (msync), and every list is
replaced atomically (write a temporary file, fsync, rename), so after a kill at any moment the union of
the lists names only tiles whose data is on disk.  The manifest holds a SHA-256 digest of the model's
state (every tensor of ``state_dict`` with its name, dtype and shape, plus which parameters require grad)
and of x1 / x2, so a rerun with other weights or data is refused instead of mixing two Grams.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
from torch import nn

FORMAT = "ntk_fast.disk_gram"
VERSION = 1
# keys whose values must match between the manifest on disk and the current call
IDENTITY_KEYS = ("shape", "dtype", "mode", "method", "symmetric", "tile", "page_bytes", "precision",
                 "model_digest", "x1_digest", "x2_digest")


def manifest_path(path: str) -> str:
    return path + ".manifest.json"


def done_path(path: str, rank: int) -> str:
    return f"{path}.done.rank{rank}.json"


def _hash_tensor(h: "hashlib._Hash", name: str, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def model_digest(model: nn.Module) -> str:
    """SHA-256 of the model class, every state_dict tensor (name, dtype, shape, bytes) and the names of the
    parameters that require grad (the NTK is taken over those)."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    for name, t in model.state_dict().items():
        _hash_tensor(h, name, t)
    h.update(("|".join(n for n, p in model.named_parameters() if p.requires_grad)).encode())
    return h.hexdigest()


def tensor_digest(x: Optional[torch.Tensor]) -> Optional[str]:
    """SHA-256 of a tensor's dtype, shape and bytes (None for None)."""
    if x is None:
        return None
    h = hashlib.sha256()
    _hash_tensor(h, "x", x)
    return h.hexdigest()


def _write_json_atomic(path: str, obj: Dict[str, Any]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _read_json(path: str, what: str) -> Dict[str, Any]:
    try:
        with open(path) as fh:
            obj = json.load(fh)
    except (OSError, ValueError) as e:
        raise ValueError(f"on-disk Gram: the {what} {path} is unreadable or corrupt ({e}); it is never "
                         f"recomputed silently: restore it, or delete the array and its manifest files to "
                         f"start again") from e
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError(f"on-disk Gram: the {what} {path} is not an {FORMAT} file (corrupt or foreign)")
    if obj.get("version") != VERSION:
        raise ValueError(f"on-disk Gram: the {what} {path} has format version {obj.get('version')!r}, "
                         f"this ntk_fast reads version {VERSION}")
    return obj


def write_manifest(path: str, meta: Dict[str, Any]) -> None:
    _write_json_atomic(manifest_path(path), dict(meta, format=FORMAT, version=VERSION))


def check_manifest(path: str, meta: Dict[str, Any]) -> None:
    """Compare the manifest on disk with the current call; a difference raises ValueError naming the file
    and the fields (other weights, other data, other shape, tile, ...)."""
    mpath = manifest_path(path)
    disk = _read_json(mpath, "manifest")
    missing = [k for k in IDENTITY_KEYS if k not in disk]
    if missing:
        raise ValueError(f"on-disk Gram: the manifest {mpath} lacks {missing} (corrupt or truncated)")
    diff = [k for k in IDENTITY_KEYS if _norm(disk[k]) != _norm(meta[k])]
    if diff:
        what = ", ".join(f"{k}: on disk {disk[k]!r}, now {meta[k]!r}" for k in diff)
        raise ValueError(f"on-disk Gram: {path} was started for a different problem (manifest {mpath}; {what}); "
                         f"refusing to mix two Grams: use another path, or delete the array and "
                         f"{os.path.basename(path)}.manifest.json / .done.rank*.json to start again")


def _norm(v: Any) -> Any:
    return [_norm(a) for a in v] if isinstance(v, (list, tuple)) else v


def read_done(path: str) -> Tuple[Set[Tuple[int, int]], Set[int]]:
    """Union of the finished tiles and mirrored row blocks over every rank's list (any earlier world size)."""
    tiles: Set[Tuple[int, int]] = set()
    mirrors: Set[int] = set()
    for p in sorted(glob.glob(glob.escape(path) + ".done.rank*.json")):
        obj = _read_json(p, "list of finished tiles")
        try:
            tiles.update((int(a), int(b)) for a, b in obj["tiles"])
            mirrors.update(int(b) for b in obj["mirrors"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"on-disk Gram: the list of finished tiles {p} is corrupt ({e})") from e
    return tiles, mirrors


class DoneLog:
    """This rank's list of finished tiles and mirrored row blocks, rewritten atomically after each one."""

    def __init__(self, path: str, rank: int):
        self.file = done_path(path, rank)
        self.rank = rank
        self.tiles: List[List[int]] = []
        self.mirrors: List[int] = []
        self.seconds = 0.0              # computing tiles (features included)
        self.write_seconds = 0.0        # copying tiles into the map and flushing them, mirrors included
        if os.path.exists(self.file):
            old = _read_json(self.file, "list of finished tiles")
            self.tiles = [list(t) for t in old.get("tiles", [])]
            self.mirrors = list(old.get("mirrors", []))
            self.seconds = float(old.get("compute_seconds", 0.0))
            self.write_seconds = float(old.get("write_seconds", 0.0))

    def _save(self) -> None:
        _write_json_atomic(self.file, {"format": FORMAT, "version": VERSION, "rank": self.rank,
                                       "tiles": self.tiles, "mirrors": self.mirrors,
                                       "compute_seconds": self.seconds, "write_seconds": self.write_seconds})

    def tile_done(self, t: Tuple[int, int], seconds: float, write_seconds: float = 0.0) -> None:
        self.tiles.append([int(t[0]), int(t[1])])
        self.seconds += seconds
        self.write_seconds += write_seconds
        self._save()

    def mirror_done(self, block: int, write_seconds: float = 0.0) -> None:
        self.mirrors.append(int(block))
        self.write_seconds += write_seconds
        self._save()
