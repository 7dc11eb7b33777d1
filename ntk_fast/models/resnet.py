"""Wide-ResNet without batch norm, the paper's Fig. 5 architecture, initialised so that pre-activations are O(1).

Layout (depth = 6 N + 4, N blocks per group, widen factor k; channels 16 -> 16 k -> 32 k -> 64 k)::

    z = conv3x3(x)                                                   stem, C_in -> 16
    for each group g (stride 1, 2, 2) and block b (stride on its first block only):
        r = conv3x3_2(sigma(conv3x3_1,stride(sigma(z))))              residual branch
        s = z                       (same shape)   or   conv1x1,stride(sigma(z))   (shape change)
        z = cos(theta) s + sin(theta) r                               theta = mix_angle = 45 degrees
    f(x) = w . mean_pixels(sigma(z)) / sqrt(C) + b_out               readout, C = 64 k channels

Every convolution is ``conv(x, W / sqrt(C_in k_h k_w)) + bias * B`` with W ~ N(0, 1) and B = 0 at init, and sigma
is the normalised softplus of :mod:`ntk_fast.models.fc` (E[sigma(z)^2] = 1 for z ~ N(0, 1)).  For inputs with
mean square 1 per component (the package's preprocessing: |x|^2 = D) each convolution's output has variance
about 1 (a little less at the zero-padded border), the two branches are independent at init, and
cos^2 + sin^2 = 1 keeps the residual stream at variance about 1 in every block: the O(1) pre-activations of the
paper, with no batch norm.  Zero padding lowers the variance at the image border (a 3x3 filter in a corner sees
4 of its 9 inputs), which matters on small feature maps: on 28 x 28 inputs (depth 10, widen 1) we measured the stream's
mean square at 0.94-1.0 after the stem and the first group, then about 0.5 and 0.3 after the two stride-2
groups (Gaussian and Fashion-MNIST inputs alike); tests/test_train_generic.py checks that it stays in [0.2, 3].  The readout over sqrt(C) makes f(x) = O(1) (the NTK parametrisation of FCNet).

Reference code (feature_lazy, article:archi.py ``Wide_ResNet(depth 28, widen h)``), next to this one: the same
``cos(45 deg) shortcut + sin(45 deg) residual`` mixing, convolutions with zero-initialised biases, readout over
h plus a bias.  Its readout over h (mean-field units) is ours over sqrt(C): alpha_code = sqrt(C) alpha, as for
the FC net (docs/training.md).  The reference's exact block internals (which activations precede the shortcut
convolution, its dropout) are not recorded in our notes; the layout above is the standard pre-activation
Wide-ResNet block with batch norm removed.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as Fn
from torch import nn

from ntk_fast.models.fc import activation_and_derivative


class ScaledConv2d(nn.Module):
    """conv2d(x, W / sqrt(C_in kh kw), stride, padding) + bias_scale * B;  W ~ N(0, 1), B = 0 at init."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int = 1, padding: int = 0, bias: float = 1.0,
                 dtype=None, device=None, generator: Optional[torch.Generator] = None):
        super().__init__()
        self.stride, self.padding, self.bias_scale = stride, padding, float(bias)
        self.scale = 1.0 / math.sqrt(c_in * k * k)
        self.weight = nn.Parameter(torch.randn(c_out, c_in, k, k, dtype=dtype, generator=generator).to(device))
        self.bias = nn.Parameter(torch.zeros(c_out, dtype=dtype, device=device)) if self.bias_scale > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias_scale * self.bias
        return Fn.conv2d(x, self.weight * self.scale, b, self.stride, self.padding)


class _Block(nn.Module):
    def __init__(self, c_in, c_out, stride, sigma, cos, sin, **kw):
        super().__init__()
        self.sigma, self.cos, self.sin = sigma, cos, sin
        self.conv1 = ScaledConv2d(c_in, c_out, 3, stride, 1, **kw)
        self.conv2 = ScaledConv2d(c_out, c_out, 3, 1, 1, **kw)
        self.shortcut = ScaledConv2d(c_in, c_out, 1, stride, 0, **kw) if (stride != 1 or c_in != c_out) else None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        a = self.sigma(z)
        r = self.conv2(self.sigma(self.conv1(a)))
        s = z if self.shortcut is None else self.shortcut(a)
        return self.cos * s + self.sin * r


class WideResNet(nn.Module):
    """Wide-ResNet without batch norm (see the module docstring).

    Args: depth (6 N + 4, e.g. 10, 16, 28), widen (k), in_channels, activation/beta (normalised, default softplus
    beta = 5), mix_angle (degrees, 45), bias (scale of the zero-initialised biases, 0 for none), dtype, device,
    generator (initialisation).  ``forward`` takes (n, C_in, H, W), or (n, C_in H W) flattened square images,
    and returns (n,).
    """

    def __init__(self, depth: int = 28, widen: int = 1, in_channels: int = 1, activation: str = "softplus",
                 beta: float = 5.0, mix_angle: float = 45.0, bias: float = 1.0, dtype=None, device=None,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WideResNet: depth must be 6 N + 4 with N >= 1 (10, 16, 22, 28, ...), got {depth}")
        if not isinstance(widen, int) or widen < 1:
            raise ValueError(f"WideResNet: widen must be a positive int, got {widen!r}")
        self.depth, self.widen, self.in_channels = depth, widen, in_channels
        self.sigma = activation_and_derivative(activation, beta)[0]
        th = math.radians(mix_angle)
        kw = dict(bias=bias, dtype=dtype, device=device, generator=generator)
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.stem = ScaledConv2d(in_channels, widths[0], 3, 1, 1, **kw)
        blocks, c = [], widths[0]
        for g, stride in zip(range(3), (1, 2, 2)):
            for b in range((depth - 4) // 6):
                blocks.append(_Block(c, widths[g + 1], stride if b == 0 else 1, self.sigma, math.cos(th),
                                     math.sin(th), **kw))
                c = widths[g + 1]
        self.blocks = nn.Sequential(*blocks)
        self.channels = c
        self.readout = nn.Parameter(torch.randn(c, dtype=dtype, generator=generator).to(device))
        self.bias_scale = float(bias)
        self.readout_bias = nn.Parameter(torch.zeros((), dtype=dtype, device=device)) if bias > 0 else None

    def _image(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            side = math.isqrt(x.shape[1] // self.in_channels)
            if side * side * self.in_channels != x.shape[1]:
                raise ValueError(f"WideResNet: flattened inputs must be C_in H H, got {x.shape[1]} features")
            x = x.view(x.shape[0], self.in_channels, side, side)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"WideResNet: x must be (n, {self.in_channels}, H, W), got {tuple(x.shape)}")
        return x

    def preactivations(self, x: torch.Tensor):
        """The residual stream after the stem and after every block (for the O(1) check)."""
        z = self.stem(self._image(x))
        out = [z]
        for blk in self.blocks:
            z = blk(z)
            out.append(z)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.blocks(self.stem(self._image(x)))
        a = self.sigma(z).mean(dim=(2, 3))                               # (n, C)
        f = a @ self.readout / math.sqrt(self.channels)
        if self.readout_bias is not None:
            f = f + self.bias_scale * self.readout_bias
        return f
