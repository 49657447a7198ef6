"""Disentangled non-local attention (DNL, Yin et al. 2020, §3): a whitened pairwise term plus a
separate unary (saliency) term, each with its own softmax."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Affinity, merge_heads, split_heads
from .registry import AffinityContext, register_affinity

__all__ = ["DisentangledNonLocal"]


class DisentangledNonLocal(Affinity):
    """DNL per head (d = C/M channels), μ_q, μ_k the means of the queries and keys over all positions:

        A[i, j] = softmax_j((q_i − μ_q)·(k_j − μ_k) / √d)  +  softmax_j(w_mᵀ k_j)
                  ───────── whitened pairwise ──────────     ─── unary ───

    Why (DNL §3): a non-local logit splits as ``q_i·k_j = (q_i − μ_q)·(k_j − μ_k) + μ_q·k_j + (terms constant in
    j)``, so ``softmax(QKᵀ)`` is one softmax of the pairwise term plus a unary term μ_q·k_j that is the same for
    every query: the two are coupled in a product of experts. DNL gives each its own softmax and sums them (rows
    of A sum to 2), and learns the unary logit from its own weights instead of μ_q.

    The unary term is rank one (``1·uᵀ``: every query gets the same saliency weights over the keys) — the key-only
    attention of LinGlos (:class:`~ctxagg.affinity.KeyOnlyAttention`), GCNet's global context. LESA's "unary" is
    a different object: LESA (lesa.txt Eq. 2) splits attention into the query's weight on *itself* (the diagonal
    ``S_ii v_i``, replaced by a convolution) and the binary rest; DNL's unary is a column pattern, LESA's a
    diagonal/local band. ``tests/test_generators.py`` checks both shapes.

    ``forward`` runs the pairwise term through the fused attention kernel and the unary term as one weighted sum,
    O(N²·C) time and O(N·C) memory. Choices: the unary logit reads the block's key projection through a per-head
    vector w_m (DNL's separate W_m on the input, factored; no bias: it would cancel in the softmax) and is not
    scaled; the pairwise logits are scaled by 1/√d (the reference code's default ``use_scale``; its extra
    temperature is absorbed by the learned projections).
    """

    dynamic = True

    def __init__(self, dim: int, heads: int):
        super().__init__(dim, heads)
        self.unary = nn.Parameter(torch.empty(heads, self.head_dim))  # w_m
        nn.init.trunc_normal_(self.unary, std=0.02)
        self.scale = self.head_dim ** -0.5

    def unary_weights(self, kh: Tensor) -> Tensor:
        """softmax_j(w_mᵀ k_j), (B, M, N)."""
        return (kh @ self.unary.unsqueeze(-1)).squeeze(-1).softmax(-1)

    @staticmethod
    def whiten(x: Tensor) -> Tensor:
        """Subtract the mean over positions, per head and channel: (B, M, N, d)."""
        return x - x.mean(-2, keepdim=True)

    def forward(self, v: Tensor, q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        if q is None or k is None:
            raise ValueError("DisentangledNonLocal is dynamic: pass q and k shaped like v")
        self.check_input(v)
        qh, kh, vh = (split_heads(t, self.heads) for t in (q, k, v))
        # fused kernels need a unit-stride head dim (a (B, C, H, W) map splits with stride H·W)
        pairwise = F.scaled_dot_product_attention(*(t.contiguous() for t in (self.whiten(qh), self.whiten(kh), vh)),
                                                  scale=self.scale)
        unary = self.unary_weights(kh).unsqueeze(-2) @ vh  # (B, M, 1, d): the same for every query
        return merge_heads(pairwise + unary, v.shape)

    def matrix(self, v_shape: Sequence[int], q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        if q is None or k is None:
            raise ValueError("DisentangledNonLocal is dynamic: matrix() needs q and k")
        qh, kh = split_heads(q, self.heads), split_heads(k, self.heads)
        pairwise = ((self.whiten(qh) * self.scale) @ self.whiten(kh).transpose(-2, -1)).softmax(-1)
        return pairwise + self.unary_weights(kh).unsqueeze(-2)

    def macs(self, tokens: int) -> int:
        return 2 * tokens * tokens * self.dim + 2 * tokens * self.dim  # pairwise QKᵀ and A·V; unary logits and sum


@register_affinity("dnl")
def _build_dnl(ctx: AffinityContext, k: Optional[int]) -> Affinity:
    return DisentangledNonLocal(ctx["dim"], ctx["heads"])
