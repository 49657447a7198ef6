"""Dynamic convolutions as affinities: the ConvNet rows of ViT-as-DynConv Table 1 (§3.3, Figure 3).

- :class:`DynamicConvAffinity` — Dynamic Convolution (Chen et al., CVPR 2020, the paper's [4]; CondConv is the
  same mixture with sigmoid gates): K static k×k C→C kernels mixed per image by attention π(x),
  ``W̃(x) = Σ_k π_k(x) W_k``, so ``A(x) = Σ_k π_k(x) Toeplitz(W_k)`` over (position, channel) pairs.
- :class:`DynamicDepthwiseConv` — dynamic depth-wise convolution (Han et al., ICLR 2022, the paper's [11]):
  one k×k kernel per channel generated from the globally pooled input, a banded per-channel affinity.

Both generate their kernels from a map ``q``; in a block ``q`` is the values themselves (the papers' form:
the kernels come from the input they convolve), so the block projects V only (``kernels_from_values``) and
passes it twice. ``forward`` is a grouped convolution with per-image weights (the batch folded into the
groups): nothing N×N is formed; ``matrix(v_shape, q)`` rebuilds the same per-image kernels from ``q``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Affinity
from .depthwise import ChannelBias, conv_toeplitz
from .registry import AffinityContext, register_affinity

__all__ = ["per_image_conv", "PooledGenerator", "DynamicConvAffinity", "DynamicDepthwiseConv"]


def per_image_conv(v: Tensor, weight: Tensor, padding: int, groups: int) -> Tensor:
    """Stride-1 zero-padded convolution of each image ``v[b]`` (B, C, H, W) with its own kernels ``weight[b]``
    (B, C, C/groups, k, k): the batch folded into the groups of one convolution (no shape unpacking, so torch.fx
    traces it as one ``conv2d`` node)."""
    out = F.conv2d(v.flatten(0, 1).unsqueeze(0), weight.flatten(0, 1), padding=padding, groups=v.shape[0] * groups)
    return out.reshape_as(v)


class PooledGenerator(nn.Module):
    """``fc2(ReLU(norm(fc1(mean_{y,x} q))))``: the squeeze-and-excitation branch both papers use to turn a
    (B, C, H, W) map into B vectors of ``out`` numbers (Chen et al. Fig. 3: avg pool → FC → ReLU → FC; Han et
    al.'s code puts a BatchNorm after the first layer, which then has no bias). The hidden width is C/4 (both)."""

    def __init__(self, dim: int, out: int, batch_norm: bool):
        super().__init__()
        hidden = max(1, dim // 4)
        self.fc1 = nn.Linear(dim, hidden, bias=not batch_norm)  # a bias before BatchNorm would cancel
        self.norm = nn.BatchNorm1d(hidden) if batch_norm else nn.Identity()
        self.fc2 = nn.Linear(hidden, out)

    def forward(self, q: Tensor) -> Tensor:
        batch_norm_in_training = self.training and isinstance(self.norm, nn.BatchNorm1d)
        if batch_norm_in_training and not isinstance(q, torch.fx.Proxy) and q.shape[0] < 2:
            raise ValueError("the kernel generator's BatchNorm normalises over the batch's pooled maps (Han et al.): "
                             "training needs a batch of at least 2 images; eval mode takes any batch")
        return self.fc2(F.relu(self.norm(self.fc1(q.mean((2, 3))))))


class _PerImageConv(ChannelBias, Affinity):
    """Shared contract of the dynamic convolutions: ``forward(v, q=None)`` convolves ``v`` (B, C, H, W) with
    kernels generated from ``q`` (None: from ``v`` itself), zero 'same' padding, stride 1, any H×W; plus a
    static per-channel bias. Subclasses give :meth:`kernels` (B, C, C_in/groups, k, k) and the groups."""

    dynamic = True
    needs_grid = True
    uses_value = False  # a block passes (the map to convolve, the map the kernels come from), no separate k
    kernels_from_values = True  # ... and both are the values: the block projects V only and passes it twice
    groups = 1  # groups of the convolution of one image

    def __init__(self, dim: int, heads: int, kernel_size: int, bias: bool):
        super().__init__(dim, heads)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive for a 'same' convolution, got {kernel_size}")
        self.kernel_size = kernel_size
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def kernels(self, q: Tensor) -> Tensor:
        raise NotImplementedError

    def _source(self, v_shape: Sequence[int], q: Optional[Tensor]) -> Tensor:
        if q is None:
            raise ValueError(f"{type(self).__name__}.matrix() needs q, the map the kernels are generated from "
                             "(in a block: the values themselves, matrix(v.shape, v))")
        if tuple(q.shape) != tuple(v_shape):
            raise ValueError(f"{type(self).__name__}: the map the kernels come from (q) must be shaped like the "
                             f"values {tuple(v_shape)}, got {tuple(q.shape)}")
        return q

    def forward(self, v: Tensor, q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        if k is not None and k is not v:
            raise ValueError(f"{type(self).__name__} takes (v, q): the values and the map its kernels come from; "
                             "there is no separate key tensor")
        self.check_input(v)
        weight = self.kernels(v if q is None or q is v else self._source(v.shape, q))  # (B, C, C_in/g, k, k)
        return self.add_bias(per_image_conv(v, weight, self.kernel_size // 2, self.groups), self.bias)


class DynamicConvAffinity(_PerImageConv):
    """Dynamic convolution, Chen et al. 2020 Eq. 1-3: ``y = W̃(x)ᵀ x`` with ``W̃(x) = Σ_k π_k(x) W_k``,
    ``π(x) = softmax(fc2(ReLU(fc1(avgpool(x)))) / τ)`` over the K kernels of a static bank (ViT-as-DynConv
    Table 1: static bank, soft selection, C→C, 3×3). The affinity relates (position, channel) pairs, one matrix
    per image: ``A(x) = Σ_k π_k(x) Toeplitz(W_k)``, (B, 1, N·C, N·C), index ``n·C + c`` (as ``conv``).

    Choices where the contract or paper is silent: the kernels' biases are not mixed (Σ_k π_k b_k would be a
    per-image offset, which ``A·V + bias`` cannot hold; the convolutions Chen et al. replace sit before BatchNorm)
    — one static per-channel bias instead, as the ``conv`` affinity. ``temperature`` τ is a plain attribute:
    Chen et al. anneal it from 30 to 1 over the first 10 epochs, which a training loop may do; default 1.
    """

    mixes_channels = True

    def __init__(self, dim: int, kernel_size: int = 3, kernels: int = 4, temperature: float = 1.0,
                 bias: bool = True):
        super().__init__(dim, 1, kernel_size, bias)
        if kernels < 1:
            raise ValueError(f"a dynamic convolution needs at least one kernel in its bank, got kernels={kernels}")
        self.temperature = float(temperature)
        self.bank = nn.Parameter(torch.empty(kernels, dim, dim, kernel_size, kernel_size))
        self.attention = PooledGenerator(dim, kernels, batch_norm=False)
        for kernel in self.bank.data:
            nn.init.kaiming_uniform_(kernel, a=5 ** 0.5)  # each kernel as nn.Conv2d initialises its weight
        if self.bias is not None:
            bound = (dim * kernel_size ** 2) ** -0.5
            nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, kernel_size={self.kernel_size}, kernels={self.bank.shape[0]}, "
                f"temperature={self.temperature}")

    def coefficients(self, q: Tensor) -> Tensor:
        """π(q): (B, K) attention over the bank's kernels, rows summing to 1."""
        return (self.attention(q) / self.temperature).softmax(dim=-1)

    def kernels(self, q: Tensor) -> Tensor:
        return torch.einsum("bk,koihw->boihw", self.coefficients(q), self.bank)

    def matrix(self, v_shape: Sequence[int], q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        weight = self.kernels(self._source(v_shape, q))  # (B, C_out, C_in, k, k); k is unused (no key tensor)
        b, c, h, w = weight.shape[0], self.dim, v_shape[2], v_shape[3]
        per_pair = conv_toeplitz(weight.reshape(b * c * c, self.kernel_size, self.kernel_size), h, w)
        blocks = per_pair.view(b, c, c, h * w, h * w).permute(0, 3, 1, 4, 2)  # (b, n_out, c_out, n_in, c_in)
        return blocks.reshape(b, 1, h * w * c, h * w * c)

    def macs(self, tokens: int) -> int:
        """The convolution N·C²·k², mixing the bank K·C²·k², the attention branch (pooling N·C, two FCs)."""
        kernels, taps, hidden = self.bank.shape[0], self.kernel_size ** 2, self.attention.fc1.out_features
        return (tokens + kernels) * self.dim ** 2 * taps + tokens * self.dim + hidden * (self.dim + kernels)


class DynamicDepthwiseConv(_PerImageConv):
    """Dynamic depth-wise convolution, Han et al. 2022 ("dynamic weight"; their D-DWNet): per image, one
    k×k kernel per channel, ``Ker(x) = fc2(ReLU(BN(fc1(avgpool(x)))))`` reshaped (C, k, k) — output
    ``c·k² + ky·k + kx`` of fc2 is ``Ker[c, ky, kx]`` — then a depth-wise convolution with a static bias
    (initialised to 0, as their code). The affinity is banded, one N×N matrix per image and channel:
    (B, C, N, N). ViT-as-DynConv Table 1 gives no kernel bank or selection ("N/A"): every image gets its own
    kernels, shared by all positions (Han et al.'s homogeneous form; their inhomogeneous per-position variant
    is not this operator). The generator's BatchNorm uses the batch's statistics in training, as theirs.
    """

    groups = property(lambda self: self.dim)  # depth-wise: one group per channel

    def __init__(self, dim: int, kernel_size: int = 7, bias: bool = True):
        super().__init__(dim, dim, kernel_size, bias)
        self.generator = PooledGenerator(dim, dim * kernel_size ** 2, batch_norm=True)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kernel_size={self.kernel_size}"

    def kernels(self, q: Tensor) -> Tensor:
        return self.generator(q).view(-1, self.dim, 1, self.kernel_size, self.kernel_size)

    def matrix(self, v_shape: Sequence[int], q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        weight = self.kernels(self._source(v_shape, q))  # k: unused (no key tensor)
        b, h, w = weight.shape[0], v_shape[2], v_shape[3]
        a = conv_toeplitz(weight.reshape(b * self.dim, self.kernel_size, self.kernel_size), h, w)
        return a.view(b, self.dim, h * w, h * w)

    def macs(self, tokens: int) -> int:
        """The convolution N·C·k², pooling N·C, the generator's two FCs (C·C/4 + C/4·C·k²)."""
        taps, hidden = self.kernel_size ** 2, self.generator.fc1.out_features
        return tokens * self.dim * (taps + 1) + hidden * self.dim * (1 + taps)


@register_affinity("dynamic_conv")
def _build_dynamic_conv(ctx: AffinityContext, k: Optional[int]) -> Affinity:
    return DynamicConvAffinity(ctx["dim"], k or 3)  # Chen et al.: K = 4 kernels; 3×3 as Table 1


@register_affinity("dynamic_dw")
def _build_dynamic_dw(ctx: AffinityContext, k: Optional[int]) -> Affinity:
    return DynamicDepthwiseConv(ctx["dim"], k or 7)  # 7×7 as Table 1 / Han et al.'s Swin-T setting
