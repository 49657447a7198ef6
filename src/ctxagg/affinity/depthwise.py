"""Depthwise and multi-head depthwise convolution as static affinities (Container Eq. 7, §3.3)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Affinity
from .registry import AffinityContext, register_affinity

__all__ = ["DepthwiseConvAffinity", "ChannelBias", "conv_toeplitz"]


def conv_toeplitz(kernel: Tensor, height: int, width: int) -> Tensor:
    """Banded Toeplitz matrices of stride-1, zero-padded 'same' 2-D cross-correlations.

    kernel: (M, k, k) -> (M, N, N) with N = height·width, so ``A[m] @ x.flatten()`` equals
    ``conv2d(x, kernel[m], padding=k // 2)``.
    """
    m, ky_size, kx_size = kernel.shape
    n = height * width
    a = kernel.new_zeros(m, n, n)
    index = torch.arange(n, device=kernel.device).view(height, width)
    for ky in range(ky_size):
        dy = ky - ky_size // 2
        if abs(dy) >= height:  # the tap never lands inside a grid this small
            continue
        ys = torch.arange(max(0, -dy), min(height, height - dy), device=kernel.device)
        for kx in range(kx_size):
            dx = kx - kx_size // 2
            if abs(dx) >= width:
                continue
            xs = torch.arange(max(0, -dx), min(width, width - dx), device=kernel.device)
            rows = index[ys][:, xs].flatten()
            cols = index[ys + dy][:, xs + dx].flatten()
            a[:, rows, cols] = kernel[:, ky, kx].unsqueeze(-1).to(a.dtype)
    return a


class ChannelBias:
    """Mixin for convolution affinities whose ``self.bias`` (shape (C,) or None) is added after ``A·V``: it is the
    :meth:`~ctxagg.affinity.Affinity.bias_term`, and :meth:`~ctxagg.affinity.Affinity.pop_bias` removes it."""

    bias: Optional[nn.Parameter]

    def bias_term(self) -> Optional[Tensor]:
        return self.bias

    @torch.no_grad()
    def pop_bias(self) -> Optional[Tensor]:
        bias, self.bias = self.bias, None
        return None if bias is None else bias.detach()


class DepthwiseConvAffinity(ChannelBias, Affinity):
    """k×k depthwise convolution (``heads == dim``, Container Eq. 7) or multi-head depthwise
    convolution (``heads < dim``: one kernel per head, shared by the C/M channels of that head —
    Container §3.3 "MH-DW shares kernel weights").

    ``bias`` (default on, as in the official Container code's ``nn.Conv2d``) is a per-channel offset
    added after ``A·V``; it is reported by :meth:`bias_term` and is not part of ``A``.
    """

    needs_grid = True

    def __init__(self, dim: int, kernel_size: int = 5, heads: Optional[int] = None, bias: bool = True):
        super().__init__(dim, heads or dim)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd for a 'same' convolution, got {kernel_size}")
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(self.heads, 1, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)  # nn.Conv2d's default init
        if self.bias is not None:
            bound = 1 / kernel_size  # fan_in = k·k for a depthwise kernel, as nn.Conv2d
            nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, kernel_size={self.kernel_size}, bias={self.bias is not None}"

    def channel_kernels(self) -> Tensor:
        """The (C, 1, k, k) per-channel kernels (heads' kernels repeated over their channels)."""
        return self.weight.repeat_interleave(self.head_dim, dim=0) if self.heads != self.dim else self.weight

    def forward(self, v: Tensor, q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        self.check_input(v)
        return F.conv2d(v, self.channel_kernels(), self.bias, padding=self.kernel_size // 2, groups=self.dim)

    def matrix(self, v_shape: Sequence[int], q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        if len(v_shape) != 4:
            raise ValueError("a convolution affinity needs a (B, C, H, W) shape to build its matrix")
        return conv_toeplitz(self.weight[:, 0], v_shape[2], v_shape[3]).unsqueeze(0)

    def macs(self, tokens: int) -> int:
        return tokens * self.dim * self.kernel_size ** 2


@register_affinity("dw")
def _build_dw(ctx: AffinityContext, k: Optional[int]) -> Affinity:
    return DepthwiseConvAffinity(ctx["dim"], k or 3)


@register_affinity("mhdw")
def _build_mhdw(ctx: AffinityContext, k: Optional[int]) -> Affinity:
    return DepthwiseConvAffinity(ctx["dim"], k or 3, heads=ctx["heads"])
