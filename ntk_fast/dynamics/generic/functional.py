"""K copies of one architecture as a flat (K, P) parameter buffer, evaluated with torch.func.

Model k is ``template`` with its trainable parameters taken from row k of ``W`` (views, no copies):

    f_k(x) = functional_call(template, ({name: W[k, o:o+s].view(shape)}, buffers_k), (x,))      (n,) or (n, 1) -> (n,)

For K > 1 the rows are evaluated in one call by ``torch.func.vmap`` over the stacked rows and buffers
(``torch.func.stack_module_state``) when the model allows it (``batched=None`` tries it once on two points
and falls back to a loop over the rows when vmap raises; it also loops for a model with convolutions on the
CPU, where the grouped convolutions vmap makes are slower than K plain ones); ``batched=False`` forces the
loop, ``batched=True`` forces vmap.  Gradients of the vmapped path come
from ``torch.func.grad`` of the scalar loss with respect to the flat row.  The loop path instead calls K working
copies of the model (made once) whose trainable parameters are views of the rows of a (K, P) weight buffer and
whose ``.grad`` are views of the rows of a (K, P) gradient buffer:

    p_k = Wb[k, o:o+s].view(shape),   p_k.grad = Gb[k, o:o+s].view(shape)
    Gb <- 0;  L_k.backward() for each k     (autograd accumulates d L_k / d p_k into Gb[k] in place)

so a step is one forward and one backward pass per model, with no per-step parameter dict, no copy of the
module and no concatenation of the gradients; an optimizer that updates Wb in place updates the models.
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap

def check_models(models: Sequence[nn.Module]) -> None:
    """Same structure, float32/float64 parameters on one device, no train-mode BatchNorm or Dropout."""
    a = models[0]
    names = [(n, tuple(p.shape), p.dtype, p.device) for n, p in a.named_parameters()]
    if not any(p.requires_grad for p in a.parameters()):
        raise ValueError("train: the model has no parameter with requires_grad=True")
    for m in models:
        for sub in m.modules():
            if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.training:
                raise ValueError(f"train: {type(sub).__name__} in train mode uses batch statistics (F would depend "
                                 f"on the batch and its running stats would change); call model.eval() or remove it")
            if isinstance(sub, nn.modules.dropout._DropoutNd) and sub.training and sub.p > 0:
                raise ValueError(f"train: {type(sub).__name__} in train mode is random; call model.eval()")
        if [(n, tuple(p.shape), p.dtype, p.device) for n, p in m.named_parameters()] != names:
            raise ValueError("train: all models of an ensemble must have the same parameters (names, shapes, "
                             "dtypes, devices)")
        if [p.requires_grad for p in m.parameters()] != [p.requires_grad for p in a.parameters()]:
            raise ValueError("train: all models of an ensemble must train the same parameters")
    dtypes = {p.dtype for p in a.parameters()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in (torch.float32, torch.float64):
        raise ValueError(f"train: parameters must all be float32 or all float64, got {sorted(map(str, dtypes))}")


class FlatEnsemble:
    """The flat buffer, its layout and the batched forward / value-and-gradient of K models."""

    def __init__(self, models: Sequence[nn.Module], batched: Optional[bool] = None):
        models = list(models)
        check_models(models)
        self.K = len(models)
        self.template = copy.deepcopy(models[0]).to("meta")
        named = list(models[0].named_parameters())
        self.names = [n for n, p in named if p.requires_grad]
        self.shapes = [tuple(p.shape) for n, p in named if p.requires_grad]
        self.sizes = [p.numel() for n, p in named if p.requires_grad]
        self.offsets = [0]
        for s in self.sizes:
            self.offsets.append(self.offsets[-1] + s)
        self.P = self.offsets[-1]
        p0 = named[0][1]
        self.dtype, self.device = p0.dtype, p0.device
        params, bufs = stack_module_state(models)          # every tensor stacked (K, ...)
        self.fixed = {n: t.detach() for n, t in bufs.items()}
        self.fixed.update({n: t.detach() for n, t in params.items() if n not in self.names})
        self.W = torch.cat([params[n].detach().reshape(self.K, -1) for n in self.names], 1).contiguous()
        self.batched = batched
        self._models = models
        self._Wb: Optional[torch.Tensor] = None          # weight buffer the working copies read (K, P)
        self._Gb: Optional[torch.Tensor] = None          # gradient buffer their .grad are views of (K, P)
        self._work: Optional[List[nn.Module]] = None     # the K working copies (made on first use)
        self._grad_views: List[Tuple[nn.Parameter, torch.Tensor]] = []   # (parameter, its view of Gb)

    # --------------------------------------------------------------------------------------------- layout
    def views(self, row: torch.Tensor) -> Dict[str, torch.Tensor]:
        # split (not slicing): its backward concatenates the parameter gradients once, where slices would
        # scatter each of them into a zero buffer of size P
        return {n: t.view(sh) for n, t, sh in zip(self.names, row.split(self.sizes), self.shapes)}

    def param_rows(self, W: torch.Tensor) -> List[torch.Tensor]:
        """Per-parameter (K, size) slices of W (for per-tensor norms)."""
        return [W[:, o:o + s] for o, s in zip(self.offsets, self.sizes)]

    def load_into(self, model: nn.Module, row: torch.Tensor) -> nn.Module:
        """Copy row (P,) into the trainable parameters of ``model`` (in place) and return it."""
        own = dict(model.named_parameters())
        with torch.no_grad():
            for n, v in self.views(row).items():
                own[n].copy_(v)
        return model

    # --------------------------------------------------------------------------------------------- bound copies
    def buffer(self) -> torch.Tensor:
        """The (K, P) weight buffer of the working copies (a copy of W on first call, then the same tensor).

        Passing this very tensor to :meth:`value_and_grad` skips the copy of the weights into it, and updating it
        in place (an optimizer step) updates the working copies: the minibatch loop keeps its weights here."""
        if self._Wb is None:
            self._Wb = self.W.clone()
        return self._Wb

    def _bound(self) -> List[nn.Module]:
        """K deep copies of the models whose trainable parameters are views of the rows of :meth:`buffer` and
        whose gradients are views of the rows of the gradient buffer (made once)."""
        if self._work is None:
            Wb = self.buffer()
            self._Gb = torch.zeros_like(Wb)
            self._work = []
            for k, m in enumerate(self._models):
                work = copy.deepcopy(m)
                own = dict(work.named_parameters())
                for name, w, g in zip(self.names, self.views(Wb[k]).values(), self.views(self._Gb[k]).values()):
                    own[name].data = w
                    own[name].grad = g
                    self._grad_views.append((own[name], g))
                self._work.append(work)
        return self._work

    def _check_grads_in_buffer(self) -> None:
        """Autograd accumulates into an existing ``.grad`` in place; should a parameter's ``.grad`` have been
        replaced by another tensor (a hook, another autograd), copy it into the buffer and bind the view again."""
        for p, g in self._grad_views:
            if p.grad is not g:
                if p.grad is not None:
                    g.copy_(p.grad)
                p.grad = g

    # --------------------------------------------------------------------------------------------- calls
    @staticmethod
    def _flat_out(out, n: int) -> torch.Tensor:
        """The model's output (n,) or (n, 1) as (n,); anything else is a clear error."""
        if not isinstance(out, torch.Tensor) or tuple(out.shape) not in ((n,), (n, 1)):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"train: the model's output must have shape (n,) or (n, 1) for n = {n} inputs, "
                             f"got {shape} (one scalar output per point)")
        return out.reshape(n)

    def _f(self, row: torch.Tensor, fixed: Dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return self._flat_out(functional_call(self.template, {**self.views(row), **fixed}, (x,)), x.shape[0])

    def _fixed_row(self, k: int) -> Dict[str, torch.Tensor]:
        return {n: t[k] for n, t in self.fixed.items()}

    def _conv_on_cpu(self) -> bool:
        """True for a model with a convolution on the CPU: vmap turns its K convolutions into one grouped
        convolution, measured 1.1-1.6x slower there than the loop (bench/bench_generic.py, CV with 8 channels)."""
        return self.device.type == "cpu" and any(isinstance(m, nn.modules.conv._ConvNd)
                                                 for m in self.template.modules())

    def _decide_batched(self, x: torch.Tensor) -> bool:
        if self.batched is None:
            if self.K == 1 or self._conv_on_cpu():
                self.batched = False
            else:
                try:
                    with torch.no_grad():
                        vmap(self._f, in_dims=(0, 0, None))(self.W[:, :], self.fixed, x[:2])
                    self.batched = True
                except ValueError:
                    raise
                except Exception:  # vmap cannot batch some op of this model: loop over the rows
                    self.batched = False
        return self.batched

    def forward(self, W: torch.Tensor, x: torch.Tensor, chunk: Optional[int] = None) -> torch.Tensor:
        """f of the K models on x (shared): (K, n).  ``chunk``: points per call (memory)."""
        n = x.shape[0]
        chunk = chunk or n
        outs = []
        batched = self._decide_batched(x)
        with torch.no_grad():
            for i in range(0, n, chunk):
                xb = x[i:i + chunk]
                if batched:
                    outs.append(vmap(self._f, in_dims=(0, 0, None))(W, self.fixed, xb))
                elif W is self._Wb and self._work is not None:     # the working copies hold these weights
                    outs.append(torch.stack([self._flat_out(m(xb), xb.shape[0]) for m in self._work]))
                else:
                    outs.append(torch.stack([self._f(W[k], self._fixed_row(k), xb) for k in range(self.K)]))
        return torch.cat(outs, 1)

    def forward_row(self, row: torch.Tensor, k: int, x: torch.Tensor, chunk: Optional[int] = None) -> torch.Tensor:
        """f of model k with weights ``row`` (P,) on x: (n,)."""
        n = x.shape[0]
        chunk = chunk or n
        with torch.no_grad():
            return torch.cat([self._f(row, self._fixed_row(k), x[i:i + chunk]) for i in range(0, n, chunk)])

    def _vg_loop(self, W, x, y, f0, loss_fn, shared: bool):
        """Loop path of :meth:`value_and_grad`: the working copies called directly, each model's backward right
        after its forward, so one model's graph is alive at a time (holding the K graphs of the CNN on
        n = 1000 images for one backward of the summed losses made the K = 8 loop 1.6x slower than 8
        sequential runs in bench_generic, file generic_vm_20261206-181252)."""
        work = self._bound()
        if W is not self._Wb:
            self._Wb.copy_(W)
        self._Gb.zero_()
        losses, fs = [], []
        with torch.enable_grad():
            for k, m in enumerate(work):
                xx, yy = (x, y) if shared else (x[k], y[k])
                f = self._flat_out(m(xx), xx.shape[0])
                loss = loss_fn(f, yy, f0[k])
                loss.backward()             # d L_k / d p_k, accumulated in place into row k of Gb
                losses.append(loss.detach())
                fs.append(f.detach())
        self._check_grads_in_buffer()
        return torch.stack(losses), self._Gb, torch.stack(fs)

    def value_and_grad(self, W: torch.Tensor, x: torch.Tensor, y: torch.Tensor, f0: torch.Tensor,
                       loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                       shared: bool, keep: bool = True) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss (K,), gradient (K, P), f (K, n)) of ``loss_fn(f, y, f0)`` for each model.

        shared=True: x (n, ...), y (n,), f0 (K, n) are the same points for every model (full batch);
        shared=False: x (K, b, ...), y (K, b), f0 (K, b), one minibatch per model.
        keep=False: the loop path may return its gradient buffer itself (overwritten by the next call) instead
        of a new tensor: for a caller that uses the gradient at once (an optimizer step).
        """
        def fn(row, fixed, xx, yy, ff0):
            f = self._f(row, fixed, xx)
            loss = loss_fn(f, yy, ff0)
            return loss, (loss, f)

        if self.batched if self.batched is not None else self._decide_batched(x if shared else x[0]):
            vg = grad(fn, has_aux=True)                 # row -> (gradient, (loss, f))
            dims = (0, 0, None, None, 0) if shared else (0, 0, 0, 0, 0)
            g, (lv, f) = vmap(vg, in_dims=dims)(W, self.fixed, x, y, f0)
            return lv.detach(), g.detach(), f.detach()
        lv, g, f = self._vg_loop(W, x, y, f0, loss_fn, shared)
        return lv, (g.clone() if keep else g), f
