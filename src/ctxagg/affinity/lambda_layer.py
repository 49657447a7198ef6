"""Lambda layer (Bello 2021, "LambdaNetworks: Modeling Long-Range Interactions without Attention", §3-4, Eq. 1-2,
lambda convolution §4.2): a content lambda from softmax-normalised keys plus position lambdas over a local context,
each applied to its query; linear in N, no attention map."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Affinity, merge_heads, split_heads
from .registry import AffinityContext, register_affinity

__all__ = ["LambdaLayer"]

DEFAULT_CONTEXT = 23  # LambdaResNets' local scope |m| = 23×23


class LambdaLayer(Affinity):
    """Lambda layer with a lambda convolution: ``y_n = (λ^c + λ^p_n)ᵀ q_n`` with the content lambda
    ``λ^c = K̄ᵀ V`` (K̄ = keys softmax-normalised over positions, per key channel) and the position lambda
    ``λ^p_n = Σ_m e_{n−m} v_mᵀ`` over the r×r context around n (Eq. 1-2; §4.2 computes it as a convolution of
    the values with the embeddings as kernels — done here with ``F.conv2d``; outside the image it reads zeros).

    As an affinity: ``A_h[n, m] = q_n·(k̄_m + e_{n−m})`` (e = 0 outside the context) per head, (B, M, N, N)
    (:meth:`matrix`). :meth:`forward` never forms it: O(N·d·C) for the content part and O(N·r²·d·C) for the
    positions, any input size (the context is cut at the border, not padded with keys).

    Heads: each of the M heads has its own d = C/M query, key and value channels (the block gives every head its
    own values); the paper's multi-query form shares keys and values across the |h| queries instead. The
    embeddings e ∈ R^{r×r×d} are shared by the heads, as the paper's position lambdas are. Paper-silent: no
    intra-depth (|u| = 1); the batch norms the paper puts on queries and values belong to the block;
    embeddings start N(0, 1/d).
    """

    dynamic = True
    needs_grid = True

    def __init__(self, dim: int, heads: int, context: int = DEFAULT_CONTEXT):
        super().__init__(dim, heads)
        if context < 1 or context % 2 == 0:
            raise ValueError(f"the lambda convolution's context must be odd and positive, got {context}")
        self.context = context
        self.embedding = nn.Parameter(torch.randn(context, context, self.head_dim) * self.head_dim ** -0.5)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, context={self.context}"

    def position_lambdas(self, v: Tensor) -> Tensor:
        """λ^p: (B, M, d_v, d_k, N), λ^p[n][k, e] = Σ_m E[n − m][k] v_m[e] over the context (a conv with d_k
        output channels per value channel; the embedding index is n − m, so the conv kernel is E flipped)."""
        b, c, h, w = v.shape
        radius = self.context // 2
        kernels = self.embedding.flip(0, 1).permute(2, 0, 1).unsqueeze(1).to(v.dtype)  # (d_k, 1, r, r)
        lambdas = F.conv2d(v.reshape(b * c, 1, h, w), kernels, padding=radius)
        return lambdas.reshape(b, self.heads, self.head_dim, self.head_dim, h * w)

    def forward(self, v: Tensor, q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        if q is None or k is None:
            raise ValueError(f"{type(self).__name__} is dynamic: pass q and k shaped like v")
        self.check_input(v)
        qh, vh = split_heads(q, self.heads), split_heads(v, self.heads)
        keys = split_heads(k, self.heads).softmax(dim=-2)  # K̄: normalised over positions
        content = qh @ (keys.transpose(-2, -1) @ vh)  # Q (K̄ᵀ V): (B, M, N, d)
        position = torch.einsum("bmnk,bmekn->bmne", qh, self.position_lambdas(v))
        return merge_heads(content + position, v.shape)

    def relative_embeddings(self, height: int, width: int) -> Tensor:
        """(N, N, d): e_{n−m} for every pair, 0 where m is outside n's context."""
        ys, xs = (t.flatten().to(self.embedding.device) for t in torch.meshgrid(
            torch.arange(height), torch.arange(width), indexing="ij"))
        dy, dx = ys[:, None] - ys[None, :], xs[:, None] - xs[None, :]
        radius = self.context // 2
        inside = (dy.abs() <= radius) & (dx.abs() <= radius)
        table = self.embedding[(dy + radius).clamp(0, self.context - 1), (dx + radius).clamp(0, self.context - 1)]
        return table * inside.unsqueeze(-1)

    def matrix(self, v_shape: Sequence[int], q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        if q is None or k is None or len(v_shape) != 4:
            raise ValueError(f"{type(self).__name__}.matrix() needs a (B, C, H, W) shape, q and k")
        qh = split_heads(q, self.heads)
        keys = split_heads(k, self.heads).softmax(dim=-2)
        rel = self.relative_embeddings(v_shape[2], v_shape[3]).to(qh.dtype)
        return qh @ keys.transpose(-2, -1) + torch.einsum("bmnk,nlk->bmnl", qh, rel)

    def macs(self, tokens: int) -> int:
        # K̄ᵀV and Q λ^c (N·d·C each), the lambda convolution (N·r²·d·C) and Q λ^p (N·d·C)
        return tokens * self.head_dim * self.dim * (3 + self.context ** 2)


@register_affinity("lambda")
def _build_lambda(ctx: AffinityContext, k: Optional[int]) -> Affinity:
    """``lambda<r>``: a lambda layer with an r×r lambda-convolution context (default 23, as LambdaResNets)."""
    return LambdaLayer(ctx["dim"], ctx["heads"], context=k or DEFAULT_CONTEXT)
