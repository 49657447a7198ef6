"""Depth-wise self-attention (vit_as_dynamic_conv.txt §4.3, Eq. 5): ``o_i = q_i ⊙ k̄_i + p_i k``.

The value bank is discarded; the keys play the role of V. Written as an affinity applied to K,
``o = A·K`` with one N×N matrix per channel (the element-wise product makes A channel-dependent)::

    A_c[i, j] = q_i[c] · s_ij / |S_i|  +  p_{h(c)}[i, j]

where ``s_ij = 1`` if key j is among the keys selected by query i (all tokens for DeiT, the local
window — and, in a shifted window, the same region — for Swin) and ``p_h`` is the relative-position
term of head ``h(c) = c // (C / M)``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Affinity, apply_matrix, from_tokens, merge_heads, split_heads, to_tokens, token_count
from .registry import AffinityContext, register_affinity

__all__ = ["DepthwiseSelfAttention"]


class DepthwiseSelfAttention(Affinity):
    """Depth-wise self-attention, Eq. 5 of "Vision Transformers are Dynamic Convolutions" (§4.3).

    ``forward(v, q, attn_bias=None, select=None)`` with ``v`` = the keys K (the value bank is gone):

    - ``select`` (B or 1, 1, N, N), optional 0/1: the keys each query selects; None = all N tokens
      (a plain mean, O(N·C)). Given, ``k̄_i`` is a normalised matmul ``(S / rowsum(S)) @ K``.
    - ``attn_bias`` (B or 1, M, N_b, N_b), optional: the relative-position term ``p`` of ``M = pos_heads``
      heads, applied to the *last* N_b tokens (leading class tokens get none; paper-silent, matches the
      Table 3 activation counts). Where ``select`` is given, ``p`` is zeroed outside the selection
      (paper-silent: a shifted Swin window never mixes regions, as the attention mask does for softmax).

    ``heads`` is ``dim``: the matrix is per channel, shape (B, C, N, N).
    """

    dynamic = True
    uses_value = False  # blocks project only q and k (Eq. 5 discards the value kernel bank)

    def __init__(self, dim: int, pos_heads: int = 1):
        super().__init__(dim, dim)
        if dim % pos_heads:
            raise ValueError(f"dim={dim} is not divisible by pos_heads={pos_heads}")
        self.pos_heads = pos_heads

    def extra_repr(self) -> str:
        return f"dim={self.dim}, pos_heads={self.pos_heads}"

    @staticmethod
    def _weights(select: Tensor, dtype: torch.dtype) -> Tensor:
        """Row-normalised selection (B or 1, N, N): averaging weights 1/|S_i| over the selected keys."""
        s = select[:, 0].to(dtype)
        return s / s.sum(-1, keepdim=True).clamp_min(1)

    def _rel_bias(self, attn_bias: Tensor, select: Optional[Tensor], n: int) -> Tensor:
        nb = attn_bias.shape[-1]
        if select is not None:
            attn_bias = attn_bias * select[..., n - nb:, n - nb:].to(attn_bias.dtype)
        return attn_bias

    def forward(self, v: Tensor, q: Optional[Tensor] = None, k: Optional[Tensor] = None,
                attn_bias: Optional[Tensor] = None, select: Optional[Tensor] = None) -> Tensor:
        if q is None:
            raise ValueError("DepthwiseSelfAttention is dynamic: pass q (and the keys as v)")
        if k is not None and k is not v:
            raise ValueError("DepthwiseSelfAttention aggregates the keys: pass them as v (k=None or k=v)")
        self.check_input(v)
        kt, qt = to_tokens(v), to_tokens(q)
        n = kt.shape[1]
        if select is None:
            k_bar = kt.mean(1, keepdim=True)  # every query selects all keys: one averaged kernel
        else:
            k_bar = self._weights(select, kt.dtype) @ kt  # per-query averaged kernel
        out = qt * k_bar
        if attn_bias is not None:
            nb = attn_bias.shape[-1]
            p = self._rel_bias(attn_bias, select, n).to(kt.dtype)
            rel = merge_heads(p @ split_heads(kt[:, n - nb:], self.pos_heads), (0, nb, 0))
            out = out + F.pad(rel, (0, 0, n - nb, 0))  # class tokens first: zero term (no branch for torch.fx)
        return from_tokens(out, v.shape)

    def matrix(self, v_shape: Sequence[int], q: Optional[Tensor] = None, k: Optional[Tensor] = None,
               attn_bias: Optional[Tensor] = None, select: Optional[Tensor] = None) -> Tensor:
        if q is None:
            raise ValueError("DepthwiseSelfAttention is dynamic: matrix() needs q")
        qt = to_tokens(q)
        n = token_count(v_shape)
        w = qt.new_full((1, n, n), 1.0 / n) if select is None else self._weights(select, qt.dtype)
        a = qt.transpose(1, 2).unsqueeze(-1) * w.unsqueeze(1)  # (B, C, N, N): q_i[c] / |S_i| on selected j
        if attn_bias is not None:
            nb = attn_bias.shape[-1]
            p = self._rel_bias(attn_bias, select, n).to(qt.dtype)
            p = p.repeat_interleave(self.dim // self.pos_heads, dim=1)  # head h -> its C/M channels
            a = a + F.pad(p, (n - nb, 0, n - nb, 0))
        return a

    def reference(self, v: Tensor, q: Optional[Tensor] = None, k: Optional[Tensor] = None,
                  attn_bias: Optional[Tensor] = None, select: Optional[Tensor] = None) -> Tensor:
        """``A·K`` through the explicit per-channel matrix (slow; for tests and analysis)."""
        return apply_matrix(self.matrix(v.shape, q, k, attn_bias=attn_bias, select=select), v)

    def macs(self, tokens: int) -> int:
        """q ⊙ k̄ and the mean (2·N·C) plus the relative term p·K (N²·C); element-wise MACs included."""
        return 2 * tokens * self.dim + tokens * tokens * self.dim


@register_affinity("dw_sa")
def _build_dw_sa(ctx: AffinityContext, k: Optional[int]) -> Affinity:
    return DepthwiseSelfAttention(ctx["dim"], ctx.get("heads", 1))
