"""Capture of per-layer NTK features of any nn.Module: routing, forward hooks, output signals, torch.func rest.

Every parameter with requires_grad=True is routed to exactly one of two places:

* **hooks**: the parameter is the ``weight``/``bias`` of a module of a supported kind (``layers.reject`` is
  None) and belongs to no other module.  One forward pass records each call's input x and the gradient
  edge of its output y; k backward passes (one per output c, of sum_i f_c(x_i)) give
  D[:, c] = d f_c / d y at every call.  A module called several times gets one record per call: its
  per-sample gradient is the sum over calls, i.e. the calls' tokens are concatenated.
* **torch.func**: everything else (unsupported kinds, parameters tied across modules, parameters of a
  module that is never called or is called on something other than the batch, or whose hook features
  fail the check below).  Their per-sample Jacobians (n, k, P_func) come from vmap(jacrev).

The check (``verify``): on 2 points, each hooked module's (2 x 2) Gram from its hook features must equal
the Gram of its true per-point gradients (autograd on one point at a time).  This catches parameters also
used outside their module's call (e.g. ``F.linear(x, self.fc.weight)`` in a custom forward) and models that
mix points within a batch.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge

from ntk_fast.ntk import layers

Features = Dict[str, object]   # module name -> list of (A, D) per group, or G (n, k, P)


# ---------------------------------------------------------------------------------------------- modes

def check_modes(model: nn.Module) -> None:
    """Errors for layers whose per-sample gradient the model alone does not define (train-mode BN, dropout)."""
    for name, m in model.named_modules():
        label = f"'{name or '<root>'}' ({type(m).__name__})"
        if isinstance(m, layers.BATCHNORMS) and (m.training or m.running_mean is None):
            raise ValueError(f"empirical_ntk: BatchNorm module {label} uses batch statistics (train mode or "
                             "track_running_stats=False), so a point's gradient depends on the other points; "
                             "call model.eval() first")
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            raise ValueError(f"empirical_ntk: dropout module {label} is in train mode with p={m.p}: the NTK of a "
                             "random function is not defined; call model.eval() first")
        if isinstance(m, nn.MultiheadAttention) and m.training and m.dropout > 0:
            raise ValueError(f"empirical_ntk: attention module {label} has dropout={m.dropout} in train mode; "
                             "call model.eval() first")


# ---------------------------------------------------------------------------------------------- routing

def trainable_names(model: nn.Module) -> List[str]:
    names = [nm for nm, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise ValueError("empirical_ntk: the model has no parameters that require grad "
                         "(the NTK is taken over the parameters with requires_grad=True)")
    return names


def static_route(model: nn.Module) -> Tuple["OrderedDict[str, nn.Module]", Dict[str, str]]:
    """(hooked modules by name, {parameter name: reason} for the parameters sent to torch.func)."""
    owners: Dict[int, List[Tuple[str, nn.Module, str]]] = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        for local, p in m.named_parameters(recurse=False):
            if p.requires_grad:
                owners.setdefault(id(p), []).append((mname, m, local))
    canonical = {id(p): nm for nm, p in model.named_parameters() if p.requires_grad}
    hooked: "OrderedDict[str, nn.Module]" = OrderedDict()
    func: Dict[str, str] = {}
    seen_mod: Dict[int, str] = {}
    for pid, own in owners.items():
        pname = canonical[pid]
        mods = {id(m) for _, m, _ in own}
        locals_ = {loc for _, _, loc in own}
        if len(mods) > 1 or len(locals_) > 1:
            func[pname] = "tied to another module's parameter"
            continue
        mname, m, local = own[0]
        why = layers.reject(m) or (None if local in ("weight", "bias") else f"parameter '{local}'")
        if why is not None:
            func[pname] = why
            continue
        if id(m) not in seen_mod:
            seen_mod[id(m)] = mname
            hooked[mname] = m
    func_ids = {id(p) for nm, p in model.named_parameters() if nm in func}
    for mname in list(hooked):       # a module whose weight is tied elsewhere goes to torch.func whole
        m = hooked[mname]
        if any(id(getattr(m, pn)) in func_ids for pn in layers.trainable(m)):
            del hooked[mname]
            for pn in layers.trainable(m):
                cname = canonical[id(getattr(m, pn))]
                func.setdefault(cname, "shares its module with a parameter sent to torch.func")
    return hooked, func


def module_params(m: nn.Module, hooked_name: str) -> List[str]:
    return [f"{hooked_name}.{nm}" if hooked_name else nm for nm in layers.trainable(m)]


# ---------------------------------------------------------------------------------------------- hooks

def _forward_with_probes(model: nn.Module, x: torch.Tensor, hooked: "OrderedDict[str, nn.Module]"):
    """One forward pass; returns (out (n, k), {name: [(input, target, (shape, dtype, device) of y), ...]},
    {name: reason} of bad calls).  The target of a call is the gradient edge of its output y, taken in the hook
    (a later in-place change of y, such as ReLU(inplace=True), makes a new edge and leaves this one), or a zero
    probe added to y when y does not require grad."""
    n = x.shape[0]
    calls: Dict[str, list] = {nm: [] for nm in hooked}
    bad: Dict[str, str] = {}

    def make(name):
        def hook(mod, args, output):
            xin = args[0] if args else None
            if not (isinstance(xin, torch.Tensor) and isinstance(output, torch.Tensor) and xin.dim() >= 1
                    and output.dim() >= 1 and xin.shape[0] == n and output.shape[0] == n):
                bad[name] = "called on something whose first dimension is not the batch"
                return None
            spec = (output.shape, output.dtype, output.device)
            if output.requires_grad:      # read D at y's gradient edge: no probe tensor, no extra add
                calls[name].append((xin.detach(), get_gradient_edge(output), spec))
                return None
            probe = torch.zeros_like(output, requires_grad=True)
            calls[name].append((xin.detach(), probe, spec))
            return output + probe
        return hook

    handles = [m.register_forward_hook(make(nm)) for nm, m in hooked.items()]
    try:
        with torch.enable_grad():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"empirical_ntk: the model must return a tensor, got {type(out).__name__}")
    if out.dim() == 0 or out.shape[0] != n:
        raise ValueError(f"empirical_ntk: the model's output has shape {tuple(out.shape)}; expected the batch "
                         f"({n} points) first")
    for nm, c in calls.items():
        if not c and nm not in bad:
            bad[nm] = "never called by forward (parameters used directly)"
    return out.reshape(n, -1), calls, bad


def hook_features(model: nn.Module, x: torch.Tensor, hooked: "OrderedDict[str, nn.Module]",
                  direct: Optional[set] = None, dest: Optional[Dict[str, List[torch.Tensor]]] = None,
                  scratch: Optional[layers.Scratch] = None) -> Tuple[int, Features, Dict[str, str]]:
    """(k, features by module name, {module name: reason} of modules the hooks could not capture).

    Convolutions named in ``direct`` give their per-sample gradients per group (``layers.conv_grads``,
    summed over calls) instead of token pieces, written into ``dest[name]`` (one (n, k, P_g) tensor per
    group) when given, with the patch buffer ``scratch`` reused across layers and calls.
    """
    out, calls, bad = _forward_with_probes(model, x, hooked)
    k = out.shape[1]
    good = [nm for nm in hooked if nm not in bad]
    targets = [(t, spec) for nm in good for _, t, spec in calls[nm]]
    grads: List[List[torch.Tensor]] = [[] for _ in targets]
    for c in range(k):
        if not targets:
            break
        g = torch.autograd.grad(out[:, c].sum(), [t for t, _ in targets], retain_graph=c < k - 1,
                                allow_unused=True)
        for j, gj in enumerate(g):
            shape, dtype, device = targets[j][1]
            grads[j].append(torch.zeros(shape, dtype=dtype, device=device) if gj is None else gj)
    feats: Features = {}
    j = 0
    with torch.no_grad():
        for nm in good:
            m = hooked[nm]
            names = layers.trainable(m)
            per_call = []
            conv_out = dest.get(nm) if dest else None
            for c, (xin, _, _) in enumerate(calls[nm]):
                D = grads[j][0].unsqueeze(1) if k == 1 else torch.stack(grads[j], dim=1)
                j += 1
                if isinstance(m, layers.NORM_TYPES):
                    per_call.append(layers.norm_grads(m, xin, D, names))
                elif direct and nm in direct:      # summed over calls in place
                    conv_out = layers.conv_grads(m, xin, D, names, conv_out, c > 0, scratch)
                else:
                    per_call.append(layers.token_pieces(m, xin, D, names))
            if isinstance(m, layers.NORM_TYPES):
                feats[nm] = sum(per_call[1:], per_call[0])
            elif direct and nm in direct:
                feats[nm] = conv_out
            else:    # calls concatenated along the token axis, group by group
                feats[nm] = [(torch.cat([pc[g][0] for pc in per_call], dim=1),
                              torch.cat([pc[g][1] for pc in per_call], dim=2)) for g in range(len(per_call[0]))]
    return k, feats, bad


def grads_of(feat) -> torch.Tensor:
    """Materialise per-sample gradients (n, k, P) from a module's features (reference form, used in checks)."""
    if isinstance(feat, torch.Tensor):
        return feat
    gs = [torch.einsum("nktq,ntp->nkqp", D, A).flatten(2) for A, D in feat]
    return torch.cat(gs, dim=2)


# ---------------------------------------------------------------------------------------------- torch.func

def func_grads(model: nn.Module, names: List[str], x: torch.Tensor) -> torch.Tensor:
    """Per-sample Jacobians (n, k, P) of the outputs with respect to the named parameters only (torch.func)."""
    from torch.func import functional_call, jacrev, vmap

    allp = dict(model.named_parameters())
    sub = {nm: allp[nm].detach() for nm in names}
    fixed = {nm: p.detach() for nm, p in allp.items() if nm not in sub}
    fixed.update(dict(model.named_buffers()))

    def f(p, xi):
        return functional_call(model, {**p, **fixed}, (xi.unsqueeze(0),)).reshape(-1)

    # functional_call may leave plain tensors behind in a module registered twice: restore every Parameter
    saved = [(m, nm, p) for m in model.modules() for nm, p in m._parameters.items()]
    try:
        jac = vmap(jacrev(f), in_dims=(None, 0))(sub, x)
    finally:
        for m, nm, p in saved:
            m._parameters[nm] = p
    n = x.shape[0]
    return torch.cat([jac[nm].reshape(n, jac[nm].shape[1], -1) for nm in names], dim=2)


# ---------------------------------------------------------------------------------------------- check

def _true_grads(model: nn.Module, x: torch.Tensor, params: List[torch.Tensor], k: int) -> torch.Tensor:
    """(m, k, P) gradients of f_c(x_i) with respect to params, one point and one output at a time."""
    rows = []
    for i in range(x.shape[0]):
        with torch.enable_grad():
            out = model(x[i:i + 1]).reshape(-1)
        row = []
        for c in range(k):
            g = torch.autograd.grad(out[c], params, retain_graph=c < k - 1, allow_unused=True)
            row.append(torch.cat([(torch.zeros_like(p) if gi is None else gi).reshape(-1)
                                  for p, gi in zip(params, g)]))
        rows.append(torch.stack(row))
    return torch.stack(rows)


def verify(model: nn.Module, x: torch.Tensor, hooked: "OrderedDict[str, nn.Module]", k: int,
           feats: Features) -> Dict[str, str]:
    """{module name: reason} for hooked modules whose 2-point Gram differs from the true per-point gradients'."""
    bad: Dict[str, str] = {}
    if not feats:
        return bad
    params = {nm: [getattr(hooked[nm], pn) for pn in layers.trainable(hooked[nm])] for nm in feats}
    flat = [p for ps in params.values() for p in ps]
    true_all = _true_grads(model, x, flat, k)          # (m, k, P) for all hooked parameters at once
    sizes = [sum(p.numel() for p in ps) for ps in params.values()]
    for (nm, feat), true in zip(feats.items(), torch.split(true_all, sizes, dim=2)):
        ours = grads_of(feat).flatten(1)
        true = true.flatten(1)
        g_ours, g_true = ours @ ours.T, true @ true.T
        tol = 1e-9 if g_true.dtype == torch.float64 else 1e-4
        scale = g_true.abs().max().clamp_min(torch.finfo(g_true.dtype).tiny)
        if ((g_ours - g_true).abs().max() / scale).item() > tol:
            bad[nm] = "hook features differ from its true gradient (parameter also used outside the call?)"
    return bad
