"""Dot-product self-attention as a dynamic affinity (Container Eq. 4) with the
softmax alternatives of "Vision Transformers are Dynamic Convolutions" §4.2."""
from __future__ import annotations

from typing import Optional, Sequence

import torch.nn.functional as F
from torch import Tensor

from ..tracing import fx_leaf
from .base import Affinity, merge_heads, split_heads
from .registry import AffinityContext, register_affinity

__all__ = ["SelfAttentionAffinity", "ATTENTION_NORMS"]

ATTENTION_NORMS = ("softmax", "none", "scale", "scale_relu", "layernorm", "ln_relu")


def normalise_scores(scores: Tensor, normaliser: str) -> Tensor:
    """Turn scaled scores QKᵀ/√d (..., N_q, N_k) into affinities with the chosen normaliser.

    Paper-silent choices (vit_as_dynamic_conv.txt §4.2):
    - ``scale`` divides by N_k, "the number of channels" of the softmax input in the paper's conv view
      (one channel per key kernel), so the weights keep softmax's average of 1/N_k;
    - the ReLU and LayerNorm variants use the same 1/N_k scaling ("all the ReLU variants use constant
      scaling"), and LayerNorm normalises over the key axis without affine parameters so any N works.
    """
    n_keys = scores.shape[-1]
    if normaliser == "softmax":
        return scores.softmax(dim=-1)
    if normaliser == "none":
        return scores
    if normaliser == "scale":
        return scores / n_keys
    if normaliser == "scale_relu":
        return F.relu(scores) / n_keys
    if normaliser == "layernorm":
        return F.layer_norm(scores, (n_keys,)) / n_keys
    if normaliser == "ln_relu":
        return F.relu(F.layer_norm(scores, (n_keys,))) / n_keys
    raise ValueError(f"unknown attention normaliser {normaliser!r}; choose one of {ATTENTION_NORMS}")


@fx_leaf  # branches on the stride
def _unit_stride(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class SelfAttentionAffinity(Affinity):
    """Multi-head dot-product attention ``A_m = normaliser(Q_m K_mᵀ / √(C/M))`` (Container Eq. 4).

    ``normaliser`` picks the normaliser studied in vit_as_dynamic_conv.txt §4.2 (Table 2): ``softmax`` runs
    through ``F.scaled_dot_product_attention`` (fused kernels, no stored N×N); ``none`` and ``scale``
    are linear in the scores, so they are computed as ``Q (Kᵀ V)`` in O(N·d²) without an N×N matrix;
    the other normalisers are non-linear in the scores and must form them.
    ``attn_bias`` (heads or 1, N, N) is added to the scaled scores (relative position bias).
    """

    dynamic = True

    def __init__(self, dim: int, heads: int, normaliser: str = "softmax", attn_drop: float = 0.0):
        super().__init__(dim, heads)
        if normaliser not in ATTENTION_NORMS:
            raise ValueError(f"unknown attention normaliser {normaliser!r}; choose one of {ATTENTION_NORMS}")
        self.normaliser = normaliser
        self.attn_drop = attn_drop
        self.scale = self.head_dim ** -0.5

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, normaliser={self.normaliser}"

    def forward(self, v: Tensor, q: Optional[Tensor] = None, k: Optional[Tensor] = None,
                attn_bias: Optional[Tensor] = None) -> Tensor:
        if q is None or k is None:
            raise ValueError("SelfAttentionAffinity is dynamic: pass q and k shaped like v")
        self.check_input(v)
        # fused SDPA kernels need a unit-stride head dim, else they fall back to the N×N math path
        qh, kh, vh = (_unit_stride(split_heads(t, self.heads)) for t in (q, k, v))
        drop = self.attn_drop if self.training else 0.0
        if self.normaliser == "softmax":
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=attn_bias, dropout_p=drop, scale=self.scale)
        elif self.normaliser in ("none", "scale") and attn_bias is None and drop == 0.0:
            factor = self.scale / (kh.shape[-2] if self.normaliser == "scale" else 1)
            out = (qh * factor) @ (kh.transpose(-2, -1) @ vh)
        else:
            a = self._affinity(qh, kh, attn_bias)
            out = F.dropout(a, drop) @ vh
        return merge_heads(out, v.shape)

    def _affinity(self, qh: Tensor, kh: Tensor, attn_bias: Optional[Tensor]) -> Tensor:
        scores = (qh * self.scale) @ kh.transpose(-2, -1)
        if attn_bias is not None:
            scores = scores + attn_bias
        return normalise_scores(scores, self.normaliser)

    def matrix(self, v_shape: Sequence[int], q: Optional[Tensor] = None, k: Optional[Tensor] = None,
               attn_bias: Optional[Tensor] = None) -> Tensor:
        if q is None or k is None:
            raise ValueError("SelfAttentionAffinity is dynamic: matrix() needs q and k")
        return self._affinity(split_heads(q, self.heads), split_heads(k, self.heads), attn_bias)

    def macs(self, tokens: int) -> int:
        if self.normaliser in ("none", "scale"):
            return 2 * tokens * self.dim * self.head_dim
        return 2 * tokens * tokens * self.dim


@register_affinity("sa")
def _build_sa(ctx: AffinityContext, k: Optional[int]) -> Affinity:
    return SelfAttentionAffinity(ctx["dim"], ctx["heads"], normaliser=ctx.get("attn_norm", "softmax"),
                                 attn_drop=ctx.get("attn_drop", 0.0))
