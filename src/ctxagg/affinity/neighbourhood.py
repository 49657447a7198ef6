"""Neighbourhood attention (Stand-Alone Self-Attention, Ramachandran et al. 2019, §3.1-3.2, Eq. 3):
each query attends to its k×k neighbourhood — a banded, dynamic convolution."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Affinity, split_heads
from .registry import AffinityContext, register_affinity

__all__ = ["NeighbourhoodAttention"]


class NeighbourhoodAttention(Affinity):
    """Local self-attention of SASA Eq. 3 with 2-D relative logits:

        y_ij = Σ_{(a,b) ∈ N_k(i,j)} softmax_ab( q_ijᵀ k_ab + q_ijᵀ r_{a−i, b−j} ) v_ab

    per head, where ``r_{a−i,b−j}`` concatenates a row-offset embedding and a column-offset embedding of
    d/2 channels each (SASA §3.2). ``A`` is zero outside the k×k band around each query.

    Paper-silent choices: each head has its own offset embeddings (d = C/M channels, so C/M must be even);
    at the image border the neighbourhood is cut to the in-image pixels (out-of-image keys are masked,
    not zero-padded tokens); no 1/√d scaling, as Eq. 3 has none (``scale`` to change it).
    ``forward`` gathers the k² neighbours with ``F.unfold`` (B·C·k²·N elements, never N×N).
    """

    dynamic = True
    needs_grid = True

    def __init__(self, dim: int, heads: int, kernel_size: int = 7, rel_pos: bool = True, scale: float = 1.0):
        super().__init__(dim, heads)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive (a centred neighbourhood), got {kernel_size}")
        if rel_pos and self.head_dim % 2:
            raise ValueError(f"relative logits split each head's {self.head_dim} channels into row and column "
                             "halves: C/heads must be even")
        self.kernel_size, self.scale = kernel_size, scale
        half = self.head_dim // 2
        self.rel_rows = nn.Parameter(torch.zeros(heads, kernel_size, half)) if rel_pos else None
        self.rel_cols = nn.Parameter(torch.zeros(heads, kernel_size, half)) if rel_pos else None
        for p in (self.rel_rows, self.rel_cols):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)  # paper-silent: Swin's relative-table init

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, kernel_size={self.kernel_size}, scale={self.scale}"

    def _offset_logits(self, qh: Tensor) -> tuple[Tensor, Tensor]:
        """q·r for row and column offsets: qh (B, M, d, N) -> two (B, M, k, N) tensors."""
        half = self.head_dim // 2
        rows = torch.einsum("bmdn,mtd->bmtn", qh[:, :, :half], self.rel_rows.to(qh.dtype))
        cols = torch.einsum("bmdn,mtd->bmtn", qh[:, :, half:], self.rel_cols.to(qh.dtype))
        return rows, cols

    def forward(self, v: Tensor, q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        if q is None or k is None:
            raise ValueError(f"{type(self).__name__} is dynamic: pass q and k shaped like v")
        self.check_input(v)
        b, c, h, w = v.shape
        ks, n, m, d = self.kernel_size, h * w, self.heads, self.head_dim
        keys, values = (F.unfold(t, ks, padding=ks // 2).view(b, m, d, ks * ks, n) for t in (k, v))
        qh = q.reshape(b, m, d, n)
        logits = torch.einsum("bmdn,bmdtn->bmtn", qh, keys) * self.scale
        if self.rel_rows is not None:
            rows, cols = self._offset_logits(qh)
            logits = logits + (rows.unsqueeze(3) + cols.unsqueeze(2)).reshape(b, m, ks * ks, n) * self.scale
        inside = F.unfold(v.new_ones(1, 1, h, w), ks, padding=ks // 2).view(1, 1, ks * ks, n) > 0
        attn = logits.masked_fill(~inside, float("-inf")).softmax(2)
        return torch.einsum("bmtn,bmdtn->bmdn", attn, values).reshape(b, c, h, w)

    def matrix(self, v_shape: Sequence[int], q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        if q is None or k is None or len(v_shape) != 4:
            raise ValueError(f"{type(self).__name__}.matrix() needs a (B, C, H, W) shape, q and k")
        h, w = v_shape[2:]
        r = self.kernel_size // 2
        ys, xs = (t.flatten().to(q.device) for t in torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"))
        dy, dx = ys[None, :] - ys[:, None], xs[None, :] - xs[:, None]  # key minus query: (a − i, b − j)
        band = (dy.abs() <= r) & (dx.abs() <= r)
        scores = split_heads(q, self.heads) @ split_heads(k, self.heads).transpose(-2, -1)
        if self.rel_rows is not None:
            qh = q.reshape(q.shape[0], self.heads, self.head_dim, h * w)
            rows, cols = (t.transpose(-2, -1) for t in self._offset_logits(qh))  # (B, M, N, k)
            query = torch.arange(h * w, device=q.device)[:, None]
            scores = scores + rows[:, :, query, (dy + r).clamp(0, 2 * r)] + cols[:, :, query, (dx + r).clamp(0, 2 * r)]
        return (scores * self.scale).masked_fill(~band, float("-inf")).softmax(-1)

    def macs(self, tokens: int) -> int:
        rel = tokens * self.dim * self.kernel_size if self.rel_rows is not None else 0  # q·r_row, q·r_col
        return 2 * tokens * self.kernel_size ** 2 * self.dim + rel


@register_affinity("neighbourhood")
def _build_neighbourhood(ctx: AffinityContext, k: Optional[int]) -> Affinity:
    return NeighbourhoodAttention(ctx["dim"], ctx["heads"], kernel_size=k or 7)
