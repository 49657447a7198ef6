"""Spatial-reduction attention (PVT, Wang et al. 2021, §3.3 Eq. 2-4; Twins' global sub-sampled attention, Chu et
al. 2021, §3.2; PVTv2's linear SRA, Wang et al. 2022, §3.3): queries at every position attend to keys and values
of a reduced map, A = softmax(Q K_rᵀ/√d)·R with R the reduction operator."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Affinity, merge_heads, split_heads, to_tokens
from .registry import AffinityContext, register_affinity

__all__ = ["SpatialReductionAttention", "strided_toeplitz", "adaptive_pool_matrix", "REDUCTIONS"]

REDUCTIONS = ("conv", "pool")


def strided_toeplitz(kernel: Tensor, in_hw: tuple[int, int], out_hw: tuple[int, int], stride: int,
                     padding: int) -> Tensor:
    """The matrix of a strided, zero-padded 2-D cross-correlation: kernel (..., k, k) -> (..., N_out, N_in), where
    output (Y, X) reads input (Y·s − p + ky, X·s − p + kx) with weight kernel[..., ky, kx] (taps outside the input
    read zeros). The leading dimensions are kept: (C_out, C_in, k, k) gives (C_out, C_in, N_out, N_in)."""
    (h, w), (ho, wo), size = in_hw, out_hw, kernel.shape[-1]
    out = kernel.new_zeros(*kernel.shape[:-2], ho * wo, h * w)
    out_index = torch.arange(ho * wo, device=kernel.device).view(ho, wo)
    for ky in range(size):
        ys = torch.arange(ho, device=kernel.device) * stride - padding + ky
        for kx in range(size):
            xs = torch.arange(wo, device=kernel.device) * stride - padding + kx
            inside = ((ys >= 0) & (ys < h))[:, None] & ((xs >= 0) & (xs < w))[None, :]
            rows = out_index[inside]
            cols = (ys[:, None] * w + xs[None, :])[inside]
            out[..., rows, cols] = kernel[..., ky, kx, None].to(out.dtype)
    return out


def adaptive_pool_matrix(in_hw: tuple[int, int], size: int, device=None, dtype=None) -> Tensor:
    """(size², N) matrix of adaptive average pooling to size×size: output bin i along an axis of length L averages
    positions ⌊i·L/size⌋ … ⌈(i+1)·L/size⌉ − 1 (``F.adaptive_avg_pool2d``'s bins, overlapping when L < size)."""
    def axis(length: int) -> Tensor:
        bins = torch.zeros(size, length, device=device, dtype=dtype)
        for i in range(size):
            start, end = (i * length) // size, -((-(i + 1) * length) // size)
            bins[i, start:end] = 1.0 / (end - start)
        return bins

    rows, cols = axis(in_hw[0]), axis(in_hw[1])
    return torch.einsum("ay,bx->abyx", rows, cols).reshape(size * size, in_hw[0] * in_hw[1])


class SpatialReductionAttention(Affinity):
    """Spatial-reduction attention: ``A_m = softmax(Q_m K_{r,m}ᵀ / √d) · R`` (PVT Eq. 3-4, as an affinity).

    The block projects q, k, v from the full map; the reduction happens here, on k and v:

    - ``reduction="conv"`` (PVT's SR, Twins' GSA): one R×R convolution with stride R (``ratio``) over (position,
      channel) pairs, shared by keys and values as PVT shares its SR; the keys are then LayerNorm-ed. The map is
      zero-padded bottom/right to a multiple of R (paper-silent: PVT's conv drops the remainder; here every position
      is seen). R mixes channels, so :meth:`matrix` is over (position, channel) pairs, (B, 1, N·C, N·C):
      ``A[(n, c'), (i, c)] = Σ_r softmax_{h(c')}[n, r] · W[c', c, ky, kx]`` for i = r's window at tap (ky, kx); the
      conv bias passes through the row-stochastic softmax, so it is :meth:`bias_term`.
    - ``reduction="pool"`` (PVTv2's linear SRA): adaptive average pooling to ``pooled``×``pooled`` (any input
      size, a fixed number of keys: linear in N), LayerNorm on the keys; R is the pooling matrix, so A is
      (B, M, N, N).

    Paper-silent choices: the LayerNorm is on the key path only (PVT normalises the reduced map before both
    projections; a norm on the values would make the output non-linear in V, outside the A·V contract); it has
    no bias (a shift β of every key adds q·β to all of a query's scores, which the softmax removes). PVTv2's 1×1
    conv and GELU after pooling are left to the block's projections. :meth:`forward` scores N × N_r, never N×N.
    """

    dynamic = True
    needs_grid = True

    def __init__(self, dim: int, heads: int, reduction: str = "conv", ratio: int = 4, pooled: int = 7):
        super().__init__(dim, heads)
        if reduction not in REDUCTIONS or ratio < 1 or pooled < 1:
            raise ValueError(f"need reduction in {REDUCTIONS}, ratio >= 1 and pooled >= 1; got {reduction!r}, "
                             f"{ratio}, {pooled}")
        self.reduction, self.ratio, self.pooled = reduction, ratio, pooled
        self.scale = self.head_dim ** -0.5
        self.reduce = nn.Conv2d(dim, dim, ratio, stride=ratio) if reduction == "conv" else None
        self.key_norm = nn.LayerNorm(dim, bias=False)

    def extra_repr(self) -> str:
        size = f"ratio={self.ratio}" if self.reduction == "conv" else f"pooled={self.pooled}"
        return f"dim={self.dim}, heads={self.heads}, reduction={self.reduction}, {size}"

    def reduced_grid(self, height: int, width: int) -> tuple[int, int]:
        if self.reduction == "pool":
            return self.pooled, self.pooled
        return math.ceil(height / self.ratio), math.ceil(width / self.ratio)

    def _reduce(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, N_r, C) reduced tokens."""
        if self.reduce is None:
            return to_tokens(F.adaptive_avg_pool2d(x, self.pooled))
        hr, wr = self.reduced_grid(*x.shape[2:])
        x = F.pad(x, (0, wr * self.ratio - x.shape[3], 0, hr * self.ratio - x.shape[2]))
        return to_tokens(self.reduce(x))

    def forward(self, v: Tensor, q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        if q is None or k is None:
            raise ValueError(f"{type(self).__name__} is dynamic: pass q and k shaped like v")
        self.check_input(v)
        kr = split_heads(self.key_norm(self._reduce(k)), self.heads)
        vr = split_heads(self._reduce(v), self.heads)  # the conv bias rides along: softmax rows sum to one
        out = F.scaled_dot_product_attention(split_heads(q, self.heads).contiguous(), kr, vr, scale=self.scale)
        return merge_heads(out, v.shape)

    def reduced_attention(self, q: Tensor, k: Tensor) -> Tensor:
        """softmax(Q K_rᵀ/√d): (B, M, N, N_r)."""
        kr = split_heads(self.key_norm(self._reduce(k)), self.heads)
        return ((split_heads(q, self.heads) * self.scale) @ kr.transpose(-2, -1)).softmax(-1)

    def reduction_matrix(self, height: int, width: int) -> Tensor:
        """R: (N_r, N) adaptive pooling, or (N_r·C, N·C) for the conv, index n·C + c."""
        reduced = self.reduced_grid(height, width)
        if self.reduce is None:
            return adaptive_pool_matrix((height, width), self.pooled, self.key_norm.weight.device,
                                        self.key_norm.weight.dtype)
        r = strided_toeplitz(self.reduce.weight, (height, width), reduced, self.ratio, 0)  # (C, C, N_r, N)
        return r.permute(2, 0, 3, 1).reshape(reduced[0] * reduced[1] * self.dim, height * width * self.dim)

    def matrix(self, v_shape: Sequence[int], q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        if q is None or k is None or len(v_shape) != 4:
            raise ValueError(f"{type(self).__name__}.matrix() needs a (B, C, H, W) shape, q and k")
        h, w = v_shape[2:]
        s = self.reduced_attention(q, k)
        r = self.reduction_matrix(h, w)
        if self.reduce is None:
            return s @ r
        n, c = h * w, self.dim
        s_channels = s.repeat_interleave(self.head_dim, dim=1)  # (B, C, N, N_r): channel c' uses head h(c')
        a = torch.einsum("bonr,roic->bnoic", s_channels, r.view(-1, c, n, c))
        return a.reshape(s.shape[0], 1, n * c, n * c)

    def bias_term(self) -> Optional[Tensor]:
        return None if self.reduce is None else self.reduce.bias

    def macs(self, tokens: int) -> int:
        if self.reduce is None:
            return 2 * tokens * self.pooled ** 2 * self.dim
        # the R×R stride-R conv on k and v (N·C² each), then N × N/R² scores and aggregation
        return 2 * tokens * self.dim * self.dim + 2 * tokens * math.ceil(tokens / self.ratio ** 2) * self.dim


@register_affinity("sra")
def _build_sra(ctx: AffinityContext, k: Optional[int]) -> Affinity:
    """``sra<R>``: PVT / Twins-GSA reduction ratio R (default 4; PVT uses 8, 4, 2, 1 over its stages)."""
    return SpatialReductionAttention(ctx["dim"], ctx["heads"], "conv", ratio=k or 4)


@register_affinity("sra_pool")
def _build_sra_pool(ctx: AffinityContext, k: Optional[int]) -> Affinity:
    """``sra_pool<P>``: PVTv2's linear SRA, keys and values pooled to P×P (default 7, as PVTv2)."""
    return SpatialReductionAttention(ctx["dim"], ctx["heads"], "pool", pooled=k or 7)
