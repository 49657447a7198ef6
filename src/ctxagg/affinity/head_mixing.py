"""Mixing attention maps across heads, ``A'_h = Σ_g Θ_hg A_g``: DeepViT's re-attention (Zhou et al. 2021, §4,
"Re-attention") and the talking-heads attention CaiT uses (Touvron et al. 2021, after Shazeer et al. 2020)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import SelfAttentionAffinity, normalise_scores
from .base import Affinity, from_tokens, merge_heads, split_heads, to_tokens
from .key_only import KeyOnlyAttention
from .registry import AffinityContext, build_affinity, register_combinator

__all__ = ["HeadMixing", "LogitMixedAttention"]


def _call(part: Affinity, v: Tensor, q: Optional[Tensor], k: Optional[Tensor]) -> Tensor:
    """forward(v, q, k) in the part's own calling form (static: v; two-input operators: v, q)."""
    if not part.dynamic:
        return part(v)
    return part(v, q) if getattr(part, "uses_value", True) is False else part(v, q, k)


class HeadMixing(Affinity):
    """``heads_mixed(a)``: the heads of any affinity a, re-combined after normalisation (DeepViT re-attention,
    CaiT's post-softmax talking-heads projection): ``A'_h = Σ_g Θ_hg A_g`` with a learned M×M matrix Θ, so head
    h applies the mixed map to its own values, ``out_h = Σ_g Θ_hg A_g V_h``.

    ``forward``: dense softmax attention (``sa`` and its variants) forms the maps once and mixes them (M·N²
    memory, as DeepViT and CaiT do); any other affinity runs its own fast path M times, once per source head h
    with V_h copied into every head's channels, then combines the results with Θ: exact, M times the inner
    A·V, and a sparse pattern stays sparse (no N×N). The inner's bias b becomes Σ_g Θ_hg b_g.

    Choices: Θ starts at the identity, so ``heads_mixed(a)`` starts as a (DeepViT and CaiT use their layers'
    default random init). DeepViT follows Θ with a BatchNorm over the heads and CaiT's Θ has a bias; both add
    a constant to every entry of A' (B's shift; b_h·Σ_j v_j, a global sum that grows with N): left out, so A'
    keeps the form Σ_g Θ_hg A_g. Operators whose matrix mixes channels across heads (key-only attention) are
    refused: they have no per-head maps to mix.
    """

    def __init__(self, inner: Affinity):
        if isinstance(inner, KeyOnlyAttention):
            raise ValueError("heads_mixed(a) mixes per-head maps; key_only's U1 mixes all channels, it has none")
        super().__init__(inner.dim, inner.heads)
        self.inner = inner
        self.mixing = nn.Parameter(torch.eye(inner.heads))  # Θ
        self.dynamic, self.needs_grid, self.fixed_tokens = inner.dynamic, inner.needs_grid, inner.fixed_tokens
        self.uses_value = getattr(inner, "uses_value", True)
        self.dense = isinstance(inner, SelfAttentionAffinity)

    def forward(self, v: Tensor, q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        if self.dense:
            a = F.dropout(self.matrix(v.shape, q, k), self.inner.attn_drop, self.training)
            return merge_heads(a @ split_heads(v, self.heads), v.shape)
        m, d = self.heads, self.head_dim
        tokens = to_tokens(v)
        b, n, _ = tokens.shape
        tiled = tokens.reshape(b, n, m, 1, d).expand(b, n, m, m, d)  # [b, n, source h, slot g, e] = V_h
        tiled = tiled.permute(2, 0, 1, 3, 4).reshape(m * b, n, m * d)
        big = (m * b,) + tuple(v.shape[1:])
        repeat = (lambda t: None if t is None else t.repeat(m, *([1] * (t.ndim - 1))))
        out = to_tokens(_call(self.inner, from_tokens(tiled, big), repeat(q), repeat(k)))  # A_g V_h + b_g
        mixed = torch.einsum("hg,hbnge->bnhe", self.mixing.to(out.dtype), out.reshape(m, b, n, m, d))
        return from_tokens(mixed.reshape(b, n, m * d), v.shape)

    def matrix(self, v_shape: Sequence[int], q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        a = self.inner.matrix(v_shape, q, k) if self.inner.dynamic else self.inner.matrix(v_shape)
        if a.shape[1] != self.heads:
            raise ValueError(f"heads_mixed needs one map per head ({self.heads}), got {a.shape[1]}")
        return torch.einsum("hg,bg...->bh...", self.mixing.to(a.dtype), a)

    def _mixed_bias(self, bias: Optional[Tensor]) -> Optional[Tensor]:
        if bias is None:
            return None
        return (self.mixing.to(bias.dtype) @ bias.view(self.heads, self.head_dim)).reshape(-1)

    def bias_term(self) -> Optional[Tensor]:
        return self._mixed_bias(self.inner.bias_term())

    @torch.no_grad()
    def pop_bias(self) -> Optional[Tensor]:
        return self._mixed_bias(self.inner.pop_bias())

    def macs(self, tokens: int) -> int:
        if self.dense:
            return self.inner.macs(tokens) + tokens * tokens * self.heads ** 2
        return self.heads * self.inner.macs(tokens) + tokens * self.dim * self.heads


class LogitMixedAttention(SelfAttentionAffinity):
    """Talking heads before the softmax (Shazeer et al. 2020, as in CaiT): ``A_h = softmax(Σ_g Θ^l_hg Q_g K_gᵀ/√d)``.

    ``Σ_g Θ_hg q_i^g·k_j^g`` is one dot product over all C channels of ``q̃_i^h = (Θ_h1 q_i^1, …, Θ_hM q_i^M)`` with
    k_j, so ``forward`` runs the fused attention kernel with C-wide queries and keys per head (M·N²·C, no
    stored N×N). Θ^l starts at the identity (plain ``sa``); CaiT's pre-softmax bias is left out (it is constant
    along each row and cancels in the softmax). ``talking_heads(sa)`` is this followed by :class:`HeadMixing`.
    """

    def __init__(self, dim: int, heads: int, normaliser: str = "softmax", attn_drop: float = 0.0):
        super().__init__(dim, heads, normaliser, attn_drop)
        self.logit_mixing = nn.Parameter(torch.eye(heads))  # Θ^l

    def forward(self, v: Tensor, q: Optional[Tensor] = None, k: Optional[Tensor] = None,
                attn_bias: Optional[Tensor] = None) -> Tensor:
        if q is None or k is None:
            raise ValueError("LogitMixedAttention is dynamic: pass q and k shaped like v")
        self.check_input(v)
        if self.normaliser != "softmax":
            return merge_heads(self.matrix(v.shape, q, k, attn_bias) @ split_heads(v, self.heads), v.shape)
        qh, vh = split_heads(q, self.heads), split_heads(v, self.heads)
        b, m, n, d = qh.shape
        wide_q = torch.einsum("hg,bgnd->bhngd", self.logit_mixing.to(qh.dtype), qh).reshape(b, m, n, m * d)
        wide_k = to_tokens(k).unsqueeze(1).expand(b, m, n, m * d)
        out = F.scaled_dot_product_attention(wide_q, wide_k, vh.contiguous(), attn_mask=attn_bias,
                                             dropout_p=self.attn_drop if self.training else 0.0, scale=self.scale)
        return merge_heads(out, v.shape)

    def _affinity(self, qh: Tensor, kh: Tensor, attn_bias: Optional[Tensor]) -> Tensor:
        scores = (qh * self.scale) @ kh.transpose(-2, -1)
        scores = torch.einsum("hg,bgij->bhij", self.logit_mixing.to(scores.dtype), scores)
        return normalise_scores(scores if attn_bias is None else scores + attn_bias, self.normaliser)

    def macs(self, tokens: int) -> int:
        return tokens * tokens * self.dim * (self.heads + 1)  # C-wide scores per head, then A·V


@register_combinator("heads_mixed")
def _build_heads_mixed(ctx: AffinityContext, args: list[str]) -> Affinity:
    """``heads_mixed(a)``: DeepViT's re-attention over the heads of any affinity a."""
    if len(args) != 1:
        raise ValueError(f"heads_mixed takes one affinity, e.g. heads_mixed(sa) or heads_mixed(window7); got {args}")
    return HeadMixing(build_affinity(args[0], **ctx))


@register_combinator("talking_heads")
def _build_talking_heads(ctx: AffinityContext, args: list[str]) -> Affinity:
    """``talking_heads(sa)``: CaiT's talking heads, Θ^l before and Θ^w after the softmax."""
    inner = build_affinity(args[0], **ctx) if len(args) == 1 else None
    if type(inner) is not SelfAttentionAffinity:
        raise ValueError(f"talking_heads mixes the logits of dot-product attention: its argument must be 'sa', got "
                         f"{args}; heads_mixed(a) mixes the maps of any affinity after normalisation")
    return HeadMixing(LogitMixedAttention(inner.dim, inner.heads, inner.normaliser, inner.attn_drop))
