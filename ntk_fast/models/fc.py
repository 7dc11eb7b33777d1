"""The paper's fully-connected network and its per-layer NTK features.

Parameterisation (docs/design.md section 1; Jacot et al., no biases by default)::

    a0      = x / sqrt(d)
    z(l+1)  = W(l) a(l)                 W(0): h x d,  W(l): h x h for l = 1 .. L-1
    a(l)    = sigma(z(l)) / sqrt(h)
    f(x)    = W(L) a(L)                 W(L): k x h

so every layer divides its input by sqrt(fan_in), the last one included (last layer over sqrt(h)).
All weights are standard Gaussians at initialisation.  The activation is
``sigma(z) = c * softplus(beta z) / beta`` with ``c`` chosen so that ``E[sigma(z)^2] = 1`` for
``z ~ N(0, 1)`` (computed by quadrature; beta = 5 gives c = 1.40438); ``relu`` gives ``sqrt(2) relu`` and
``tanh`` gives ``c tanh`` with its own normaliser.

With ``bias=b > 0`` every layer gets a bias ``b * B(l)`` with ``B(l)`` initialised to zero (as in the
paper's reference code), so the bias enters the NTK as ``b^2 D_l D_l'^T``.

Per-layer features (docs/design.md section 2): ``A_l`` is the (scaled) input of layer l and ``D_l = df/dz``
at its output, so that ``df/dW(l) = D_l A_l^T`` and

    Theta(x, x') = sum_l (D_l(x) . D_l(x')) (A_l(x) . A_l(x')).
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

ACTIVATIONS = ("softplus", "relu", "tanh")


def _gaussian_second_moment(fn, lim: float = 12.0, n: int = 400_001) -> float:
    """E[fn(z)^2] for z ~ N(0, 1) by composite Simpson quadrature on [-lim, lim] (error < 1e-10)."""
    z = np.linspace(-lim, lim, n)
    w = np.ones(n)
    w[1:-1:2] = 4.0
    w[2:-1:2] = 2.0
    step = z[1] - z[0]
    pdf = np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return float(np.sum(w * fn(z) ** 2 * pdf) * step / 3.0)


@lru_cache(maxsize=None)
def activation_normaliser(activation: str = "softplus", beta: float = 5.0) -> float:
    """The constant c with E[(c * act(z))^2] = 1 for z ~ N(0, 1).

    softplus: act(z) = softplus(beta z) / beta  (beta = 5 -> 1.40438; beta -> inf -> sqrt(2));
    relu: sqrt(2) exactly; tanh: quadrature.
    """
    if activation == "relu":
        return math.sqrt(2.0)
    if activation == "softplus":
        if not beta > 0:
            raise ValueError(f"softplus beta must be > 0, got {beta}")
        return 1.0 / math.sqrt(_gaussian_second_moment(lambda z: np.logaddexp(0.0, beta * z) / beta))
    if activation == "tanh":
        return 1.0 / math.sqrt(_gaussian_second_moment(np.tanh))
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _exact_threshold(dtype: torch.dtype) -> float:
    """beta z above which softplus(beta z)/beta equals z to rounding in this dtype (see activation_and_derivative)."""
    return 40.0 if dtype == torch.float64 else 20.0


def activation_and_derivative(activation: str, beta: float):
    """Return (sigma, sigma') as torch functions for the normalised activation."""
    c = activation_normaliser(activation, beta)
    if activation == "softplus":
        # softplus(x) = x + log1p(e^-x) is x to rounding once e^-x / x < eps: x > 20 in float32, x > 40 in float64.
        # Switching to x there avoids the overflow of log1p(exp(x)) (inf past x = 88 in float32) at no cost.
        return (lambda z: c * torch.nn.functional.softplus(z, beta=beta, threshold=_exact_threshold(z.dtype)),
                lambda z: c * torch.sigmoid(beta * z))
    if activation == "relu":
        return (lambda z: c * torch.relu(z), lambda z: c * (z > 0).to(z.dtype))
    if activation == "tanh":
        return (lambda z: c * torch.tanh(z), lambda z: c * (1.0 - torch.tanh(z) ** 2))
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


# ------------------------------------------------------------------------- the net as functions of weights
# One implementation of the maths, used by FCNet.forward / FCNet.features, the trainer's engine
# (ntk_fast.dynamics.engine) and the kernel-change observable.  Weights are a list of L + 1 tensors, each
# (out, in) for one net or (K, out, in) for a stack of K nets (the matmuls broadcast over K).
Act = Callable[[torch.Tensor, bool], Tuple[torch.Tensor, Optional[torch.Tensor]]]


def fc_activation(activation: str, beta: float, h: int, fused: bool = False) -> Act:
    """The hidden layer's map ``act(z, keep) -> (a, s)`` with a = sigma(z)/sqrt(h) and (keep) s = sigma'(z)/sqrt(h).

    fused=True (softplus only): one ``ntk_fast::softplus_act`` pass writes a over z in place (z must be a fresh
    buffer, e.g. a matmul's output) and s into a new buffer, one exp and one log1p per element.  Otherwise the
    plain torch functions of :func:`activation_and_derivative` (z is not modified).
    """
    sigma, dsigma = activation_and_derivative(activation, beta)
    root_h = math.sqrt(h)
    if fused and activation == "softplus":
        from ntk_fast.ops.flow import softplus_act
        scale = activation_normaliser(activation, beta) / root_h

        def act(z: torch.Tensor, keep: bool):
            a = z.contiguous()                                          # the matmul's fresh output: reused in place
            s = torch.empty_like(a) if keep else None
            softplus_act(a, s, beta, scale)
            return a, s
        return act

    def act(z: torch.Tensor, keep: bool):
        return sigma(z) / root_h, (dsigma(z) / root_h if keep else None)
    return act


def fc_forward(Ws: Sequence[torch.Tensor], a0: torch.Tensor, act: Act, keep: bool = False,
               biases: Optional[Sequence[torch.Tensor]] = None, bias_scale: float = 0.0):
    """Forward pass of the FC net(s) from the scaled input a0 = x / sqrt(d), (n, d).

    z(l+1) = a(l) W(l)^T (+ bias_scale B(l)),  a(l+1), s(l+1) = act(z(l+1)),  out = a(L) W(L)^T.
    Returns (out, acts, ss): out (n, k) or (K, n, k); acts = [a0, a(1), .., a(L)]; ss = [s(1), .., s(L)] when
    keep (the derivatives backward needs), else [].  Cost: 2 n (d h + (L-1) h^2 + k h) flops per net.
    """
    L = len(Ws) - 1
    acts, ss = [a0], []
    a = a0
    for l in range(L):
        z = torch.matmul(a, Ws[l].transpose(-1, -2))
        if biases is not None:
            z = z + bias_scale * biases[l]
        a, s = act(z, keep)
        if keep:
            ss.append(s)
        acts.append(a)
    out = torch.matmul(a, Ws[L].transpose(-1, -2))
    if biases is not None:
        out = out + bias_scale * biases[L]
    return out, acts, ss


def fc_backward(Ws: Sequence[torch.Tensor], acts: Sequence[torch.Tensor], ss: Sequence[torch.Tensor],
                r: torch.Tensor, grads: Sequence[torch.Tensor]) -> None:
    """Gradients of sum_i r_i f(x_i) (k = 1) into ``grads`` (matmul out=, no allocation for them).

    delta(L+1) = r, grads[l] = delta(l+1)^T a(l), delta(l) = (delta(l+1) W(l)) o s(l).
    r: (n,) for 2-D weights or (K, n) for stacks; grads[l] shaped like Ws[l].
    Cost: 2 n (d h + (L-1) h^2 + h) flops for the gradients plus 2 n ((L-1) h^2 + h) for the deltas.
    """
    delta = r.unsqueeze(-1)
    for l in range(len(Ws) - 1, -1, -1):
        torch.matmul(delta.transpose(-1, -2), acts[l], out=grads[l])
        if l > 0:
            delta = torch.matmul(delta, Ws[l]).mul_(ss[l - 1])


def fc_features(Ws: Sequence[torch.Tensor], a0: torch.Tensor, act: Act,
                biases: Optional[Sequence[torch.Tensor]] = None, bias_scale: float = 0.0,
                last_slopes: bool = False):
    """Per-layer NTK features (A, D) of the net(s) (see FCNet.features): one forward and one backward pass.

    A[l] = a(l) (..., n, fan_in_l) (A[0] = a0 expanded over the stack), with a column of value bias_scale appended when biases are given;
    D[l] = df/dz(l+1) (..., n, k, fan_out_l), D[L] = I_k, D[l-1] = (D[l] W(l)) o s(l); squeezed to
    (..., n, fan_out_l) when k == 1.  Then Theta = sum_l (D_l D_l^T) o (A_l A_l^T).
    last_slopes: also return s(L) (..., n, h), so that D[L-1][i, c] = s(L)_i o W(L)[c] exactly (A, D, s).
    """
    _, A, ss = fc_forward(Ws, a0, act, keep=True, biases=biases, bias_scale=bias_scale)
    WL = Ws[-1]
    k, n = WL.shape[-2], a0.shape[0]
    eye = torch.eye(k, dtype=a0.dtype, device=a0.device)
    delta = eye.expand(*WL.shape[:-2], n, k, k)                    # df_c / df_c' for the output layer
    D = [delta]
    for l in range(len(Ws) - 1, 0, -1):                            # df/dz(l) from df/dz(l+1)
        W = Ws[l] if Ws[l].dim() == 2 else Ws[l].unsqueeze(-3)
        delta = (delta @ W) * ss[l - 1].unsqueeze(-2)
        D.append(delta)
    D.reverse()
    if WL.dim() > 2:                                               # the input is shared: give it the stack's axes
        A[0] = A[0].expand(*WL.shape[:-2], *A[0].shape)
    if biases is not None:
        A = [torch.cat([a, torch.full((*a.shape[:-1], 1), bias_scale, dtype=a.dtype, device=a.device)], dim=-1)
             for a in A]
    if k == 1:
        D = [dl[..., 0, :] for dl in D]
    return (A, D, ss[len(Ws) - 2]) if last_slopes else (A, D)


class FCNet(nn.Module):
    """Deep FC network f: R^d -> R^k of the paper (see the module docstring for the maths).

    Args:
        d: input dimension.  h: width.  L: number of hidden layers (>= 1).  k: outputs.
        activation: "softplus" (default, beta=5), "relu" or "tanh".
        bias: False/0 for none (the paper), or a scale b > 0 (True means 1.0).
        dtype, device: of the weights.  generator: a torch.Generator for the initialisation.

    ``forward(x)`` takes (n, d) and returns (n,) when k == 1, else (n, k).
    """

    def __init__(self, d: int, h: int, L: int, k: int = 1, activation: str = "softplus", beta: float = 5.0,
                 bias: float | bool = False, dtype: Optional[torch.dtype] = None,
                 device: Optional[torch.device | str] = None, generator: Optional[torch.Generator] = None):
        super().__init__()
        for name, v in (("d", d), ("h", h), ("L", L), ("k", k)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"FCNet: {name} must be a positive int, got {v!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"FCNet: activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.d, self.h, self.L, self.k = d, h, L, k
        self.activation, self.beta = activation, float(beta)
        self.bias_scale = float(bias) if not isinstance(bias, bool) else (1.0 if bias else 0.0)
        if self.bias_scale < 0:
            raise ValueError(f"FCNet: bias scale must be >= 0, got {bias}")
        dtype = dtype or torch.get_default_dtype()
        self.sigma, self.dsigma = activation_and_derivative(activation, self.beta)
        self.act_c = activation_normaliser(activation, self.beta)
        self._act = fc_activation(activation, self.beta, h)
        shapes = [(h, d)] + [(h, h)] * (L - 1) + [(k, h)]
        self.weights = nn.ParameterList([
            nn.Parameter(torch.randn(s, generator=generator, dtype=dtype,
                                     device=generator.device if generator is not None else device).to(device))
            for s in shapes])
        if self.bias_scale > 0:
            self.biases = nn.ParameterList([nn.Parameter(torch.zeros(s[0], dtype=dtype, device=device))
                                            for s in shapes])
        else:
            self.biases = None

    @property
    def fan_ins(self) -> List[int]:
        return [self.d] + [self.h] * self.L

    def extra_repr(self) -> str:
        return (f"d={self.d}, h={self.h}, L={self.L}, k={self.k}, activation={self.activation}, "
                f"beta={self.beta}, bias={self.bias_scale}")

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.d:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"FCNet: x must have shape (n, {self.d}), got {shape}")
        w = self.weights[0]
        if x.dtype != w.dtype or x.device != w.device:
            raise ValueError(f"FCNet: x is {x.dtype} on {x.device} but the weights are {w.dtype} on {w.device}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        out, _, _ = fc_forward(list(self.weights), x / math.sqrt(self.d), self._act, biases=self._biases(),
                               bias_scale=self.bias_scale)
        return out[:, 0] if self.k == 1 else out

    def _biases(self) -> Optional[List[torch.Tensor]]:
        return None if self.biases is None else list(self.biases)

    @torch.no_grad()
    def features(self, x: torch.Tensor, last_slopes: bool = False
                 ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Per-layer NTK features of a batch (one forward and one backward pass, no autograd).

        Returns (A, D), lists over the L + 1 weight matrices:
          A[l]: (n, fan_in_l) = a(l), with a constant column of value ``bias`` appended when biases are on;
          D[l]: (n, fan_out_l) = df/dz(l+1) when k == 1, else (n, k, fan_out_l) (one row per output).
        Then Theta = sum_l (D_l D_l'^T) o (A_l A_l'^T) (per output pair when k > 1).
        Cost: 2 n (d h + (L-1) h^2 + k h) flops forward, about twice that backward.  (:func:`fc_features`.)
        last_slopes: also return the last hidden layer's slopes s (n, h): D[L-1][i, c] = s_i o W(L)[c] (A, D, s).
        """
        self._check_input(x)
        return fc_features(list(self.weights), x / math.sqrt(self.d), self._act, biases=self._biases(),
                           bias_scale=self.bias_scale, last_slopes=last_slopes)
