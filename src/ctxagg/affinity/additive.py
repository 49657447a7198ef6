"""Attention through global vectors, linear in N: Fastformer's additive attention (Wu et al. 2021, §3.2) and MobileViTv2's separable self-attention (Mehta & Rastegari 2022, §3.2).

Neither forms pairwise scores. Both pool the tokens into one global vector per head with softmax weights over
positions, then multiply it element-wise into every token. Written as ``A·V``:

- Fastformer: the global key ``g`` multiplies the values, ``u_i = g ⊙ v_i``, so ``A_c = g_c·I``: a *diagonal*
  matrix per channel (one input-dependent gain, the same at every position). Read as a function of the keys
  instead, ``u_i = v_i ⊙ Q ⊙ Σ_j β_j k_j`` is the rank-one ``1·βᵀ`` of key-only attention
  (:class:`~ctxagg.affinity.KeyOnlyAttention`, LinGlos Eq. 2-3) with keys modulated by the global query Q.
- Separable: ``y_i = ReLU(v_i) ⊙ Σ_j cs_j k_j``, linear in the keys: ``A_c = ReLU(v[:, c])·csᵀ``, *rank one*
  per channel (every row the same context scores, scaled per position) — key-only attention with a ReLU gate
  and a saliency read from its own projection.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Affinity, from_tokens, split_heads, to_tokens, token_count
from .registry import AffinityContext, register_affinity

__all__ = ["AdditiveAttention", "SeparableSelfAttention"]


def _pool(weights_from: Tensor, vector: Tensor, pooled: Tensor, scale: float) -> Tensor:
    """Σ_i softmax_i(x_i·w·scale) p_i per head: x, p (B, M, N, d), w (M, d) -> (B, M, d)."""
    logits = (weights_from @ vector.unsqueeze(-1)).squeeze(-1) * scale
    return (logits.softmax(-1).unsqueeze(-2) @ pooled).squeeze(-2)


class _GlobalVectorAttention(Affinity):
    """Shared plumbing: ``attn_heads`` M groups the pooling weights; the matrix is per channel (``heads`` = C)."""

    dynamic = True

    def __init__(self, dim: int, heads: int):
        if dim % heads:
            raise ValueError(f"dim={dim} is not divisible by heads={heads}")
        super().__init__(dim, dim)
        self.attn_heads = heads

    def extra_repr(self) -> str:
        return f"dim={self.dim}, attn_heads={self.attn_heads}"

    def _heads(self, *tensors: Tensor) -> list[Tensor]:
        return [split_heads(t, self.attn_heads) for t in tensors]

    def _per_channel(self, g: Tensor) -> Tensor:
        """(B, M, d) -> (B, C) in channel order c = m·d + e."""
        return g.reshape(g.shape[0], self.dim)

    slots = "q and k"

    def _needs(self, q: Optional[Tensor], k: Optional[Tensor]) -> None:
        if q is None or k is None:
            raise ValueError(f"{type(self).__name__} is dynamic: pass {self.slots} shaped like the values")


class AdditiveAttention(_GlobalVectorAttention):
    """Fastformer's additive attention (Wu et al. 2021, §3.2), per head h of d = C/M channels:

        α_i = softmax_i(w_qᵀ q_i / √d),  Q = Σ_i α_i q_i          (global query)
        p_i = Q ⊙ k_i,  β_i = softmax_i(w_kᵀ p_i / √d),  g = Σ_i β_i p_i   (global key)
        u_i = g ⊙ v_i                                             (key-value interaction)

    so ``A_c = g_c·I`` (N×N per channel, diagonal; ``matrix()`` shows it). No N×N tensor in ``forward``: O(N·C).

    Split with the block: Fastformer's output is ``W_r u_i + q_i`` (a transform, then a query skip). The block's
    ``proj_out`` plays W_r; the query skip is not ``A·V`` and is left out (the block's residual carries the
    input). The official code also shares W_q with W_v; here they are the block's
    separate projections. Per-head weights read the head's own channels, as the equations (the official
    code's ``query_att`` reads all C).
    """

    def __init__(self, dim: int, heads: int = 1):
        super().__init__(dim, heads)
        d = dim // heads
        self.query_vector = nn.Parameter(torch.empty(heads, d))  # w_q
        self.key_vector = nn.Parameter(torch.empty(heads, d))  # w_k
        self.scale = d ** -0.5
        for p in (self.query_vector, self.key_vector):
            nn.init.trunc_normal_(p, std=0.02)  # paper-silent: near-uniform pooling at the start

    def global_key(self, q: Tensor, k: Tensor) -> Tensor:
        """The global key g per channel, (B, C)."""
        qh, kh = self._heads(q, k)
        global_query = _pool(qh, self.query_vector, qh, self.scale)  # Q, (B, M, d)
        p = kh * global_query.unsqueeze(-2)
        return self._per_channel(_pool(p, self.key_vector, p, self.scale))

    def forward(self, v: Tensor, q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        self._needs(q, k)
        self.check_input(v)
        g = self.global_key(q, k)
        return v * (g.view(*g.shape, 1, 1) if v.ndim == 4 else g.unsqueeze(1))

    def matrix(self, v_shape: Sequence[int], q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        """(B, C, N, N): g_c times the identity."""
        self._needs(q, k)
        eye = torch.eye(token_count(v_shape), dtype=q.dtype, device=q.device)
        return self.global_key(q, k)[:, :, None, None] * eye

    def macs(self, tokens: int) -> int:
        # two logit sets and two pools (4·N·C), Q ⊙ k and g ⊙ v (2·N·C)
        return 6 * tokens * self.dim


class SeparableSelfAttention(_GlobalVectorAttention):
    """MobileViTv2's separable self-attention (Mehta & Rastegari 2022, §3.2), per head:

        cs = softmax_j(I_j),  I_j = w_Iᵀ s_j        (context scores from the input's one-channel branch)
        c_v = Σ_j cs_j k_j                          (context vector)
        y_i = ReLU(v_i) ⊙ c_v                       (before the output projection W_O = the block's proj_out)

    ``y`` is linear in the keys, so the roles follow :class:`~ctxagg.affinity.KeyOnlyAttention`'s, filling the
    (v, q, k) slots: ``aggregated`` = the paper's K (what is pooled), ``gate`` = the paper's V (ReLU'd, multiplied
    in), ``saliency_input`` = s, whose projection gives I. ``A_c[i, j] = ReLU(gate_i[c])·cs_{h(c)}[j]``: rank one
    per channel. No N×N tensor in ``forward``: O(N·C).

    Paper-silent / choices: the paper's W_I (C→1) is the block's projection of s followed by w_I (a factored C→1
    map; its bias would cancel in the softmax); I is not scaled, as in the paper; MobileViTv2 has one head,
    ``heads`` > 1 gives each head its own scores.
    """

    slots = "the gate (q slot) and the saliency input (k slot)"

    def __init__(self, dim: int, heads: int = 1):
        super().__init__(dim, heads)
        self.saliency = nn.Parameter(torch.empty(heads, dim // heads))  # w_I
        nn.init.trunc_normal_(self.saliency, std=0.02)

    def context_scores(self, saliency_input: Tensor) -> Tensor:
        """cs = softmax over positions of I, (B, M, N)."""
        (sh,) = self._heads(saliency_input)
        return (sh @ self.saliency.unsqueeze(-1)).squeeze(-1).softmax(-1)

    def forward(self, aggregated: Tensor, gate: Optional[Tensor] = None,
                saliency_input: Optional[Tensor] = None) -> Tensor:
        self._needs(gate, saliency_input)
        self.check_input(aggregated)
        (kh,) = self._heads(aggregated)
        context = self._per_channel((self.context_scores(saliency_input).unsqueeze(-2) @ kh).squeeze(-2))
        return from_tokens(F.relu(to_tokens(gate)) * context.unsqueeze(1), aggregated.shape)

    def matrix(self, v_shape: Sequence[int], gate: Optional[Tensor] = None,
               saliency_input: Optional[Tensor] = None) -> Tensor:
        """(B, C, N, N): the outer product ReLU(gate[:, c]) · cs_{h(c)}ᵀ, applied to the aggregated keys."""
        self._needs(gate, saliency_input)
        scores = self.context_scores(saliency_input).repeat_interleave(self.dim // self.attn_heads, dim=1)
        return F.relu(to_tokens(gate)).transpose(1, 2).unsqueeze(-1) * scores.unsqueeze(-2)

    def macs(self, tokens: int) -> int:
        return 3 * tokens * self.dim  # saliency logits, context pooling, gating


@register_affinity("additive")
def _build_additive(ctx: AffinityContext, k: Optional[int]) -> Affinity:
    return AdditiveAttention(ctx["dim"], ctx["heads"])


@register_affinity("separable")
def _build_separable(ctx: AffinityContext, k: Optional[int]) -> Affinity:
    return SeparableSelfAttention(ctx["dim"], ctx["heads"])
