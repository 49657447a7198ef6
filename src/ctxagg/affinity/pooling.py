"""Pooling attention (MViT, Fan et al. 2021, "Multiscale Vision Transformers", §3.1): queries, keys and values each
pooled by a learned channel-wise convolution before attention; with a query stride the affinity is N_out × N_in."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Affinity, merge_heads
from .reduction import strided_toeplitz
from .registry import AffinityContext, register_affinity

__all__ = ["PoolingAttention"]


class PoolingAttention(Affinity):
    """MViT pooling attention: ``Attn(Q̂, K̂, V̂) = softmax(Q̂ K̂ᵀ/√d) V̂`` with ``Q̂ = LN(P(Q; Θ_Q))``,
    ``K̂ = LN(P(K; Θ_K))``, ``V̂ = P(V; Θ_V)`` (§3.1), each P a k×k channel-wise ("conv", MViT's default) pooling
    with stride s_Q (``q_stride``) or s_KV (``kv_stride``) and padding ⌊k/2⌋, its d kernels shared by the heads
    (as MViT pools the (B·M, d, H, W) head tensors).

    As an affinity on the full-resolution values: ``A_c = softmax(Q̂_h K̂_hᵀ/√d) · P_V,e`` for channel c = (head h,
    head channel e) — V̂'s pooling is channel-wise, so A is per channel, (B, C, N_out, N_in) (:meth:`matrix`).

    - ``q_stride = 1``: N_out = N_in and the output has the input's grid: a square affinity that any block takes
      (the ``pool_attn<s>`` registry entry, s = ``kv_stride``).
    - ``q_stride > 1``: A is N_out × N_in and :meth:`forward` returns the pooled grid :meth:`output_shape`.
      Usable at the operator level and in a block whose residual is pooled the same way (MViT pools the skip
      connection with the query's stride); the registry's blocks add the input back at full resolution, so they
      take only ``q_stride = 1``. ``apply_matrix(matrix(), V, output_shape())`` equals :meth:`forward`.

    Any input size: the output grid is ⌊(H + 2p − k)/s⌋ + 1 per axis. Strides above k skip positions, as MViT's
    kernel 3 with stride 4 or 8 does (their values then get zero weight).

    Paper-silent choices: the LayerNorm is on Q̂ and K̂ only (MViT's code norms V̂ too; that would make the output
    non-linear in V, outside the A·V contract); K̂'s norm has no bias (the softmax removes it); no conv bias;
    kernels start as a k×k average (the pooling MViT's conv replaces) and LayerNorm eps is 1e-5.
    """

    dynamic = True
    needs_grid = True

    def __init__(self, dim: int, heads: int, kv_stride: int = 2, q_stride: int = 1, kernel_size: int = 3):
        super().__init__(dim, heads)
        if kv_stride < 1 or q_stride < 1 or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"need strides >= 1 and an odd kernel, got kv_stride={kv_stride}, q_stride={q_stride}, "
                             f"kernel_size={kernel_size}")
        self.kv_stride, self.q_stride, self.kernel_size = kv_stride, q_stride, kernel_size
        self.scale = self.head_dim ** -0.5
        d = self.head_dim
        self.pool_q, self.pool_k, self.pool_v = (
            nn.Parameter(torch.full((d, 1, kernel_size, kernel_size), 1.0 / kernel_size ** 2)) for _ in range(3))
        self.norm_q = nn.LayerNorm(d)
        self.norm_k = nn.LayerNorm(d, bias=False)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, kv_stride={self.kv_stride}, q_stride={self.q_stride}, "
                f"kernel_size={self.kernel_size}")

    def pooled_grid(self, height: int, width: int, stride: int) -> tuple[int, int]:
        pad = self.kernel_size // 2
        return tuple((size + 2 * pad - self.kernel_size) // stride + 1 for size in (height, width))

    def output_shape(self, v_shape: Sequence[int]) -> tuple[int, ...]:
        return (v_shape[0], v_shape[1], *self.pooled_grid(v_shape[2], v_shape[3], self.q_stride))

    def _pool(self, x: Tensor, kernel: Tensor, stride: int, norm: Optional[nn.LayerNorm]) -> Tensor:
        """(B, C, H, W) -> (B, M, N_pooled, d): per-head channel-wise conv pooling, then the optional LayerNorm."""
        b, c, h, w = x.shape
        pooled = F.conv2d(x.reshape(b * self.heads, self.head_dim, h, w), kernel.to(x.dtype), stride=stride,
                          padding=self.kernel_size // 2, groups=self.head_dim)
        pooled = pooled.reshape(b, self.heads, self.head_dim, -1).transpose(-2, -1)
        return pooled if norm is None else norm(pooled)

    def forward(self, v: Tensor, q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        if q is None or k is None:
            raise ValueError(f"{type(self).__name__} is dynamic: pass q and k shaped like v")
        self.check_input(v)
        qp = self._pool(q, self.pool_q, self.q_stride, self.norm_q)
        kp = self._pool(k, self.pool_k, self.kv_stride, self.norm_k)
        vp = self._pool(v, self.pool_v, self.kv_stride, None)
        out = F.scaled_dot_product_attention(qp, kp, vp, scale=self.scale)
        return merge_heads(out, self.output_shape(v.shape))

    def matrix(self, v_shape: Sequence[int], q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        """(B, C, N_out, N_in): channel c of head h(c), head channel e(c), gets softmax(Q̂_h K̂_hᵀ/√d) · P_V,e."""
        if q is None or k is None or len(v_shape) != 4:
            raise ValueError(f"{type(self).__name__}.matrix() needs a (B, C, H, W) shape, q and k")
        qp = self._pool(q, self.pool_q, self.q_stride, self.norm_q)
        kp = self._pool(k, self.pool_k, self.kv_stride, self.norm_k)
        s = ((qp * self.scale) @ kp.transpose(-2, -1)).softmax(-1)  # (B, M, N_out, N_kv)
        h, w = v_shape[2:]
        pool_v = strided_toeplitz(self.pool_v[:, 0], (h, w), self.pooled_grid(h, w, self.kv_stride),
                                  self.kv_stride, self.kernel_size // 2)  # (d, N_kv, N_in)
        a = torch.einsum("bmok,ekn->bmeon", s, pool_v.to(s.dtype))
        return a.reshape(s.shape[0], self.dim, s.shape[2], h * w)

    def macs(self, tokens: int) -> int:
        kv_tokens = -(-tokens // self.kv_stride ** 2)
        q_tokens = -(-tokens // self.q_stride ** 2)
        pooling = (q_tokens + 2 * kv_tokens) * self.kernel_size ** 2 * self.dim
        return pooling + 2 * q_tokens * kv_tokens * self.dim


@register_affinity("pool_attn")
def _build_pool_attn(ctx: AffinityContext, k: Optional[int]) -> Affinity:
    """``pool_attn<s>``: MViT pooling attention with key/value stride s (default 2) and query stride 1."""
    return PoolingAttention(ctx["dim"], ctx["heads"], kv_stride=k or 2, q_stride=1)
