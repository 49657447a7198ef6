"""Key-only attention (LinGlos §3.1, Eq. 2-4): attention weights from the keys alone, linear in N."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .base import Affinity, split_heads
from .registry import AffinityContext, register_affinity

__all__ = ["KeyOnlyAttention"]


def _tokens(x: Tensor) -> Tensor:
    """(B, C, H, W) or (B, N, C) -> (B, N, C)."""
    return x.flatten(2).transpose(1, 2) if x.ndim == 4 else x


def _like(t: Tensor, like_shape: Sequence[int]) -> Tensor:
    """(B, N, C) back to the layout of ``like_shape``."""
    if len(like_shape) == 4:
        b, c, h, w = like_shape
        return t.transpose(1, 2).reshape(b, c, h, w)
    return t


class KeyOnlyAttention(Affinity):
    """Key-only attention, LinGlos §3.1: ``Z = (G ⊙ V) U1 + K`` with ``G = Σ_i A_i K_i`` (Eq. 3) and
    ``A = softmax(K W_saliency / √d)`` over all N positions (Eq. 2), per head. No N×N tensor is built:
    time and memory are O(N·C).

    Split of Eq. 4 between block and affinity: the block owns W_K, W_V (its ``proj_in``) and U2 (its
    ``proj_out``); this module owns W_saliency and U1 and adds the K skip, i.e. it returns the inner
    bracket of Eq. 4, so ``proj_out(affinity(...))`` is the paper's Y.

    Roles in the affinity contract ``forward(v, q, k)``:
      - ``k``: the saliency source (the paper's K, Eq. 2); defaults to ``v``;
      - ``v``: what is aggregated across positions (the paper's K again: G is a weighted sum of keys);
      - ``q``: the per-position gate that meets the global context (the paper's V, which plays a query's
        role: it is the only per-position input interacting with G). The LinGlo block passes (K, V, K).

    ``matrix()`` — the decomposition. Given (k, q), the output is linear in v. Per head h(c) of channel c
    and with U1[c, c'] mapping channel c to c', over (position, channel) pairs (index n·C + c)::

        Z[n, c'] = Σ_i Σ_c  a_h(c)[i] · q[n, c] · U1[c, c'] · v[i, c]  +  v[n, c']  +  b1[c']
        M[(n, c'), (i, c)] = a_h(c)[i] · q[n, c] · U1[c, c']  +  δ_ni δ_cc'

    The first term is the dynamic affinity: the rank-one spatial matrix 1·a_hᵀ (every position uses the
    same saliency weights — attention without a query), gated per position by q and mixed by U1; the second
    is the identity (the K skip of Eq. 4); U1's bias is :meth:`bias_term`. U1 mixes heads, so the matrix
    has one head and shape (B, 1, N·C, N·C): for tests and small-N analysis only.
    :meth:`attention_weights` gives the N-vector A of Eq. 2 for inspection.

    Paper-silent choices: the softmax scale uses the head dimension d = C/M (the paper's √D for one head);
    W_saliency has no bias (it would cancel in the softmax over positions); U1 has a bias like the other
    linear layers.
    """

    dynamic = True

    def __init__(self, dim: int, heads: int = 1):
        super().__init__(dim, heads)
        self.saliency = nn.Parameter(torch.empty(heads, self.head_dim))  # W_saliency, D -> 1 per head
        self.u1 = nn.Linear(dim, dim)
        self.scale = self.head_dim ** -0.5
        nn.init.trunc_normal_(self.saliency, std=0.02)  # small: starts near uniform weights (average pooling)
        nn.init.trunc_normal_(self.u1.weight, std=0.02)
        nn.init.zeros_(self.u1.bias)

    def attention_weights(self, k: Tensor) -> Tensor:
        """A = softmax(K W_saliency / √d) over positions (Eq. 2), shape (B, heads, N)."""
        logits = (split_heads(k, self.heads) @ self.saliency.unsqueeze(-1)).squeeze(-1)
        return (logits * self.scale).softmax(dim=-1)

    def _check(self, v: Tensor, q: Optional[Tensor], k: Optional[Tensor]) -> Tensor:
        if q is None:
            raise ValueError("KeyOnlyAttention needs the gate q (the paper's V); pass q shaped like v")
        self.check_input(v)
        k = v if k is None else k
        if q.shape != v.shape or k.shape != v.shape:
            raise ValueError(f"q and k must be shaped like v {tuple(v.shape)}, got {tuple(q.shape)}, {tuple(k.shape)}")
        return k

    def forward(self, v: Tensor, q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        k = self._check(v, q, k)
        a = self.attention_weights(k)  # (B, M, N)
        context = a.unsqueeze(-2) @ split_heads(v, self.heads)  # G, Eq. 3: (B, M, 1, d)
        gated = split_heads(q, self.heads) * context  # G ⊙ V: (B, M, N, d)
        b, m, n, d = gated.shape
        z = self.u1(gated.transpose(1, 2).reshape(b, n, m * d)) + _tokens(v)
        return _like(z, v.shape)

    def matrix(self, v_shape: Sequence[int], q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        """(B, 1, N·C, N·C): the dynamic affinity plus the identity, over (position, channel) pairs."""
        if q is None or k is None:
            raise ValueError("KeyOnlyAttention is dynamic: matrix() needs q (the gate) and k (the saliency source)")
        a = self.attention_weights(k).repeat_interleave(self.head_dim, dim=1)  # (B, C, N): a_h(c)[i]
        gate = _tokens(q)  # (B, N, C): q[n, c]
        m = torch.einsum("bci,bnc,dc->bndic", a, gate, self.u1.weight)  # [b, n, c', i, c]
        b, n, c = gate.shape
        m = m.reshape(b, n * c, n * c)
        m = m + torch.eye(n * c, dtype=m.dtype, device=m.device)
        return m.unsqueeze(1)

    def bias_term(self) -> Optional[Tensor]:
        return self.u1.bias

    def macs(self, tokens: int) -> int:
        # saliency logits N·C, weighted sum of keys N·C, U1 N·C² (the ⊙ gate is element-wise, not counted)
        return tokens * self.dim * (self.dim + 2)


@register_affinity("key_only")
def _key_only(ctx: AffinityContext, kernel: Optional[int]) -> Affinity:
    return KeyOnlyAttention(ctx["dim"], ctx["heads"])
