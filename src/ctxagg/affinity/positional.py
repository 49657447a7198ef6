"""ConViT's positional attention and gated positional self-attention (d'Ascoli et al. 2021, §3, "GPSA"):
``A_h = (1 − σ(λ_h))·softmax(Q_h K_hᵀ/√d) + σ(λ_h)·softmax(v_hᵀ r_ij)``, a Container mixture of a content and
a positional affinity with one gate per head."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .attention import SelfAttentionAffinity
from .base import Affinity
from .mixture import AffinityMixture
from .registry import AffinityContext, register_affinity

__all__ = ["PositionalAttention", "gated_positional_attention"]


class PositionalAttention(Affinity):
    """ConViT's positional attention per head: ``A_h[i, j] = softmax_j(v_hᵀ r_ij)`` over the image's keys, with
    ``r_ij = (δx, δy, δx² + δy²)``, δ = key − query and ``v_h`` (3 numbers per head) learned. ``v_h = −α(−2Δx, −2Δy, 1)``
    is Cordonnier et al.'s quadratic encoding (Lemma 1, :class:`~ctxagg.affinity.QuadraticEncodingAttention`):
    head h looks around the offset Δ_h with sharpness α. ConViT's locality init puts the first ⌊√M⌋² heads on a
    ⌊√M⌋×⌊√M⌋ grid of Δ (centred, spacing 1) with α = ``locality_strength``.

    Separable: the logit is ``(v0·δx + v2·δx²) + (v1·δy + v2·δy²)``, so the softmax over the H×W keys factorises,
    ``A_h = A_h^y ⊗ A_h^x`` with an H×H and a W×W row-softmax. ``forward`` applies the two (``A^y V A^xᵀ`` per
    channel): O(N·(H+W)·C), never N×N; ``matrix()`` is their Kronecker product.

    Differences from ``conv_attn`` (same logits): the softmax runs over the keys inside the image (ConViT),
    not over the zero-padded plane of offsets; any number of heads; the 3 coefficients are free (ConViT's
    ``pos_proj``), so a head may also turn non-local. Choices: ``pos_proj``'s bias is left out (it cancels in
    the softmax); heads beyond ⌊√M⌋² start centred on the query (ConViT leaves them at a random init).
    """

    needs_grid = True

    def __init__(self, dim: int, heads: int, locality_strength: float = 1.0):
        super().__init__(dim, heads)
        side = math.isqrt(heads)
        centre = (side - 1) / 2
        weight = torch.zeros(heads, 3)
        weight[:, 2] = -1.0
        for h in range(side * side):  # ConViT: head h = h1 + side·h2 looks at (Δy, Δx) = (h1, h2) − centre
            weight[h, 0], weight[h, 1] = 2 * (h // side - centre), 2 * (h % side - centre)
        self.weight = nn.Parameter(weight * locality_strength)  # v_h on (δx, δy, δx² + δy²)

    def axis_matrices(self, height: int, width: int, dtype: torch.dtype, device=None) -> tuple[Tensor, Tensor]:
        """(A^y (M, H, H), A^x (M, W, W)): row-softmaxes of v1·δy + v2·δy² and v0·δx + v2·δx² (δ = key − query)."""
        w = self.weight.to(dtype)

        def axis(size: int, linear: Tensor) -> Tensor:
            pos = torch.arange(size, dtype=dtype, device=device)
            delta = pos[None, :] - pos[:, None]
            return (linear.view(-1, 1, 1) * delta + w[:, 2].view(-1, 1, 1) * delta ** 2).softmax(-1)

        return axis(height, w[:, 1]), axis(width, w[:, 0])

    def forward(self, v: Tensor, q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        self.check_input(v)
        b, c, h, w = v.shape
        rows, cols = self.axis_matrices(h, w, v.dtype, v.device)
        out = torch.einsum("myY,bmdYX,mxX->bmdyx", rows, v.reshape(b, self.heads, self.head_dim, h, w), cols)
        return out.reshape(b, c, h, w)

    def matrix(self, v_shape: Sequence[int], q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        if len(v_shape) != 4:
            raise ValueError("PositionalAttention.matrix() needs a (B, C, H, W) shape")
        h, w = v_shape[2:]
        rows, cols = self.axis_matrices(h, w, self.weight.dtype, self.weight.device)
        return torch.einsum("myY,mxX->myxYX", rows, cols).reshape(1, self.heads, h * w, h * w)

    def macs(self, tokens: int) -> int:
        side = math.isqrt(tokens)  # a square grid: A^y V then · A^xᵀ, N·H + N·W per channel
        return 2 * tokens * side * self.dim


def gated_positional_attention(dim: int, heads: int, gate_init: float = 1.0, locality_strength: float = 1.0,
                               attn_drop: float = 0.0) -> AffinityMixture:
    """ConViT's GPSA as ``mix(sa, pos_attn)`` with the ``per_head`` gate: α_h = σ(w_h) on the content part and
    β_h = 1 − α_h on the positional part, so ConViT's λ_h is −w_h; ``gate_init`` is ConViT's λ = 1 (it starts
    73% positional). ConViT renormalises the rows afterwards, a no-op for this convex sum of row-stochastic
    matrices."""
    mixture = AffinityMixture(SelfAttentionAffinity(dim, heads, attn_drop=attn_drop),
                              PositionalAttention(dim, heads, locality_strength), gate="per_head")
    with torch.no_grad():
        mixture.gate_logit.fill_(-gate_init)
    return mixture


@register_affinity("pos_attn")
def _build_pos_attn(ctx: AffinityContext, k: Optional[int]) -> Affinity:
    return PositionalAttention(ctx["dim"], ctx["heads"])


@register_affinity("gpsa")
def _build_gpsa(ctx: AffinityContext, k: Optional[int]) -> Affinity:
    return gated_positional_attention(ctx["dim"], ctx["heads"], attn_drop=ctx.get("attn_drop", 0.0))
