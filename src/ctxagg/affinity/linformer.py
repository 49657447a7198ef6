"""Linformer (Wang et al. 2020, "Linformer: Self-Attention with Linear Complexity", §4 Eq. 7): keys and values
projected along the token axis, so attention costs O(N·k) and its affinity has rank at most k."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Affinity, check_fixed_tokens, merge_heads, split_heads
from .registry import AffinityContext, register_affinity

__all__ = ["LinformerAttention", "LINFORMER_SHARING"]

LINFORMER_SHARING = ("none", "headwise", "kv")
DEFAULT_PROJECTED = 256  # the paper's k = 256 (its Figure 3 / Table 2 runs); clipped to N on small grids


class LinformerAttention(Affinity):
    """Linformer attention, Eq. 7: ``head_m = softmax(Q_m (E_m K_m)ᵀ / √d) · F_m V_m`` with E_m, F_m ∈ R^{k×N}.

    As an affinity over the N values: ``A_m = softmax(Q_m (E_m K_m)ᵀ / √d) · F_m``, an N×N matrix of rank ≤ k
    (:meth:`matrix`); :meth:`forward` projects K and V to k rows and runs attention on them, O(N·k·C), never
    forming N×N. ``sharing`` is §4's parameter sharing: ``"none"`` (E_m, F_m per head), ``"headwise"`` (one E and
    one F for every head; the default) or ``"kv"`` (E = F for every head); layer-wise sharing is a model choice.
    The projections are over token positions, so N is fixed (:attr:`fixed_tokens`): another size is refused.

    Paper-silent choices: no bias in E, F; entries drawn N(0, 1/N), so E K starts as a random average of the keys
    at the keys' scale.
    """

    dynamic = True

    def __init__(self, dim: int, heads: int, tokens: int, projected: Optional[int] = None,
                 sharing: str = "headwise", grid: Optional[tuple[int, int]] = None):
        super().__init__(dim, heads)
        if sharing not in LINFORMER_SHARING:
            raise ValueError(f"unknown Linformer sharing {sharing!r}; choose one of {LINFORMER_SHARING}")
        projected = min(tokens, DEFAULT_PROJECTED) if projected is None else projected
        if tokens < 1 or projected < 1:
            raise ValueError(f"Linformer needs positive N and k, got N={tokens}, k={projected}")
        self.fixed_tokens, self.grid, self.projected, self.sharing = tokens, grid, projected, sharing
        self.scale = self.head_dim ** -0.5
        copies = heads if sharing == "none" else 1
        self.e = nn.Parameter(torch.randn(copies, projected, tokens) * tokens ** -0.5)
        self.f = None if sharing == "kv" else nn.Parameter(torch.randn(copies, projected, tokens) * tokens ** -0.5)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, tokens={self.fixed_tokens}, projected={self.projected}, "
                f"sharing={self.sharing}")

    def projections(self) -> tuple[Tensor, Tensor]:
        """(E, F), each (heads or 1, k, N)."""
        return self.e, self.e if self.f is None else self.f

    def check_input(self, v: Tensor) -> None:
        super().check_input(v)
        check_fixed_tokens(self, v, self.grid, "Linformer projects keys and values along the token axis "
                           "(E, F ∈ R^{k×N}), so N is fixed: build the model with the img_size you feed it")

    def forward(self, v: Tensor, q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        if q is None or k is None:
            raise ValueError("LinformerAttention is dynamic: pass q and k shaped like v")
        self.check_input(v)
        e, f = self.projections()
        qh, kh, vh = (split_heads(t, self.heads) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qh.contiguous(), e @ kh, f @ vh, scale=self.scale)  # N×k scores
        return merge_heads(out, v.shape)

    def matrix(self, v_shape: Sequence[int], q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        """A_m = softmax(Q_m (E_m K_m)ᵀ / √d) · F_m, (B, M, N, N) of rank ≤ k."""
        if q is None or k is None:
            raise ValueError("LinformerAttention is dynamic: matrix() needs q and k")
        e, f = self.projections()
        scores = (split_heads(q, self.heads) * self.scale) @ (e @ split_heads(k, self.heads)).transpose(-2, -1)
        return scores.softmax(-1) @ f

    def macs(self, tokens: int) -> int:
        # E K and F V (k·N·C each), then Q (E K)ᵀ and the k-key aggregation (N·k·C each)
        return 4 * tokens * self.projected * self.dim


@register_affinity("linformer")
def _build_linformer(ctx: AffinityContext, k: Optional[int]) -> Affinity:
    """``linformer<k>``: projected length k (default min(N, 256)), built for the stage's grid."""
    grid = ctx.get("grid")
    if grid is None:
        raise ValueError("linformer projects along the tokens and needs a fixed grid: build the model with an img_size")
    tokens = grid[0] * grid[1]
    return LinformerAttention(ctx["dim"], ctx["heads"], tokens, projected=k, grid=tuple(grid),
                              sharing=ctx.get("linformer_sharing", "headwise"))
