"""Per-layer NTK features of one call of a supported module, from its input and its output signal.

For a call with input ``x`` (batch first, n points) and ``D[:, c] = d f_c / d y`` at its output y
(shape (n, k, *y.shape[1:])), each function returns the exact per-sample gradient of f_c with respect
to the module's trainable parameters, in one of two factored forms:

* **token pieces** ``(A, D)`` with A (n, T, p) and D (n, k, T, q): the per-sample gradient of the
  (q, p) parameter block is ``G[i, c] = sum_t D[i, c, t] A[i, t]^T``.  Linear on (n, *, p) inputs
  (T = prod of the middle dims), Conv1d/Conv2d (A = unfolded input patches, T = output positions,
  one piece per group), Embedding (A = one-hot rows of the indices, p = vocabulary size).
  A bias is a column of ones appended to A (the bias gradient is sum_t D[i, c, t]).
* **materialised gradients** G (n, k, P): LayerNorm / GroupNorm / eval-mode BatchNorm affine
  parameters, ``G_weight = sum_{other dims} D * xhat`` and ``G_bias = sum_{other dims} D`` with xhat
  the normalised input.

``rows(m)`` says whether a module type is handled here; ``reject(m)`` names why a module cannot be.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
TOKEN_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)
NORM_TYPES = (nn.LayerNorm, nn.GroupNorm) + BATCHNORMS
Piece = Tuple[torch.Tensor, torch.Tensor]


def trainable(m: nn.Module) -> List[str]:
    """Names among ('weight', 'bias') of the module's own trainable parameters."""
    return [nm for nm in ("weight", "bias")
            if isinstance(getattr(m, nm, None), nn.Parameter) and getattr(m, nm).requires_grad]


def reject(m: nn.Module) -> Optional[str]:
    """None when hooks give m's per-sample gradients exactly, else the reason (its parameters go to torch.func).

    Exact types only: a subclass may change forward (nn.MultiheadAttention's out_proj is a Linear subclass
    whose weight is passed to the functional attention, never called).
    """
    if type(m) not in TOKEN_TYPES + NORM_TYPES:
        return f"{type(m).__name__} is not a supported layer kind"
    if isinstance(m, nn.Embedding) and (m.max_norm is not None or m.scale_grad_by_freq or m.sparse):
        return "Embedding with max_norm, scale_grad_by_freq or sparse"
    if isinstance(m, BATCHNORMS) and (m.training or m.running_mean is None):
        return "BatchNorm using batch statistics"
    return None


def _ones(n: int, T: int, like: torch.Tensor) -> torch.Tensor:
    return torch.ones(n, T, 1, dtype=like.dtype, device=like.device)


def _with_bias(m: nn.Module, A: torch.Tensor, names: List[str]) -> torch.Tensor:
    """A (n, T, p) restricted to the trainable parts: the input for the weight, a ones column for the bias."""
    cols = [A] if "weight" in names else []
    if "bias" in names:
        cols.append(_ones(A.shape[0], A.shape[1], A))
    return cols[0] if len(cols) == 1 else torch.cat(cols, dim=2)


def _linear(m: nn.Linear, x: torch.Tensor, D: torch.Tensor, names: List[str]) -> List[Piece]:
    n, k = D.shape[0], D.shape[1]
    A = x.reshape(n, -1, m.in_features)
    return [(_with_bias(m, A, names), D.reshape(n, k, A.shape[1], m.out_features))]


def _zero_pad(x: torch.Tensor, pads: List[int], scratch: "Scratch") -> torch.Tensor:
    """F.pad(x, pads) with zeros, written into the scratch buffer's 'pad' slot (no fresh allocation)."""
    lo, hi = pads[0::2][::-1], pads[1::2][::-1]            # per padded dim, outermost first
    lead = x.dim() - len(lo)
    shape = tuple(x.shape[:lead]) + tuple(s + a + b for s, a, b in zip(x.shape[lead:], lo, hi))
    xp = scratch.take(shape, x, "pad")
    for d, (a, b, s) in enumerate(zip(lo, hi, x.shape[lead:]), start=lead):   # zero the borders only
        xp.narrow(d, 0, a).zero_()
        xp.narrow(d, a + s, b).zero_()
    xp[(...,) + tuple(slice(a, a + s) for a, s in zip(lo, x.shape[lead:]))].copy_(x)
    return xp


def _conv_geometry(m: nn.Module, x: torch.Tensor, scratch: Optional["Scratch"] = None):
    """(two_d, padded input as 4-D, kernel size, stride, dilation) of a Conv1d/Conv2d, Conv1d as a 1 x k Conv2d;
    padding of any mode (and 'same') applied with the module's own amounts (zeros into ``scratch`` when given)."""
    two_d = isinstance(m, nn.Conv2d)
    mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
    pads = list(m._reversed_padding_repeated_twice)
    if mode == "constant" and scratch is not None and any(pads):
        xp = _zero_pad(x, pads, scratch)
    else:
        xp = F.pad(x, pads, mode=mode)
    if not two_d:
        xp = xp.unsqueeze(2)
    ks = tuple(m.kernel_size) if two_d else (1, m.kernel_size[0])
    st = tuple(m.stride) if two_d else (1, m.stride[0])
    dl = tuple(m.dilation) if two_d else (1, m.dilation[0])
    return two_d, xp, ks, st, dl


def _conv(m: nn.Module, x: torch.Tensor, D: torch.Tensor, names: List[str]) -> List[Piece]:
    """Conv1d/Conv2d: unfold the (padded) input into patches, one piece per group.

    Padding of any mode (and 'same') is applied first with the module's own pad amounts, then the patches
    are taken with padding 0: out[:, o, pos] = sum_{c, kernel} W[o, c, kernel] patch[:, (c, kernel), pos].
    """
    two_d, xp, ks, st, dl = _conv_geometry(m, x)
    cols = F.unfold(xp, ks, dilation=dl, padding=0, stride=st)          # (n, C_in * prod(ks), T)
    n, k, g = D.shape[0], D.shape[1], m.groups
    T = cols.shape[2]
    cin_g, cout_g = m.in_channels // g, m.out_channels // g
    kk = ks[0] * ks[1]
    Dt = D.reshape(n, k, m.out_channels, T)
    pieces = []
    for j in range(g):
        A = cols[:, j * cin_g * kk:(j + 1) * cin_g * kk].transpose(1, 2)
        Dj = Dt[:, :, j * cout_g:(j + 1) * cout_g].transpose(2, 3)
        pieces.append((_with_bias(m, A, names), Dj))
    return pieces


class Scratch:
    """Reusable flat buffers per (dtype, device, slot); ``take(shape, like, slot)`` returns a view of one's start.

    The per-sample convolution gradients unfold every block of points into the same buffer, so the patch
    matrices are allocated (and their pages first touched) once per ``empirical_ntk`` call, not once per layer
    and block: on this CPU a fresh 50 MB tensor costs about 10x more in page faults than the copy that fills it.
    """

    def __init__(self) -> None:
        self._bufs: Dict[Tuple[torch.dtype, torch.device, str], torch.Tensor] = {}

    def take(self, shape: Tuple[int, ...], like: torch.Tensor, slot: str = "patches") -> torch.Tensor:
        numel = math.prod(shape)
        key = (like.dtype, like.device, slot)
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=like.dtype, device=like.device)
            self._bufs[key] = buf
        return buf[:numel].view(shape)


PATCH_BYTES = 256 * 2 ** 20     # largest patch buffer of one block of points (fewer points per bmm above it)


def _patches(xp: torch.Tensor, ks, st, dl, out_hw) -> torch.Tensor:
    """Strided view (n, C, kh, kw, Ho, Wo) of the patches of a padded 4-D input (no copy):
    ``[i, c, u, v, y, x] = xp[i, c, y s_h + u d_h, x s_w + v d_w]``."""
    s = xp.stride()
    return xp.as_strided((xp.shape[0], xp.shape[1], ks[0], ks[1], out_hw[0], out_hw[1]),
                         (s[0], s[1], s[2] * dl[0], s[3] * dl[1], s[2] * st[0], s[3] * st[1]))


def _weight_grads(xs: torch.Tensor, Dj: torch.Tensor, geom, dst: torch.Tensor, accumulate: bool,
                  scratch: "Scratch") -> None:
    """dst (b, k q, C kh kw) (+)= Dj (b, k q, T) @ patches (b, T, C kh kw): the patches copied into the scratch
    buffer (parameter order (c, u, v)), then one batched matmul straight into dst."""
    ks, st, dl, out_hw = geom
    view = _patches(xs, ks, st, dl, out_hw)
    cols = scratch.take(tuple(view.shape), xs)
    cols.copy_(view)
    A = cols.view(xs.shape[0], -1, out_hw[0] * out_hw[1]).transpose(1, 2)
    if accumulate:
        dst.baddbmm_(Dj, A)
    else:
        torch.bmm(Dj, A, out=dst)


def conv_grads(m: nn.Module, x: torch.Tensor, D: torch.Tensor, names: List[str],
               out: Optional[List[torch.Tensor]] = None, accumulate: bool = False,
               scratch: Optional[Scratch] = None) -> List[torch.Tensor]:
    """Materialised per-sample gradients (n, k, q (p [+1])) of a Conv1d/Conv2d, one tensor per group.

    dW[i, c', o, (c, u, v)] = sum_t D[i, c', o, t] patch[i, (c, u, v), t] (patch: the padded input at output
    position t, offset (u, v)), i.e. G_i = D_i A_i^T with A_i the unfolded input; the bias column is
    sum_t D[i, c', o, t].  Per group and block of points the patches are copied into one reused buffer
    (``scratch``) and multiplied by one batched matmul written straight into ``out`` (the rows of the
    preallocated feature tensors; new tensors when None), accumulated into it when ``accumulate`` (a module
    called several times).  Same numbers as ``token_pieces`` followed by sum_t D_t A_t^T.
    """
    scratch = scratch if scratch is not None else Scratch()
    two_d, xp, ks, st, dl = _conv_geometry(m, x, scratch)
    n, k, g = D.shape[0], D.shape[1], m.groups
    out_hw = (D.shape[-2], D.shape[-1]) if two_d else (1, D.shape[-1])
    T = out_hw[0] * out_hw[1]
    cin_g, cout_g = m.in_channels // g, m.out_channels // g
    pw = cin_g * ks[0] * ks[1] if "weight" in names else 0
    wide = pw + ("bias" in names)
    Dr = D.reshape(n, k, m.out_channels, T)
    if out is None:
        out = [D.new_empty(n, k, cout_g * wide) for _ in range(g)]
        accumulate = False
    step = max(1, min(n, PATCH_BYTES // max(1, pw * T * D.element_size())))
    geom = (ks, st, dl, out_hw)
    for j in range(g):
        dst = out[j].view(n, k * cout_g, wide)
        for a in range(0, n, step):
            b = min(n, a + step)
            Dj = Dr[a:b, :, j * cout_g:(j + 1) * cout_g].reshape(b - a, k * cout_g, T)
            if pw:
                _weight_grads(xp[a:b, j * cin_g:(j + 1) * cin_g], Dj, geom, dst[a:b, :, :pw], accumulate, scratch)
            if "bias" in names:
                bias = dst[a:b, :, pw]
                bias.add_(Dj.sum(2)) if accumulate else bias.copy_(Dj.sum(2))
    return out


def _embedding(m: nn.Embedding, x: torch.Tensor, D: torch.Tensor, names: List[str]) -> List[Piece]:
    n, k = D.shape[0], D.shape[1]
    idx = x.reshape(n, -1)
    A = F.one_hot(idx, m.num_embeddings).to(D.dtype)
    if m.padding_idx is not None:
        A[..., m.padding_idx] = 0                       # no gradient flows to the padding row
    return [(A, D.reshape(n, k, idx.shape[1], m.embedding_dim))]


def token_pieces(m: nn.Module, x: torch.Tensor, D: torch.Tensor, names: List[str]) -> List[Piece]:
    """Token pieces of one call of a Linear / Conv1d / Conv2d / Embedding (see the module docstring)."""
    if isinstance(m, nn.Linear):
        return _linear(m, x, D, names)
    if isinstance(m, nn.Embedding):
        return _embedding(m, x, D, names)
    return _conv(m, x, D, names)


def _normalised(m: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, ...]]:
    """(xhat, shape of the affine parameters broadcast against x)."""
    if isinstance(m, nn.LayerNorm):
        xhat = F.layer_norm(x, m.normalized_shape, None, None, m.eps)
        return xhat, tuple(m.normalized_shape)
    if isinstance(m, nn.GroupNorm):
        xhat = F.group_norm(x, m.num_groups, None, None, m.eps)
    else:
        xhat = F.batch_norm(x, m.running_mean, m.running_var, None, None, False, 0.0, m.eps)
    return xhat, (x.shape[1],) + (1,) * (x.dim() - 2)


def norm_grads(m: nn.Module, x: torch.Tensor, D: torch.Tensor, names: List[str]) -> torch.Tensor:
    """Materialised per-sample gradients (n, k, P) of a norm layer's trainable affine parameters."""
    n, k = D.shape[0], D.shape[1]
    xhat, pshape = _normalised(m, x)
    P = 1
    for s in pshape:
        P *= s
    if isinstance(m, nn.LayerNorm):          # parameters on the trailing dims
        Dr = D.reshape(n, k, -1, P)
        parts = {"weight": lambda: (Dr * xhat.reshape(n, 1, -1, P)).sum(2), "bias": lambda: Dr.sum(2)}
    else:                                     # one parameter per channel (dim 1 of x)
        C = x.shape[1]
        Dr = D.reshape(n, k, C, -1)
        parts = {"weight": lambda: (Dr * xhat.reshape(n, 1, C, -1)).sum(3), "bias": lambda: Dr.sum(3)}
    return torch.cat([parts[nm]() for nm in names], dim=2)
