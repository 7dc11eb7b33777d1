"""The plan of the structured NTK of any model: where each parameter goes and the formula used, by flop count.

Per hooked layer piece with input features A (n, T, p) and output signal D (n, k, T, q) (T tokens or
positions; T = 1 for a Linear on (n, p)), with S point pairs (n(n+1)/2 for x2=None, n1 n2 otherwise) and
kk = k^2 in mode "full", k in mode "trace":

=========  ==========================================================  =======================================
form       Theta[i, j] (per output pair in "full")                     flops
=========  ==========================================================  =======================================
hadamard   (D_i . D_j) (A_i . A_j)                        (T = 1)       2 S (p + kk q)
pair       sum_{t,t'} (D_it . D_jt') (A_it . A_jt')                     2 S T^2 (p + kk q) + 2 S T^2 kk
grads      G_i . G_j with G_i = sum_t D_it A_it^T (materialised)        2 N k T p q + 2 S kk p q
=========  ==========================================================  =======================================

(N = points whose gradients are formed.)  Two shortcuts of the gram_full CPU kernel in mode "full" (k > 1) for an
nn.Sequential of Linear and elementwise layers on (n, p) inputs, and for an FCNet (the fast paths empirical_ntk
takes for them):

=========  ==========================================================  =======================================
unit       the readout: D_ic = e_c, (D_ic . D_jc') = delta_cc'                2 S p
factored   the Linear below it: D_ic = s_i o w_c, symmetric in (c, c')        2 S (p + q (kp + 1))
=========  ==========================================================  =======================================

(kp = k(k+1)/2 rounded up to a multiple of 8; used when kp < k^2, i.e. k >= 5.)  Norm layers (LayerNorm, GroupNorm, eval BatchNorm affine) and
the parameters routed to torch.func always use "grads" (P = their parameter count).  For T > 1 the cheaper of
"pair" and "grads" is chosen.  "diagonal" mode counts the n diagonal pairs only.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import nn

from ntk_fast.ntk import capture
from ntk_fast.ops.gram_full import factored_pairs

MODES = ("full", "trace", "diagonal")


@dataclass
class Entry:
    """One line of the plan: a piece of a layer (a conv group, say) or the torch.func rest."""
    module: str
    kind: str
    params: List[str]
    form: str
    T: int = 1
    p: int = 0
    q: int = 0
    P: int = 0
    flops: float = 0.0
    rejected: Optional[str] = None   # the other form and its flops, when there was a choice
    group: int = 0


@dataclass
class Plan:
    """Result of ``ntk_plan``: entries, sizes, and the reasons parameters went to torch.func."""
    entries: List[Entry]
    n1: int
    n2: int
    symmetric: bool
    k: int
    mode: str
    func_reasons: Dict[str, str] = field(default_factory=dict)
    hooked: "OrderedDict[str, nn.Module]" = field(default_factory=OrderedDict, repr=False)

    @property
    def total_flops(self) -> float:
        return sum(e.flops for e in self.entries)

    @property
    def func_params(self) -> List[str]:
        return [p for e in self.entries if e.form == "jacobian" for p in e.params]

    @property
    def params(self) -> List[str]:
        """Every parameter covered (each once): equals the model's trainable parameters."""
        return [p for e in self.entries if e.group == 0 for p in e.params]

    def __str__(self) -> str:
        head = (f"NTK plan: n1={self.n1} n2={self.n2}{' (symmetric)' if self.symmetric else ''} k={self.k} "
                f"mode={self.mode}; total {self.total_flops:.3e} flops")
        rows = [head, f"{'module':<28} {'kind':<12} {'form':<9} {'T':>6} {'p':>7} {'q':>6} {'P':>9} "
                      f"{'flops':>10}  parameters"]
        for e in self.entries:
            alt = f"  (not {e.rejected})" if e.rejected else ""
            rows.append(f"{e.module or '<root>':<28} {e.kind:<12} {e.form:<9} {e.T:>6} {e.p:>7} {e.q:>6} {e.P:>9} "
                        f"{e.flops:>10.3e}  {', '.join(e.params)}{alt}")
        for pn, why in self.func_reasons.items():
            rows.append(f"  torch.func: {pn}: {why}")
        return "\n".join(rows)


def form_flops(form: str, mode: str, n1: int, n2: int, symmetric: bool, k: int,
               T: int = 1, p: int = 0, q: int = 0, P: int = 0, formed: bool = False) -> float:
    """Flops of one entry (see the module docstring); ``formed``: tokens materialised into gradients."""
    if mode == "diagonal":
        S, kk = float(n1), k
    else:
        S = n1 * (n1 + 1) / 2.0 if symmetric else float(n1) * n2
        kk = k * k if mode == "full" else k
    N = n1 if symmetric else n1 + n2
    if form == "hadamard":
        return 2 * S * (p + kk * q)
    if form == "unit":
        return 2 * S * p
    if form == "factored":
        return 2 * S * (p + q * (factored_pairs(k) + 1))
    if form == "pair":
        return 2 * S * T * T * (p + kk * q) + 2 * S * T * T * kk
    make = 2.0 * N * k * T * p * q if formed else 0.0
    return make + 2 * S * kk * P


def _token_entry(name: str, m: nn.Module, g: int, A: torch.Tensor, D: torch.Tensor, mode: str,
                 n1: int, n2: int, sym: bool, k: int) -> Entry:
    T, p, q = A.shape[1], A.shape[2], D.shape[3]
    e = Entry(name, type(m).__name__, capture.module_params(m, name), "hadamard", T, p, q, p * q, group=g)
    args = (mode, n1, n2, sym, k)
    if T == 1:
        e.flops = form_flops("hadamard", *args, p=p, q=q)
        return e
    pair = form_flops("pair", *args, T=T, p=p, q=q)
    grads = form_flops("grads", *args, T=T, p=p, q=q, P=p * q, formed=True)
    if pair < grads:
        e.form, e.flops, e.rejected = "pair", pair, f"grads {grads:.3e}"
    else:
        e.form, e.flops, e.rejected = "grads", grads, f"pair {pair:.3e}"
    return e


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"ntk_plan: mode must be one of {MODES}, got {mode!r}")


def make_plan(model: nn.Module, x1: torch.Tensor, x2: Optional[torch.Tensor] = None, mode: str = "trace",
              method: str = "auto") -> Plan:
    """Route every trainable parameter, check the hooks on 2 points, choose a formula per piece."""
    _check_mode(mode)
    capture.check_modes(model)
    names = capture.trainable_names(model)
    n1 = x1.shape[0]
    sym = x2 is None
    n2 = n1 if sym else x2.shape[0]
    if method == "jacobian":
        hooked, func = OrderedDict(), {nm: "method='jacobian'" for nm in names}
    else:
        hooked, func = capture.static_route(model)
    xs = x1[:2]
    k, feats, bad = capture.hook_features(model, xs, hooked)
    bad.update(capture.verify(model, xs, hooked, k, feats))
    for nm, why in bad.items():
        for pn in capture.module_params(hooked.pop(nm), nm):
            func[pn] = why
        feats.pop(nm, None)
    if method == "structured" and func:
        detail = "; ".join(f"{pn}: {why}" for pn, why in func.items())
        raise ValueError(f"empirical_ntk: method='structured' cannot cover every parameter ({detail}); "
                         "use method='auto' to send those to torch.func")
    entries: List[Entry] = []
    for nm, m in hooked.items():
        f = feats[nm]
        if isinstance(f, torch.Tensor):
            e = Entry(nm, type(m).__name__, capture.module_params(m, nm), "grads", P=f.shape[2])
            e.flops = form_flops("grads", mode, n1, n2, sym, k, P=e.P)
            entries.append(e)
        else:
            entries += [_token_entry(nm, m, g, A, D, mode, n1, n2, sym, k) for g, (A, D) in enumerate(f)]
    if func:
        fn = [pn for pn in names if pn in func]
        P = sum(dict(model.named_parameters())[pn].numel() for pn in fn)
        entries.append(Entry("", "torch.func", fn, "jacobian", P=P,
                             flops=form_flops("grads", mode, n1, n2, sym, k, P=P)))
    covered = sorted(pn for e in entries if e.group == 0 for pn in e.params)   # groups share parameters
    covered_set = set(covered)
    if len(covered) != len(covered_set) or covered_set != set(names):
        raise RuntimeError(f"empirical_ntk: internal routing error: covered {covered}, trainable {sorted(names)}")
    return Plan(entries, n1, n2, sym, k, mode, {pn: func[pn] for pn in names if pn in func}, hooked)


def _fcnet_plan(model: nn.Module, x1: torch.Tensor, x2: Optional[torch.Tensor], mode: str) -> Plan:
    """The plan of an FCNet's own fast path: one hadamard entry per weight matrix (with its bias), A with the
    bias column when both train; frozen parameters left out."""
    n1, sym = x1.shape[0], x2 is None
    n2, k, bias = (n1 if sym else x2.shape[0]), model.k, model.biases is not None
    entries = []
    for l, W in enumerate(model.weights):
        w_grad = W.requires_grad
        b_grad = bias and model.biases[l].requires_grad
        if not (w_grad or b_grad):
            continue
        p = (W.shape[1] if w_grad else 0) + (1 if b_grad else 0)
        params = ([f"weights.{l}"] if w_grad else []) + ([f"biases.{l}"] if b_grad else [])
        e = Entry(f"weights.{l}", "FCNet layer", params, "hadamard", 1, p, W.shape[0], W.numel() * w_grad + W.shape[0] * b_grad)
        e.flops = form_flops("hadamard", mode, n1, n2, sym, k, p=p, q=e.q)
        entries.append(e)
    return Plan(entries, n1, n2, sym, k, mode)


def _shortcuts(plan: Plan, model: nn.Module) -> None:
    """Mode "full", k > 1, CPU, the fast path of a Sequential or an FCNet: the readout is "unit", the layer below
    it (when kp < k^2) "factored" (module docstring); their flops recounted."""
    from ntk_fast.models.fc import FCNet
    if isinstance(model, FCNet):
        layers_ = [f"weights.{l}" for l in range(len(model.weights))]
    elif isinstance([m for m in model if not isinstance(m, nn.Flatten)][-1], nn.Linear):   # Flatten: identity
        layers_ = [str(i) for i, m in enumerate(model) if isinstance(m, nn.Linear)]
    else:
        return      # an activation after the last Linear: no unit readout, nothing factored
    forms = {layers_[-1]: "unit"}
    if len(layers_) > 1 and factored_pairs(plan.k) < plan.k ** 2:
        forms[layers_[-2]] = "factored"
    for e in plan.entries:
        if e.module in forms and e.form == "hadamard":
            e.form = forms[e.module]
            e.flops = form_flops(e.form, plan.mode, plan.n1, plan.n2, plan.symmetric, plan.k, p=e.p, q=e.q)


def ntk_plan(model: nn.Module, x1: torch.Tensor, x2: Optional[torch.Tensor] = None, *, mode: str = "trace",
             method: str = "auto") -> Plan:
    """The plan ``empirical_ntk(model, x1, x2, mode=mode, method=method)`` follows; print it for a table.

    Lists every trainable parameter with its layer, the formula (hadamard / pair / grads / jacobian, and for a
    Sequential or an FCNet in mode "full" on the CPU the unit readout and the factored layer below it), the sizes
    (T tokens, p inputs, q outputs, P parameters) and the flops of its share of the Gram.  An FCNet is listed by
    its own fast path (one entry per weight matrix and its bias).
    """
    from ntk_fast.models.fc import FCNet
    from ntk_fast.ntk.empirical import structured_input
    fast = method != "jacobian" and structured_input(model, x1)
    if fast and isinstance(model, FCNet):
        _check_mode(mode)
        plan = _fcnet_plan(model, x1, x2, mode)
    else:
        plan = make_plan(model, x1, x2, mode, method)
    if fast and mode == "full" and plan.k > 1 and x1.device.type == "cpu":
        _shortcuts(plan, model)
    return plan
