"""The empirical NTK of any nn.Module from per-layer features (see plan.py for the formulas and their cost).

Features are captured in blocks of points (hooks + k backward passes per block, torch.func for the rest),
each piece already in the form the plan chose:

* hadamard: a (n, p), d (n, k, q);  pair: a (n, T, p), d (n, k, T, q);  grads: g (n, k, P).

Assembly (by row panels of the result when asked for, e.g. to stream into a memory-mapped ``out``):

* trace (and full with k = 1): one call of the fused C++ op ``ntk_fast.gram`` over all hadamard pieces
  (A, D flattened to (n, k q)); pair pieces through the C++ op ``ntk_fast.gram_full`` with the outputs
  folded into D's features (the token-pair form sum_{t,t'} (A_it . A_jt') (D_it . D_jt'), no (n T)^2
  matrix); grads pieces (G flattened to (n, k P)) by torch.mm on upper row panels, mirrored (``sym_gram``).
* full (k > 1): one call of ``ntk_fast.gram_full`` over the hadamard and pair pieces, the A products shared
  by the k x k output pairs, Theta[i, j, c, c'] = sum_l sum_{t,t'} (A_it . A_jt') (D_ict . D_jc't'), each
  tile combined in cache and written once (with its mirror); grads pieces are one (n k, n k) Gram of G.
  Cost n^2 sum_l T_l^2 (p_l + k^2 q_l) / 2 for the symmetric half instead of (n k)^2 sum_l T_l^2 (p_l + q_l) / 2.

Symmetric results (x2=None) in panels compute rows [r0, r1) against columns [r0, n) only and mirror.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Union

import torch
from torch import nn

from ntk_fast.ops import gram as _ops
from ntk_fast.ops import gram_full as _opsf
from ntk_fast.ntk import capture, layers
from ntk_fast.ntk.panels import default_full_rows
from ntk_fast.ntk.plan import Plan, make_plan


@dataclass
class Factored:
    """The signal of the layer below a linear readout, D[i, c] = s_i o w_c: s (n, q), w (k, q)."""
    s: torch.Tensor
    w: torch.Tensor

    def dense(self) -> torch.Tensor:
        """D (n, k, q)."""
        return self.s.unsqueeze(1) * self.w.unsqueeze(0)


def as_dense(d: Union[torch.Tensor, Factored]) -> torch.Tensor:
    """D (n, k, q) of a dense or factored signal."""
    return d.dense() if isinstance(d, Factored) else d


@dataclass
class Piece:
    form: str                             # "hadamard" | "pair" | "grads"
    a: Optional[torch.Tensor] = None
    d: Optional[torch.Tensor] = None      # hadamard with w: s (n, q) of D[i, c] = s_i o w_c (Factored)
    g: Optional[torch.Tensor] = None
    w: Optional[torch.Tensor] = None      # the factor (k, q) of a factored hadamard piece

    def rows(self, r0: int, r1: int) -> "Piece":
        s = slice(r0, r1)
        return Piece(self.form, None if self.a is None else self.a[s], None if self.d is None else self.d[s],
                     None if self.g is None else self.g[s], self.w)

    def dense_d(self) -> torch.Tensor:
        """D (n, k, q) of a hadamard piece (made dense when factored)."""
        return self.d if self.w is None else Factored(self.d, self.w).dense()


# ---------------------------------------------------------------------------------------------- features

def _convert(form: str, A: torch.Tensor, D: torch.Tensor) -> Piece:
    if form == "hadamard":
        return Piece(form, a=A[:, 0], d=D[:, :, 0])
    if form == "pair":
        return Piece(form, a=A, d=D)
    # G[i, c] = sum_t D[i, c, t]^T A[i, t]: (n, k, q, T) @ (n, 1, T, p)
    return Piece("grads", g=torch.matmul(D.transpose(2, 3), A.unsqueeze(1)).flatten(2))


def _direct(e) -> bool:
    """Whether the plan entry is a convolution whose per-sample gradients are formed directly (``conv_grads``)."""
    return e.form == "grads" and e.kind in ("Conv1d", "Conv2d")


def _block_pieces(model: nn.Module, x: torch.Tensor, plan: Plan,
                  dest: Optional[Dict[str, List[torch.Tensor]]] = None,
                  scratch: Optional[layers.Scratch] = None) -> List[Piece]:
    direct = {e.module for e in plan.entries if _direct(e)}
    _, feats, bad = capture.hook_features(model, x, plan.hooked, direct, dest, scratch)
    if bad:
        raise RuntimeError(f"empirical_ntk: hooks failed on a later block: {bad}")
    out = []
    with torch.no_grad():
        for e in plan.entries:
            if e.form == "jacobian":
                out.append(Piece("grads", g=capture.func_grads(model, e.params, x)))
            elif isinstance(feats[e.module], torch.Tensor):
                out.append(Piece("grads", g=feats[e.module]))
            elif isinstance(feats[e.module][e.group], torch.Tensor):     # conv gradients formed directly
                out.append(Piece("grads", g=feats[e.module][e.group]))
            else:
                A, D = feats[e.module][e.group]
                out.append(_convert(e.form, A, D))
    return out


def features(model: nn.Module, x: torch.Tensor, plan: Plan, block: int) -> List[Piece]:
    """Pieces of every plan entry for all points of x, captured ``block`` points at a time.

    The first block fixes each feature's shape and dtype; the full (n, ...) tensors are allocated then and the
    first block is copied into its rows (no concatenation at the end: one copy of the features, not two, at the
    peak).  Later blocks of directly formed convolution gradients are written straight into their rows; the
    other features are copied.  One patch buffer serves every convolution and block.
    """
    n = x.shape[0]
    scratch = layers.Scratch()
    first = _block_pieces(model, x[:block], plan, None, scratch)
    if n <= block:
        return first
    grow = lambda t: None if t is None else t.new_empty((n,) + tuple(t.shape[1:]))   # noqa: E731
    full = [Piece(p.form, grow(p.a), grow(p.d), grow(p.g)) for p in first]
    dest: Dict[str, List[torch.Tensor]] = {}
    for e, f in zip(plan.entries, full):          # entries of a module come in group order
        if _direct(e):
            dest.setdefault(e.module, []).append(f.g)
    for i in range(0, n, block):
        rows = {nm: [t[i:i + block] for t in ts] for nm, ts in dest.items()}
        part = first if i == 0 else _block_pieces(model, x[i:i + block], plan, rows, scratch)
        for e, dst, src in zip(plan.entries, full, part):
            if i > 0 and _direct(e):
                continue                   # written in place
            for name in ("a", "d", "g"):
                t = getattr(dst, name)
                if t is not None:
                    t[i:i + block].copy_(getattr(src, name))
    return full


# ---------------------------------------------------------------------------------------------- blocks

def sym_gram(Xs: List[torch.Tensor], Ys: Optional[List[torch.Tensor]] = None, panels: int = 8) -> torch.Tensor:
    """sum_l X_l Y_l^T (Y = X: symmetric) with torch.mm, X_l (n1, P_l), Y_l (n2, P_l).

    Symmetric: row panels against the columns from their own start, accumulated in place (addmm_ on the
    strided block, no copies), then mirrored: (panels + 1) / (2 panels) of the square's flops.  Used for
    materialised gradients: for very wide X the fused Gram op (built for many layers of moderate width, with
    a ones column as D) measured several times slower than torch.mm on this CPU.
    """
    X0 = Xs[0]
    if Ys is not None:
        out = torch.zeros(X0.shape[0], Ys[0].shape[0], dtype=X0.dtype, device=X0.device)
        for X, Y in zip(Xs, Ys):
            out.addmm_(X, Y.T)
        return out
    n = X0.shape[0]
    out = torch.zeros(n, n, dtype=X0.dtype, device=X0.device)
    b = max(128, math.ceil(n / panels))
    for r0 in range(0, n, b):
        r1 = min(n, r0 + b)
        for X in Xs:
            out[r0:r1, r0:].addmm_(X[r0:r1], X[r0:].T)
        if r1 < n:
            out[r1:, r0:r1] = out[r0:r1, r1:].T
    return out


def _trace_block(P1: List[Piece], P2: Optional[List[Piece]], precision: str) -> torch.Tensor:
    """sum over outputs c of Theta[i, j, c, c] for rows P1 and columns P2 (None: P1 with itself)."""
    sym = P2 is None
    P2 = P1 if sym else P2
    a1, d1, a2, d2, g1, g2, t1, t2 = [], [], [], [], [], [], [], []
    res = None
    for p, q in zip(P1, P2):
        if p.form == "hadamard":
            a1.append(p.a); d1.append(p.dense_d().flatten(1)); a2.append(q.a); d2.append(q.dense_d().flatten(1))
        elif p.form == "grads":     # torch.mm on the concatenated gradients (below)
            g1.append(p.g.flatten(1)); g2.append(q.g.flatten(1))
        else:       # pair: the token-pair form in the gram_full op, outputs traced (op_features)
            t1.append(p); t2.append(q)
    if t1:
        (ta1, td1, _), (ta2, td2, _) = op_features(t1, trace=True), op_features(t2, trace=True)
        res = _opsf.gram_full(ta1, td1, None if sym else ta2, None if sym else td2)[:, :, 0, 0]
    if a1:
        blk = _ops.gram(a1, d1, None if sym else a2, None if sym else d2, precision=precision)
        res = blk if res is None else res + blk
    if g1:
        blk = sym_gram(g1, None if sym else g2)
        res = blk if res is None else res + blk
    return res


def op_features(P: List[Piece], trace: bool = False):
    """The hadamard and pair pieces as the gram_full op's lists: a (n, T, p), d (n, k, T, q), and w (the
    factors: None, or per piece None or w (k, q) with d = s (n, 1, 1, q) for a factored piece).

    trace: d as (n, 1, T, k q), so that the op's single output pair is sum_c D_ict . D_jct' (the trace over
    outputs; factored pieces made dense).  Grads pieces are left out (see ``_grads_full``)."""
    A, D, W = [], [], []
    for p in P:
        if p.form == "hadamard" and p.w is not None and not trace:
            a, d = p.a[:, None, :], p.d[:, None, None, :]
        elif p.form == "hadamard":
            a, d = p.a[:, None, :], p.dense_d()[:, :, None, :]
        elif p.form == "pair":
            a, d = p.a, p.d
        else:
            continue
        A.append(a)
        D.append(d.transpose(1, 2).flatten(2).unsqueeze(1) if trace else d)
        W.append(None if trace else p.w)
    return A, D, (W if any(f is not None for f in W) else None)


def _grads_full(P1: List[Piece], P2: Optional[List[Piece]], k: int) -> Optional[torch.Tensor]:
    """Theta (r, c, k, k) of the grads pieces: one Gram of G flattened to (r k, P) by torch.mm (``sym_gram``:
    for very wide G a single large product beats per-tile products), as a permuted view, or None."""
    g1 = [p.g.flatten(0, 1) for p in P1 if p.form == "grads"]
    if not g1:
        return None
    g2 = None if P2 is None else [p.g.flatten(0, 1) for p in P2 if p.form == "grads"]
    G = sym_gram(g1, g2)
    r, c = G.shape[0] // k, G.shape[1] // k
    return G.view(r, k, c, k).permute(0, 2, 1, 3)


def _feature_device(P: List[Piece]) -> torch.device:
    p = P[0]
    return next(t for t in (p.a, p.d, p.g) if t is not None).device


def _staged(res: torch.Tensor, dev: torch.device) -> bool:
    """Whether the result lives on another device than the features (a host memmap for GPU features): each
    block is then computed on the features' device and copied."""
    return res.device != dev


def _full_into(res: torch.Tensor, P1: List[Piece], P2: Optional[List[Piece]], k: int) -> None:
    """res (r, c, k, k) = Theta for rows P1 and columns P2 (None: P1 with itself, symmetric), the A products
    shared by the k x k output pairs: one call of the C++ op ``gram_full`` over the hadamard and pair pieces
    (Theta[i, j, c, c'] = sum_l sum_{t, t'} (A_it . A_jt') (D_ict . D_jc't'), written once into res), plus the
    Gram of the materialised gradients.  res on another device than the features: through a block there."""
    dev = _feature_device(P1)
    target = torch.empty(res.shape, dtype=res.dtype, device=dev) if _staged(res, dev) else res
    A1, D1, W = op_features(P1)
    A2, D2, _ = (None, None, None) if P2 is None else op_features(P2)
    if A1:
        _opsf.gram_full(A1, D1, A2, D2, out=target, w=W)
    g = _grads_full(P1, P2, k)
    if g is not None:
        target.add_(g) if A1 else target.copy_(g)
    if target is not res:
        res.copy_(target)


def _diagonal(P1: List[Piece]) -> torch.Tensor:
    """Theta(x_i, x_i) summed over outputs, (n,)."""
    res = 0
    for p in P1:
        if p.form == "grads":
            res = res + (p.g * p.g).sum(dim=(1, 2))
        elif p.form == "hadamard":
            d = p.dense_d()
            res = res + (p.a * p.a).sum(1) * (d * d).sum(dim=(1, 2))
        else:
            ka = p.a @ p.a.transpose(1, 2)                                    # (n, T, T)
            dd = torch.einsum("nktq,nkuq->ntu", p.d, p.d)
            res = res + (ka * dd).sum(dim=(1, 2))
    return res


# ---------------------------------------------------------------------------------------------- assembly

def assemble(P1: List[Piece], P2: Optional[List[Piece]], k: int, mode: str, out: Optional[torch.Tensor],
             panel: Optional[int], progress: bool, precision: str) -> torch.Tensor:
    """Write the NTK in ``mode`` into out (or a new tensor), by row panels when ``panel`` is set."""
    sym = P2 is None
    Pc = P1 if sym else P2
    first = P1[0].a if P1[0].a is not None and P1[0].a.is_floating_point() else (
        P1[0].d if P1[0].d is not None else P1[0].g)
    n1 = (P1[0].a if P1[0].a is not None else P1[0].g).shape[0]
    n2 = (Pc[0].a if Pc[0].a is not None else Pc[0].g).shape[0]
    if mode == "diagonal":
        diag = _diagonal(P1)
        return diag if out is None else out.copy_(diag)
    full = mode == "full" and k > 1
    shape = (n1, n2, k, k) if full else (n1, n2)
    res = out if out is not None else torch.empty(shape, dtype=first.dtype, device=first.device)
    # a result on another device (a host memmap for GPU features) is staged one row panel at a time
    if panel is None and not (full and (progress or _staged(res, first.device))):
        if full:
            _full_into(res, P1, P2, k)
            return res
        blk = _trace_block(P1, P2, precision)
        return blk if out is None else res.copy_(blk)
    if panel is None:
        panel = default_full_rows(n1)
    starts = range(0, n1, panel)
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc="ntk", unit="panel")
    for r0 in starts:
        r1 = min(n1, r0 + panel)
        rows = [p.rows(r0, r1) for p in P1]
        if not sym:
            if full:
                _full_into(res[r0:r1], rows, Pc, k)
            else:
                res[r0:r1] = _trace_block(rows, Pc, precision)
            continue
        if full:     # the diagonal block symmetric (exactly), the rest of the row panel, then the mirror
            _full_into(res[r0:r1, r0:r1], rows, None, k)
            if r1 < n1:
                _full_into(res[r0:r1, r1:], rows, [p.rows(r1, n1) for p in P1], k)
                res[r1:, r0:r1] = res[r0:r1, r1:].permute(1, 0, 3, 2)
            continue
        res[r0:r1, r0:] = _trace_block(rows, [p.rows(r0, n1) for p in P1], precision)
        d = res[r0:r1, r0:r1]
        d.copy_((d + d.T) / 2)
        if r1 < n1:
            res[r1:, r0:r1] = res[r0:r1, r1:].T
    return res


def default_block(model: nn.Module, x: torch.Tensor) -> int:
    """Points per feature block: bounded so the captured activations stay moderate (about 512 points)."""
    return max(1, min(x.shape[0], 512))


def feature_bytes(plan: Plan, n: int, esize: int) -> int:
    """Memory of the features the plan keeps for n points (grads: n k P; hadamard / pair: n T (p + k q))."""
    total = 0
    for e in plan.entries:
        if e.form in ("grads", "jacobian"):
            total += n * plan.k * e.P * esize
        else:
            total += n * e.T * (e.p + plan.k * e.q) * esize
    return total


def _check_memory(plan: Plan, n: int, esize: int, device: torch.device) -> None:
    try:
        if device.type == "cuda":
            avail = torch.cuda.mem_get_info(device)[0]
        else:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError, RuntimeError):  # pragma: no cover - non-POSIX
        return
    need = feature_bytes(plan, n, esize)
    if need > 0.8 * avail:
        big = max(plan.entries, key=lambda e: e.P if e.form in ("grads", "jacobian") else e.T * (e.p + e.q))
        raise ValueError(f"empirical_ntk: the per-layer features need about {need / 2**30:.1f} GiB for {n} points, "
                         f"more than 80% of the {avail / 2**30:.1f} GiB available (largest: "
                         f"{big.module or 'torch.func'} {big.form}, P={big.P}); use fewer points per call")


def any_model_ntk(model: nn.Module, x1: torch.Tensor, x2: Optional[torch.Tensor], mode: str, method: str,
                  block_size: Optional[int], out: Optional[torch.Tensor], progress: bool,
                  precision: str) -> torch.Tensor:
    """empirical_ntk for any model: plan, features of x1 (and x2), assembly (see the module docstring)."""
    plan = make_plan(model, x1, x2, mode, method)
    p0 = next(p for p in model.parameters() if p.requires_grad)
    _check_memory(plan, x1.shape[0] + (0 if x2 is None else x2.shape[0]), p0.element_size(), p0.device)
    block = block_size or default_block(model, x1)
    P1 = features(model, x1, plan, block)
    P2 = None if x2 is None else features(model, x2, plan, block)
    return assemble(P1, P2, plan.k, mode, out, block_size, progress, precision)


def fc_pieces(A: List[torch.Tensor], D: List[Union[torch.Tensor, Factored]]) -> List[Piece]:
    """Hadamard pieces from the structured features of an FCNet / Sequential (A (n, p), D (n, k, q) or
    Factored)."""
    return [Piece("hadamard", a=a, d=d.s, w=d.w) if isinstance(d, Factored) else Piece("hadamard", a=a, d=d)
            for a, d in zip(A, D)]
