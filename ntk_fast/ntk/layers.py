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

from typing import List, Optional, Tuple

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


def _conv_geometry(m: nn.Module, x: torch.Tensor):
    """(two_d, padded input as 4-D, kernel size, stride, dilation) of a Conv1d/Conv2d, Conv1d as a 1 x k Conv2d;
    padding of any mode (and 'same') applied with the module's own amounts."""
    two_d = isinstance(m, nn.Conv2d)
    mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
    xp = F.pad(x, m._reversed_padding_repeated_twice, mode=mode)
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


def conv_grads(m: nn.Module, x: torch.Tensor, D: torch.Tensor, names: List[str]) -> List[torch.Tensor]:
    """Materialised per-sample gradients (n, k, q (p [+1])) of a Conv1d/Conv2d, one tensor per group.

    dW[i, o, c, u, v] = sum_{y, x} D[i, o, y, x] xp[i, c, y s + u d, x s + v d] is itself a convolution of the
    padded input (channels as batch, points as groups) with D as the filter, stride d and dilation s (the
    roles of the original stride s and dilation d swap); the bias part is sum_{y, x} D.  Same numbers as
    ``token_pieces`` followed by sum_t D_t A_t^T, without the unfolded patches (several times faster on CPU).
    """
    two_d, xp, ks, st, dl = _conv_geometry(m, x)
    n, k, g = D.shape[0], D.shape[1], m.groups
    Dr = D.reshape(n, k, m.out_channels, -1)
    out_hw = (D.shape[-2], D.shape[-1]) if two_d else (1, D.shape[-1])
    cin_g, cout_g = m.in_channels // g, m.out_channels // g
    res = []
    for j in range(g):
        Dj = Dr[:, :, j * cout_g:(j + 1) * cout_g]                          # (n, k, q, T)
        parts = []
        if "weight" in names:
            inp = xp[:, j * cin_g:(j + 1) * cin_g].transpose(0, 1)          # (cin_g, n, Hp, Wp)
            w = Dj.reshape(n * k * cout_g, 1, *out_hw)
            gw = F.conv2d(inp, w, stride=dl, dilation=st, groups=n)[:, :, :ks[0], :ks[1]]
            gw = gw.reshape(cin_g, n, k, cout_g, ks[0] * ks[1]).permute(1, 2, 3, 0, 4)
            parts.append(gw.reshape(n, k, cout_g, cin_g * ks[0] * ks[1]))
        if "bias" in names:
            parts.append(Dj.sum(3, keepdim=True))
        res.append((parts[0] if len(parts) == 1 else torch.cat(parts, dim=3)).flatten(2))
    return res


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
