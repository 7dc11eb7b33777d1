"""The paper's convolutional network ``CV`` (its Table 1 CNN), defined once for the NTK code and training.

Architecture (L1 blocks of L2 convolutions, defaults 2 x 2):

    a(0)   = x                                           (n, C_in, H, W); (n, C_in H W) is reshaped to a square
    z(l+1) = conv_l(a(l)) / sqrt(C_l * s * s)            s x s filters (s = 5), padding 1, no bias by default,
                                                          stride 2 on the first conv of every block, else 1
    a(l+1) = sigma(z(l+1))                               sigma = c * softplus(beta z) / beta, E[sigma(z)^2] = 1
    f(x)   = W mean_{positions}(a(L1 L2)) / sqrt(h_last)  W: k x h_last, global average pool

Block b has ``round(h * h_base**b)`` channels (h_base = 1: all convolutions have h channels).  Every weight
is a standard Gaussian at initialisation, so each preactivation has unit variance for inputs with unit
per-pixel variance.  Normalisation: every layer divides by sqrt(fan_in), the readout included
(1/sqrt(h) at the last layer, the paper's units; the reference code divides the readout by h, i.e.
alpha_code = sqrt(h) alpha_paper, see FCNet).  With ``bias=True`` each conv has a bias initialised to zero,
inside the scaling: z = (W * a + b) / sqrt(fan_in).

On 28 x 28 inputs the four convolutions see 13 x 13, 11 x 11, 5 x 5 and 3 x 3 output positions.
Parameters: s^2 (C_in h + 3 h^2) + k h (h = 32, C_in = 1, k = 1: 77,632).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ntk_fast.models.fc import ACTIVATIONS, activation_and_derivative


class CV(nn.Module):
    """Paper CNN: ``CV(h, k=1, in_channels=1, L1=2, L2=2, h_base=1.0, kernel=5, padding=1, ...)``.

    ``forward(x)`` takes (n, C_in, H, W) or (n, C_in H W) (square images) and returns (n,) for k = 1,
    else (n, k).  All convolutions are ``nn.Conv2d`` modules and the readout an ``nn.Linear``, so
    ``empirical_ntk`` captures every layer with hooks.
    """

    def __init__(self, h: int, k: int = 1, in_channels: int = 1, L1: int = 2, L2: int = 2, h_base: float = 1.0,
                 kernel: int = 5, padding: int = 1, activation: str = "softplus", beta: float = 5.0,
                 bias: bool = False, dtype: Optional[torch.dtype] = None,
                 device: Optional[torch.device | str] = None, generator: Optional[torch.Generator] = None):
        super().__init__()
        for name, v in (("h", h), ("k", k), ("in_channels", in_channels), ("L1", L1), ("L2", L2),
                        ("kernel", kernel)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"CV: {name} must be a positive int, got {v!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"CV: activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.h, self.k, self.in_channels, self.kernel = h, k, in_channels, kernel
        self.sigma, _ = activation_and_derivative(activation, float(beta))
        dtype = dtype or torch.get_default_dtype()
        convs, c_in = [], in_channels
        for b in range(L1):
            c_out = max(1, round(h * h_base ** b))
            for j in range(L2):
                conv = nn.Conv2d(c_in, c_out, kernel, stride=2 if j == 0 else 1, padding=padding, bias=bias,
                                 dtype=dtype, device=device)
                convs.append(conv)
                c_in = c_out
        self.convs = nn.ModuleList(convs)
        self.readout = nn.Linear(c_in, k, bias=False, dtype=dtype, device=device)
        self.h_last = c_in
        with torch.no_grad():
            for p in self.parameters():
                if p.dim() > 1:
                    p.copy_(torch.randn(p.shape, generator=generator, dtype=dtype,
                                        device=generator.device if generator is not None else device))
                else:
                    p.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            side = math.isqrt(x.shape[1] // self.in_channels)
            if side * side * self.in_channels != x.shape[1]:
                raise ValueError(f"CV: flat inputs must be (n, {self.in_channels} * side^2), got {tuple(x.shape)}")
            x = x.reshape(x.shape[0], self.in_channels, side, side)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"CV: x must be (n, {self.in_channels}, H, W), got {tuple(x.shape)}")
        a = x
        for conv in self.convs:
            a = self.sigma(conv(a) / math.sqrt(conv.in_channels * self.kernel * self.kernel))
        out = self.readout(a.mean(dim=(2, 3))) / math.sqrt(self.h_last)
        return out[:, 0] if self.k == 1 else out
