"""empirical_ntk(): the empirical NTK Gram matrix of a model at its current weights.

    Theta(x, x')[c, c'] = sum_p d f_c(x)/d w_p  d f_c'(x')/d w_p        (p over parameters that require grad)

Two paths:

* **structured** (``FCNet`` and any ``nn.Sequential`` of ``nn.Linear`` and elementwise activations):
  per-layer features from one forward and k backward passes, then the fused op
  ``Theta = sum_l (D_l D_l'^T) o (A_l A_l'^T)`` (docs/design.md section 2).  Cost
  2 n1 n2 sum_l (fan_in_l + fan_out_l) flops (half when x2 is None), about h/4 times fewer than a
  Jacobian contraction, and memory for the features plus the output only.
* **any model** (anymodel.py, issue 13): per-layer features of Linear (also on tokens), Conv1d/Conv2d,
  Embedding and norm-layer affines captured by hooks, torch.func for every other parameter; formula per
  layer by flop count (``ntk_fast.ntk_plan`` shows it).  Full mode with k > 1 of the FC models above uses its
  shared-A assembly too.
* **jacobian** (any module, ``method="jacobian"`` or nothing hookable): per-sample Jacobians by ``torch.func`` (vmap of jacrev) in row blocks of
  ``block_size`` points, contracted block by block; memory about 2 block_size k P elements.

Modes: ``"full"`` gives (n1, n2) for one output and (n1, n2, k, k) for k > 1; ``"trace"`` gives
sum_c Theta[., ., c, c] as (n1, n2); ``"diagonal"`` gives the trace kernel's diagonal Theta(x_i, x_i) as (n1,)
(x2 must be None).
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple, Union

import torch
from torch import nn

from ntk_fast.models.fc import FCNet
from ntk_fast.ntk.padding import pad_features
from ntk_fast.ntk.panels import mirror_in_place, row_panels
from ntk_fast.ntk.stream import gram_streamed
from ntk_fast.ops import gram as _ops
from ntk_fast.ops.reference import per_sample_jacobian
from ntk_fast.progress import progress_bar
from ntk_fast.guards.estimates import NTK_WAY_OUT, empirical_ntk_bytes
from ntk_fast.guards.memory import require_memory
from ntk_fast.ntk import anymodel as _any
from ntk_fast.ntk.anymodel import Factored, as_dense
from ntk_fast.ntk import capture as _capture

ELEMENTWISE = (nn.ReLU, nn.Softplus, nn.Tanh, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Identity, nn.LeakyReLU, nn.ELU)
MODES = ("full", "trace", "diagonal")
METHODS = ("auto", "structured", "jacobian")


# ---------------------------------------------------------------------------------------------- features

def _flattens_all(m: nn.Module) -> bool:
    """An nn.Flatten of every dimension after the points' (the identity on (n, p) inputs)."""
    return isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1


def supports_structured(model: nn.Module) -> bool:
    """True for FCNet and for nn.Sequential made only of nn.Linear, elementwise activations and nn.Flatten()."""
    if isinstance(model, FCNet):
        return True
    if isinstance(model, nn.Sequential) and len(model) > 0:
        has_linear = False
        for m in model:
            if isinstance(m, nn.Linear):
                has_linear = True
            elif not isinstance(m, ELEMENTWISE) and not _flattens_all(m):
                return False
        return has_linear
    return False


def structured_input(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether the structured fast path takes this model on x: a supported model (``supports_structured``) on
    (n, p) points, or on (n, ...) points when the Sequential starts with nn.Flatten()."""
    if not supports_structured(model):
        return False
    return x.dim() == 2 or (x.dim() > 2 and isinstance(model, nn.Sequential) and _flattens_all(model[0]))


def _sequential_features(model: nn.Sequential, x: torch.Tensor, factored: bool = False
                         ) -> Tuple[List[torch.Tensor], List[Union[torch.Tensor, Factored]], int]:
    """Features (A, D) of a Sequential of Linear + elementwise layers, D as (n, k, fan_out).

    For a Linear layer y = x W^T + b: df_c/dW = delta_c x^T and df_c/db = delta_c, delta_c = df_c/dy.  Points do
    not interact, so all k outputs are back-propagated at once as (n, k, width) signals, seeded with the unit
    vectors at the output:

        elementwise sigma on input u:   G <- G o sigma'(u)     (sigma'(u): autograd of sum sigma(u), in the forward)
        Linear W (frozen or not):       delta = G (recorded when W or b requires grad);  G <- G W

    Cost: one forward pass (with an elementwise backward per activation) and one (n k x out) @ (out x in)
    product per Linear below the output.  A_l is the layer input when W requires grad, with a column of ones appended
    when b requires grad.

    Below the last Linear (the readout, W_o (k, q), nothing after it) the signal is G[i, c] = s_i o W_o[c] with s
    the product of the slopes in between: with ``factored`` the next Linear's D is returned as that
    ``Factored(s, W_o)`` (its k x k blocks are symmetric: the gram_full op forms k(k+1)/2 of them).
    """
    saved: List[Optional[torch.Tensor]] = []   # per module: a Linear's input u, an activation's slope sigma'(u)
    h = x.detach()
    for m in model:
        if isinstance(m, nn.Flatten):             # (n, ...) -> (n, p); the identity on (n, p)
            saved.append(None)
            h = h.flatten(1)
            continue
        if isinstance(m, nn.Linear):
            saved.append(h)
            with torch.no_grad():
                h = m(h)
            continue
        with torch.enable_grad():
            u = h.detach().requires_grad_(True)
            y = m(u.clone() if getattr(m, "inplace", False) else u)
            saved.append(torch.autograd.grad(y.sum(), u)[0])
        h = y.detach()
    out = h.unsqueeze(1) if h.dim() == 1 else h.reshape(h.shape[0], -1)
    n, k = out.shape
    trains = [isinstance(m, nn.Linear) and (m.weight.requires_grad or (m.bias is not None and m.bias.requires_grad))
              for m in model]
    if not any(trains):
        raise ValueError("empirical_ntk: the model has no parameters that require grad")
    lowest = trains.index(True)
    G: Union[torch.Tensor, Factored] = torch.eye(k, dtype=out.dtype, device=out.device).expand(n, k, k)
    readout = True      # G is still the unit vectors: the next Linear is the readout
    A, D = [], []
    for idx in range(len(model) - 1, lowest - 1, -1):
        m = model[idx]
        if isinstance(m, nn.Flatten):
            continue
        if not isinstance(m, nn.Linear):
            slope = saved[idx]
            G = Factored(G.s * slope, G.w) if isinstance(G, Factored) else G * slope.unsqueeze(1)
            readout = False
            continue
        if trains[idx]:
            u = saved[idx]
            D.append(G if factored and isinstance(G, Factored) else as_dense(G).contiguous())
            cols = ([u] if m.weight.requires_grad else []) + (
                [torch.ones(n, 1, dtype=x.dtype, device=x.device)] if m.bias is not None and m.bias.requires_grad
                else [])
            A.append(torch.cat(cols, dim=1) if len(cols) > 1 else cols[0])
        if idx > lowest:
            W = m.weight.detach()
            if readout:
                G = Factored(torch.ones(n, W.shape[1], dtype=W.dtype, device=W.device), W)
            else:
                G = as_dense(G) @ W
            readout = False
    return A[::-1], D[::-1], k


def _fcnet_features(model: FCNet, x: torch.Tensor, factored: bool = False
                    ) -> Tuple[List[torch.Tensor], List[Union[torch.Tensor, Factored]], int]:
    """FCNet features restricted to the parameters that require grad, D as (n, k, fan_out); with ``factored``
    and k > 1 the last hidden layer's D as Factored(s, W(L)) (see _sequential_features)."""
    k = model.k
    if factored and k > 1:
        A, D, s = model.features(x, last_slopes=True)
        D[-2] = Factored(s, model.weights[-1].detach())
    else:
        A, D = model.features(x)
    if k == 1:
        D = [d.unsqueeze(1) for d in D]
    keepA, keepD = [], []
    for l, (a, d) in enumerate(zip(A, D)):
        w_grad = model.weights[l].requires_grad
        b_grad = model.biases is not None and model.biases[l].requires_grad
        if w_grad and (b_grad or model.biases is None):
            keepA.append(a)
        elif w_grad:   # bias exists but is frozen: drop the constant column
            keepA.append(a[:, :-1])
        elif b_grad:
            keepA.append(a[:, -1:])
        else:
            continue
        keepD.append(d)
    if not keepA:
        raise ValueError("empirical_ntk: the model has no parameters that require grad")
    return keepA, keepD, k


def structured_features(model: nn.Module, x: torch.Tensor, block_size: Optional[int] = None,
                        factored: bool = False) -> Tuple[List[torch.Tensor], List[torch.Tensor], int]:
    """Per-layer features (A_l (n, p_l), D_l (n, k, q_l)) of a structured model, computed in row blocks.

    factored: a Sequential's layer below its linear readout may come as ``Factored(s, w)`` (D = s o w)."""
    feats = _fcnet_features if isinstance(model, FCNet) else _sequential_features
    fn = lambda m, xb: feats(m, xb, factored)     # noqa: E731
    n = x.shape[0]
    bs = n if block_size is None else max(1, block_size)
    if bs >= n:
        return fn(model, x)
    parts = [fn(model, x[i:i + bs]) for i in range(0, n, bs)]
    cat = lambda ds: (Factored(torch.cat([d.s for d in ds]), ds[0].w) if isinstance(ds[0], Factored)   # noqa: E731
                      else torch.cat(ds))
    A = [torch.cat([p[0][l] for p in parts]) for l in range(len(parts[0][0]))]
    D = [cat([p[1][l] for p in parts]) for l in range(len(parts[0][1]))]
    return A, D, parts[0][2]


# ---------------------------------------------------------------------------------------------- checks

def _model_params(model: nn.Module) -> List[torch.Tensor]:
    if not isinstance(model, nn.Module):
        raise ValueError(f"empirical_ntk: model must be a torch.nn.Module, got {type(model).__name__}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("empirical_ntk: the model has no parameters that require grad "
                         "(the NTK is taken over the parameters with requires_grad=True)")
    return params


def _check_x(name: str, x, ref: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"empirical_ntk: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError(f"empirical_ntk: {name} must have a leading batch dimension, got shape {tuple(x.shape)}")
    if x.is_floating_point() and x.dtype != ref.dtype:     # integer inputs (token ids) are allowed
        raise ValueError(f"empirical_ntk: {name} has dtype {x.dtype} but the model's parameters are {ref.dtype}")
    if x.device != ref.device:
        raise ValueError(f"empirical_ntk: {name} is on {x.device} but the model's parameters are on {ref.device}")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"empirical_ntk: {name} contains NaN or inf")


# ---------------------------------------------------------------------------------------------- jacobian path

def _jacobian_blocks(model: nn.Module, x: torch.Tensor, block: int):
    for i in range(0, x.shape[0], block):
        yield i, per_sample_jacobian(model, x[i:i + block])


def _jacobian_ntk(model: nn.Module, x1: torch.Tensor, x2: Optional[torch.Tensor], mode: str,
                  block_size: Optional[int], out: Optional[torch.Tensor], progress: bool) -> torch.Tensor:
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        k = model(x1[:1]).reshape(1, -1).shape[1]
    esize = x1.element_size()
    if block_size is None:   # two Jacobian blocks of about 256 MB each
        block_size = max(1, min(x1.shape[0], int(256e6 // max(1, k * n_params * esize))))
    n1 = x1.shape[0]
    if mode == "diagonal":
        res = torch.empty(n1, dtype=x1.dtype, device=x1.device) if out is None else out
        for i, j in _jacobian_blocks(model, x1, block_size):
            res[i:i + j.shape[0]] = (j * j).sum(dim=(1, 2))
        return res
    sym = x2 is None
    xb = x1 if sym else x2
    n2 = xb.shape[0]
    full = mode == "full" and k > 1
    shape = (n1, n2, k, k) if full else (n1, n2)
    res = out if out is not None else torch.empty(shape, dtype=x1.dtype, device=x1.device)
    panels = row_panels(n1, block_size, sym)
    bar = progress_bar(progress, total=len(panels), desc="ntk (jacobian)", unit="panel")
    for p in panels:
        ji = per_sample_jacobian(model, x1[p.r0:p.r1])
        for c in row_panels(n2, block_size, False):
            if c.r1 <= p.c0:
                continue    # left of the panel (symmetric: the lower part, mirrored below)
            jj = per_sample_jacobian(model, xb[c.r0:c.r1])
            blk = torch.einsum("icp,jdp->ijcd", ji, jj)
            blk = blk if full else torch.diagonal(blk, dim1=2, dim2=3).sum(-1)
            res[p.r0:p.r1, c.r0:c.r1] = blk
            if sym and c.r0 > p.r0:
                res[c.r0:c.r1, p.r0:p.r1] = blk.transpose(0, 1).transpose(2, 3) if full else blk.transpose(0, 1)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return res


# ---------------------------------------------------------------------------------------------- structured path

def _structured_ntk(model: nn.Module, x1: torch.Tensor, x2: Optional[torch.Tensor], mode: str,
                    block_size: Optional[int], out: Optional[torch.Tensor], progress: bool,
                    precision: str) -> torch.Tensor:
    A1, D1, k = structured_features(model, x1, block_size)
    n1 = x1.shape[0]
    if mode == "diagonal":
        diag = sum((d * d).sum(dim=(1, 2)) * (a * a).sum(dim=1) for a, d in zip(A1, D1))
        if out is not None:
            out.copy_(diag)
            return out
        return diag
    sym = x2 is None
    if sym:
        A2, D2 = A1, D1
    else:
        A2, D2, _ = structured_features(model, x2, block_size)
    n2 = A2[0].shape[0]
    D1 = [d.reshape(n1, -1) for d in D1]           # trace (or k = 1): sum over outputs of D Grams
    D2 = D1 if sym else [d.reshape(n2, -1) for d in D2]
    target = out if out is not None else torch.empty((n1, n2), dtype=x1.dtype, device=x1.device)
    if target.device != A1[0].device:   # GPU features, host (or memory-mapped) result: streamed panels
        gram_streamed(A1, D1, None if sym else A2, None if sym else D2, out=target, panel_rows=block_size,
                      precision=precision, progress=progress)
    elif block_size is None and not progress:
        _ops.gram(A1, D1, None if sym else A2, None if sym else D2, out=target, precision=precision)
    else:
        _panels(A1, D1, A2, D2, sym, target, block_size or 1024, progress, precision)
    return target


def _panels(A1, D1, A2, D2, sym: bool, out: torch.Tensor, panel: int, progress, precision: str) -> None:
    """Row panels of the Gram written into out one after another (each panel is one op call;
    ntk_fast.ntk.panels: the strictly lower blocks of a symmetric Gram are mirrored, never computed)."""
    # Pad once (CUDA features whose width is not a multiple of 16 bytes), not in every op call on a panel.
    A1, D1 = pad_features(A1), pad_features(D1)
    A2, D2 = (A1, D1) if sym else (pad_features(A2), pad_features(D2))
    panels = row_panels(A1[0].shape[0], panel, sym)
    bar = progress_bar(progress, total=len(panels), desc="ntk", unit="panel")
    for p in panels:
        a1 = [a[p.r0:p.r1] for a in A1]
        d1 = [d[p.r0:p.r1] for d in D1]
        _ops.gram(a1, d1, [a[p.c0:] for a in A2], [d[p.c0:] for d in D2], out=out[p.r0:p.r1, p.c0:],
                  precision=precision)
        if sym:
            mirror_in_place(out, p)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()


# ---------------------------------------------------------------------------------------------- public API

def _outputs_per_point(model: nn.Module, x1: torch.Tensor, x2: Optional[torch.Tensor]) -> int:
    """k, the model's outputs per point, from one forward pass on one point (a zero point for empty inputs);
    a clear error when the model cannot take x1's points or does not return one tensor."""
    with torch.no_grad():
        probe = x1[:1] if x1.shape[0] > 0 else (x2[:1] if x2 is not None and x2.shape[0] > 0 else
                                                 torch.zeros((1,) + tuple(x1.shape[1:]), dtype=x1.dtype,
                                                             device=x1.device))
        try:
            y_probe = model(probe)
        except (RuntimeError, ValueError, IndexError, TypeError) as exc:
            raise ValueError(f"empirical_ntk: the model cannot be applied to x1 of per-point shape "
                             f"{tuple(x1.shape[1:])} ({type(exc).__name__}: {exc})") from exc
    if not isinstance(y_probe, torch.Tensor):
        raise ValueError(f"empirical_ntk: the model must return one tensor (n, ...) of outputs, got "
                         f"{type(y_probe).__name__}")
    return y_probe.reshape(1, -1).shape[1]


def empirical_ntk(model: nn.Module, x1: torch.Tensor, x2: Optional[torch.Tensor] = None, *, mode: str = "full",
                  method: str = "auto", block_size: Optional[int] = None,
                  out: Optional[Union[torch.Tensor, str, os.PathLike]] = None,
                  progress: Optional[bool] = None, precision: str = "highest",
                  check: bool = False) -> torch.Tensor:
    """Empirical NTK Gram of ``model`` between x1 (n1, ...) and x2 (n2, ...) (x2=None: x1 with itself).

    Args:
        mode: "full" -> (n1, n2) for one output, (n1, n2, k, k) for k outputs; "trace" -> (n1, n2);
            "diagonal" -> (n1,) (trace over outputs; x2 must be None).
        method: "structured" (FCNet, Sequential of Linear + elementwise), "jacobian" (torch.func, any module),
            "auto" (structured when supported).
        block_size: structured path: rows per panel written to ``out`` (and per feature batch);
            jacobian path: points per Jacobian block (default: about 256 MB per block).
        out: preallocated result of the right shape and dtype (may wrap a numpy memmap: the Gram is
            written panel by panel and may exceed RAM when block_size is given); or a path ending in
            ``.npy``: the Gram is written tile by tile into that file, across the ranks of a torch.distributed
            process group when one is initialised, resumable after a kill (block_size = tile rows;
            :func:`ntk_fast.distributed.gram_to_disk`, docs/distributed.md).
        progress: tqdm bar over panels (None: only when stderr is a terminal).  precision: "highest" or "tf32" (CUDA, float32 only).
        check: also check the result (opt-in; one pass over it): finite, symmetric when x2 is None, and a
            non-negative diagonal (ntk_fast.guards.psd.check_ntk_result); ValueError otherwise.

    Before allocating, the bytes of the result (when ``out`` is None), the features and the temporaries are
    estimated (ntk_fast.guards.estimates) and compared with the free memory of the device; too many raise
    ntk_fast.guards.MemoryBudgetError (a MemoryError) naming both numbers and the ways out (``out=`` a memmap
    with ``block_size``, mode="trace", the distributed Gram).

    The NTK is taken at the model's current weights over every parameter with requires_grad=True.
    The cost of the structured path is 2 n1 n2 sum_l (fan_in_l + kk fan_out_l) flops (x2 given) or half
    of it (x2 None), kk = k in mode "trace" and k^2 in mode "full" (on the CPU the readout of a Sequential
    costs fan_in only and the Linear below it fan_in + fan_out (k(k+1)/2 + 1), k(k+1)/2 rounded up to 8, when
    k >= 5: ``ntk_plan`` lists it per layer); the jacobian path costs 2 n1 n2 k^2 P plus the Jacobians.
    """
    if mode not in MODES:
        raise ValueError(f"empirical_ntk: mode must be one of {MODES}, got {mode!r}")
    if method not in METHODS:
        raise ValueError(f"empirical_ntk: method must be one of {METHODS}, got {method!r}")
    if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"empirical_ntk: block_size must be a positive int or None, got {block_size!r}")
    if isinstance(out, (str, os.PathLike)):   # on-disk Gram, tiles across torch.distributed ranks
        from ntk_fast.distributed import gram_to_disk
        _check_x("x1", x1, _model_params(model)[0])
        if x2 is not None:
            _check_x("x2", x2, x1)
        res = gram_to_disk(model, x1, out, x2, mode=mode, method=method, tile=block_size, progress=progress,
                           precision=precision)
        if check:
            from ntk_fast.guards.psd import check_ntk_result
            check_ntk_result(res, x2 is None, mode)
        return res
    params = _model_params(model)
    _check_x("x1", x1, params[0])
    if x2 is not None:
        _check_x("x2", x2, params[0])
        if x2.shape[1:] != x1.shape[1:]:
            raise ValueError(f"empirical_ntk: x2 has per-point shape {tuple(x2.shape[1:])}, "
                             f"expected {tuple(x1.shape[1:])} like x1")
    if mode == "diagonal" and x2 is not None:
        raise ValueError("empirical_ntk: mode='diagonal' takes no x2")
    _capture.check_modes(model)
    if isinstance(model, FCNet) and x1.dim() != 2:
        raise ValueError(f"empirical_ntk: x1 must be 2-D (n, d) for an FCNet, got {tuple(x1.shape)}")
    use_structured = method != "jacobian" and structured_input(model, x1)
    k = _outputs_per_point(model, x1, x2)
    n1 = x1.shape[0]
    n2 = n1 if x2 is None else x2.shape[0]
    expected = (n1,) if mode == "diagonal" else ((n1, n2, k, k) if (mode == "full" and k > 1) else (n1, n2))
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"empirical_ntk: out must be a torch.Tensor of shape {expected} (wrap a numpy "
                             f"array or memmap with torch.from_numpy) or a path ending in .npy, got "
                             f"{type(out).__name__}")
        if tuple(out.shape) != expected:
            raise ValueError(f"empirical_ntk: out must have shape {expected}, got {tuple(out.shape)}")
        if out.dtype != x1.dtype:
            raise ValueError(f"empirical_ntk: out has dtype {out.dtype}, expected {x1.dtype}")
    if n1 == 0 or n2 == 0:
        return out if out is not None else torch.empty(expected, dtype=x1.dtype, device=x1.device)
    need = empirical_ntk_bytes(model, n1, None if x2 is None else n2, k, mode, use_structured, block_size,
                               out is not None, x1.element_size(),
                               out_elsewhere=out is not None and out.device != x1.device)
    require_memory(need, f"empirical_ntk: the {mode} Gram of shape {expected} ({x1.dtype}) with its features",
                   x1.device, NTK_WAY_OUT)
    res = _dispatch(model, x1, x2, mode, method, k, use_structured, block_size, out, progress, precision)
    if check:
        from ntk_fast.guards.psd import check_ntk_result
        check_ntk_result(res, x2 is None, mode)
    return res


def _dispatch(model, x1, x2, mode, method, k, use_structured, block_size, out, progress, precision):
    """The path of empirical_ntk: FC fast path, any-model hooks, or blocked torch.func Jacobians."""
    if use_structured and mode == "full" and k > 1:    # A products shared across output pairs (anymodel.py)
        A1, D1, _ = structured_features(model, x1, block_size, factored=True)
        P2 = None if x2 is None else _any.fc_pieces(*structured_features(model, x2, block_size, factored=True)[:2])
        return _any.assemble(_any.fc_pieces(A1, D1), P2, k, mode, out, block_size, progress, precision)
    if use_structured:
        return _structured_ntk(model, x1, x2, mode, block_size, out, progress, precision)
    if method == "jacobian" or (method == "auto" and all_func(model, x1)):
        return _jacobian_ntk(model, x1, x2, mode, block_size, out, progress)
    return _any.any_model_ntk(model, x1, x2, mode, method, block_size, out, progress, precision)


def all_func(model: nn.Module, x1: torch.Tensor) -> bool:
    """True when no trainable parameter can be captured by hooks (then the blocked torch.func path is used)."""
    return not _capture.static_route(model)[0]


def gram_flops(fans: List[Tuple[int, int]], n1: int, n2: Optional[int] = None) -> float:
    """Flops of the structured Gram: 2 n1 n2 sum_l (p_l + q_l), or n^2 sum_l (p_l + q_l) when symmetric."""
    s = sum(p + q for p, q in fans)
    return float(n1) * n1 * s if n2 is None else 2.0 * n1 * n2 * s


def fcnet_fans(d: int, h: int, L: int, k: int = 1) -> List[Tuple[int, int]]:
    """(fan_in, fan_out) of each weight matrix of FCNet(d, h, L, k)."""
    return [(d, h)] + [(h, h)] * (L - 1) + [(h, k)]

