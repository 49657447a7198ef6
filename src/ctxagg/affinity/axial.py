"""Axial attention (Ho et al. 2019, "Axial Attention in Multidimensional Transformers", §3; Axial-DeepLab,
Wang et al. 2020, §3.2): softmax attention along one axis; row then column is ``chain(axial_row, axial_column)``."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Affinity, split_heads
from .chain import AffinityChain
from .registry import AffinityContext, register_affinity

__all__ = ["AxialAttention", "AXES"]

AXES = ("row", "column")


class AxialAttention(Affinity):
    """Multi-head softmax attention along one axis of the grid: ``A_m[i, j] = softmax_j(q_iᵀk_j/√d)`` over the
    tokens j in the same row (``axis="row"``) or the same column (``axis="column"``) as i, 0 elsewhere.

    Follows Ho et al.'s plain axial attention (no positional term; Axial-DeepLab's position-sensitive
    terms are not included). ``forward`` runs SDPA over rows (or columns): B·M·H·W·L scores, never N×N.
    """

    dynamic = True
    needs_grid = True

    def __init__(self, dim: int, heads: int, axis: str = "row"):
        super().__init__(dim, heads)
        if axis not in AXES:
            raise ValueError(f"unknown axis {axis!r}; choose one of {AXES}")
        self.axis, self.scale = axis, self.head_dim ** -0.5

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, axis={self.axis}"

    def _lines(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, M, lines, length, d): rows (H lines of W) or columns (W lines of H)."""
        b, c, h, w = x.shape
        x = x.reshape(b, self.heads, self.head_dim, h, w)
        return x.permute(0, 1, 3, 4, 2) if self.axis == "row" else x.permute(0, 1, 4, 3, 2)

    def forward(self, v: Tensor, q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        if q is None or k is None:
            raise ValueError(f"{type(self).__name__} is dynamic: pass q and k shaped like v")
        self.check_input(v)
        out = F.scaled_dot_product_attention(*(self._lines(t) for t in (q, k, v)), scale=self.scale)
        out = out.permute(0, 1, 4, 2, 3) if self.axis == "row" else out.permute(0, 1, 4, 3, 2)
        return out.reshape(v.shape)

    def matrix(self, v_shape: Sequence[int], q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        if q is None or k is None or len(v_shape) != 4:
            raise ValueError(f"{type(self).__name__}.matrix() needs a (B, C, H, W) shape, q and k")
        h, w = v_shape[2:]
        index = torch.arange(h * w, device=q.device)
        line = index // w if self.axis == "row" else index % w
        scores = (split_heads(q, self.heads) * self.scale) @ split_heads(k, self.heads).transpose(-2, -1)
        return scores.masked_fill(line[:, None] != line[None, :], float("-inf")).softmax(-1)

    def macs(self, tokens: int) -> int:
        return 2 * tokens * math.isqrt(tokens) * self.dim  # line length √N on a square grid


@register_affinity("axial_row")
def _build_axial_row(ctx: AffinityContext, k: Optional[int]) -> Affinity:
    return AxialAttention(ctx["dim"], ctx["heads"], axis="row")


@register_affinity("axial_column")
def _build_axial_column(ctx: AffinityContext, k: Optional[int]) -> Affinity:
    return AxialAttention(ctx["dim"], ctx["heads"], axis="column")


@register_affinity("axial")
def _build_axial(ctx: AffinityContext, k: Optional[int]) -> Affinity:
    """Row attention then column attention (Ho et al. §3): ``A = A_column · A_row``."""
    return AffinityChain(AxialAttention(ctx["dim"], ctx["heads"], axis="row"),
                         AxialAttention(ctx["dim"], ctx["heads"], axis="column"))
