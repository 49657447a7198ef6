"""Self-attention with a static relative-position bias added *before* the softmax: CoAtNet's relative attention
(Dai et al. 2021, §2.1, Eq. 3) and LeViT's attention bias (Graham et al. 2021, §4, "attention bias")."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .attention import SelfAttentionAffinity
from .base import Affinity
from .registry import AffinityContext, register_affinity

__all__ = ["RelativeBiasAttention"]


class RelativeBiasAttention(SelfAttentionAffinity):
    """``A_h = softmax(Q_h K_hᵀ/√d + B_h)`` with a learned, input-independent B_h[i, j] per head:

    - CoAtNet (``symmetric=False``): ``B_h[i, j] = w_h[y_i − y_j, x_i − x_j]``, a (2H−1)×(2W−1) table (Eq. 3's
      w_{i−j}: query minus key);
    - LeViT (``symmetric=True``): ``B_h[i, j] = w_h[|y_i − y_j|, |x_i − x_j|]``, an H×W table.

    The bias is added before normalisation, so ``softmax(S + B)_ij ∝ softmax(S)_ij · softmax(B)_ij`` (a
    renormalised element-wise *product* of a content and a positional affinity), where Container's mixture
    ``α·softmax(S) + β·softmax(B)`` (and ConViT's GPSA) *adds* them after normalisation. They coincide only when
    one factor is flat along each row (e.g. B constant per row gives softmax(S), the mixture at β = 0);
    ``tests/test_generators.py`` checks both the product identity and the coincidences.

    Any size: the table is sized for ``grid`` (the stage's grid); other grids clip offsets to the table's range
    (Shaw et al. 2018), so smaller grids read exactly the entries they would at the built size. CoAtNet and LeViT
    instead interpolate the table when fine-tuning at a new resolution (paper-silent for a mixer run at many
    sizes). The bias makes the scores N×N (the attention is dense anyway): O(N²·C). The table starts at
    N(0, 0.02²), truncated (paper-silent; Swin's init).
    """

    needs_grid = True

    def __init__(self, dim: int, heads: int, grid: Sequence[int], symmetric: bool = False,
                 normaliser: str = "softmax", attn_drop: float = 0.0):
        super().__init__(dim, heads, normaliser, attn_drop)
        self.grid, self.symmetric = (int(grid[0]), int(grid[1])), symmetric
        gh, gw = self.grid
        self.table = nn.Parameter(torch.zeros((heads, gh, gw) if symmetric else (heads, 2 * gh - 1, 2 * gw - 1)))
        nn.init.trunc_normal_(self.table, std=0.02)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, grid={self.grid}, symmetric={self.symmetric}"

    def bias(self, height: int, width: int) -> Tensor:
        """B (heads, N, N) for an H×W grid (offsets clipped to the table)."""
        gh, gw = self.grid
        device = self.table.device
        ys = torch.arange(height, device=device).repeat_interleave(width)
        xs = torch.arange(width, device=device).repeat(height)
        dy, dx = ys[:, None] - ys[None, :], xs[:, None] - xs[None, :]  # query minus key
        if self.symmetric:
            return self.table[:, dy.abs().clamp(max=gh - 1), dx.abs().clamp(max=gw - 1)]
        return self.table[:, dy.clamp(1 - gh, gh - 1) + gh - 1, dx.clamp(1 - gw, gw - 1) + gw - 1]

    def forward(self, v: Tensor, q: Optional[Tensor] = None, k: Optional[Tensor] = None,
                attn_bias: Optional[Tensor] = None) -> Tensor:
        self.check_input(v)
        return super().forward(v, q, k, attn_bias=self._bias(v.shape, v.dtype, attn_bias))

    def matrix(self, v_shape: Sequence[int], q: Optional[Tensor] = None, k: Optional[Tensor] = None,
               attn_bias: Optional[Tensor] = None) -> Tensor:
        if len(v_shape) != 4:
            raise ValueError("RelativeBiasAttention.matrix() needs a (B, C, H, W) shape")
        dtype = q.dtype if q is not None else self.table.dtype
        return super().matrix(v_shape, q, k, attn_bias=self._bias(v_shape, dtype, attn_bias))

    def _bias(self, v_shape: Sequence[int], dtype: torch.dtype, extra: Optional[Tensor]) -> Tensor:
        bias = self.bias(v_shape[2], v_shape[3]).to(dtype)
        return bias if extra is None else bias + extra


def _grid(ctx: AffinityContext, name: str) -> tuple[int, int]:
    if ctx.get("grid") is None:
        raise ValueError(f"{name} sizes its relative-position table for the stage's grid: pass grid=(H, W)")
    return ctx["grid"]


@register_affinity("rel_sa")
def _build_rel_sa(ctx: AffinityContext, k: Optional[int]) -> Affinity:
    return RelativeBiasAttention(ctx["dim"], ctx["heads"], _grid(ctx, "rel_sa"),
                                 normaliser=ctx.get("attn_norm", "softmax"), attn_drop=ctx.get("attn_drop", 0.0))


@register_affinity("sym_rel_sa")
def _build_sym_rel_sa(ctx: AffinityContext, k: Optional[int]) -> Affinity:
    return RelativeBiasAttention(ctx["dim"], ctx["heads"], _grid(ctx, "sym_rel_sa"), symmetric=True,
                                 normaliser=ctx.get("attn_norm", "softmax"), attn_drop=ctx.get("attn_drop", 0.0))
