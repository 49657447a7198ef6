"""Learned relative position bias over a 2-D token grid (Swin §3.2, "relative position bias"), shared by the
DeiT "Rel" rows and the Swin rows of "Vision Transformers are Dynamic Convolutions" (vit_as_dynamic_conv.txt
Tables 2-3, the ``p_i`` of Eq. 4-5). Kept here, below the model families, as timm keeps its own in
``timm/layers/pos_embed_rel.py``.

The table layout is Swin's (and timm's ``gen_relative_position_index``): one row per 2-D offset
``(dy, dx)``, ``(2·H−1)·(2·W−1)`` rows, one column per head. Unlike timm's index, ours also serves a grid
other than the table's (a ViT run at another image size), by clamping offsets to the table's border.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from timm.layers import to_2tuple, trunc_normal_
from torch import Tensor, nn

from ..tracing import fx_leaf

__all__ = ["POS_EMBED_KINDS", "relative_position_index", "RelativePositionBias"]

POS_EMBED_KINDS = ("abs", "rel")  # the two position embeddings the ViT/Swin rows swap (§4.2): absolute, relative


def relative_position_index(grid: Sequence[int], table_grid: Sequence[int],
                            device: Optional[torch.device] = None) -> Tensor:
    """(N, N) index into a ((2·Th−1)·(2·Tw−1))-row table of the 2-D offset ``c_i − c_j`` between the cells of
    ``grid`` (N = H·W, row-major). Equals timm's ``gen_relative_position_index(grid)`` when ``grid`` is the
    table's grid; offsets beyond the table's range are clamped to its border (paper-silent)."""
    (h, w), (th, tw) = grid, table_grid
    coords = torch.stack(torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device),
                                        indexing="ij")).flatten(1)  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :]
    dy = rel[0].clamp(-(th - 1), th - 1) + th - 1
    dx = rel[1].clamp(-(tw - 1), tw - 1) + tw - 1
    return dy * (2 * tw - 1) + dx


@fx_leaf  # compares the runtime grid with the built one (torch.fx: one graph node)
def _grid_index(built_index: Tensor, grid: Sequence[int], table_grid: Sequence[int]) -> Tensor:
    """The (N, N) table index of ``grid``: ``built_index`` when it is the table's grid, else computed."""
    if tuple(grid) == tuple(table_grid):
        return built_index
    return relative_position_index(grid, table_grid, built_index.device)


class RelativePositionBias(nn.Module):
    """Learned relative position bias ``p`` (Swin §3.2; the "Rel" position embedding of
    vit_as_dynamic_conv.txt Tables 2-3 and the ``p_i`` of Eq. 4-5): one scalar per head per 2-D offset,
    returned as a (1, heads, N, N) additive term for the attention scores of an H×W grid."""

    def __init__(self, heads: int, grid: Sequence[int]):
        super().__init__()
        self.heads = heads
        self.grid = tuple(to_2tuple(grid))
        self.table = nn.Parameter(torch.zeros((2 * self.grid[0] - 1) * (2 * self.grid[1] - 1), heads))
        self.register_buffer("index", relative_position_index(self.grid, self.grid), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        trunc_normal_(self.table, std=0.02)  # as Swin

    def extra_repr(self) -> str:
        return f"heads={self.heads}, grid={self.grid}"

    def set_grid(self, grid: Sequence[int]) -> None:
        """Rebuild for a new grid, resampling the table bicubically (as timm does for Swin windows)."""
        grid = tuple(to_2tuple(grid))
        if grid == self.grid:
            return
        old = self.table.detach().t().reshape(1, self.heads, 2 * self.grid[0] - 1, 2 * self.grid[1] - 1)
        new = F.interpolate(old, size=(2 * grid[0] - 1, 2 * grid[1] - 1), mode="bicubic", align_corners=False)
        self.table = nn.Parameter(new.reshape(self.heads, -1).t().contiguous())
        self.grid = grid
        self.index = relative_position_index(grid, grid, device=self.table.device)

    def forward(self, grid: Optional[Sequence[int]] = None) -> Tensor:
        """(1, heads, N, N) bias for the tokens of ``grid`` (default: the grid it was built for)."""
        grid = self.grid if grid is None else tuple(grid)
        index = _grid_index(self.index, grid, self.grid)
        n = grid[0] * grid[1]
        return self.table[index.reshape(-1)].reshape(n, n, self.heads).permute(2, 0, 1).unsqueeze(0)
