"""Positional encodings of a feature map: the residual depthwise positional conv and a learned absolute table."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..tracing import fx_leaf

__all__ = ["ConvPosEnc", "AbsolutePosEmbed", "resize_pos_embed"]


@fx_leaf  # branches on the input's size (torch.fx: one graph node)
def resize_pos_embed(pos: Tensor, x: Tensor, mode: str = "bilinear", channels_last: bool = False) -> Tensor:
    """A learned (1, C, h, w) position table (``channels_last``: (1, h, w, C)) resized to the grid of ``x``
    (same layout), or the table itself where the grids agree."""
    if channels_last:
        return resize_pos_embed(pos.permute(0, 3, 1, 2), x.permute(0, 3, 1, 2), mode).permute(0, 2, 3, 1)
    if pos.shape[-2:] == x.shape[-2:]:
        return pos
    return F.interpolate(pos, size=x.shape[-2:], mode=mode, align_corners=False)


class ConvPosEnc(nn.Conv2d):
    """Conditional positional encoding ``x + DWConv_k(x)`` (Container §3.4 / the official code's ``pos_embed``:
    a 3×3 depthwise conv with bias and its own residual, as CPE of Chu et al. 2021).

    It owns its fold: :meth:`reparameterize` (found by ``timm.utils.reparameterize_model``, as fastvit's
    ``RepConditionalPosEnc``) adds the identity to the centre tap, after which ``forward`` is the single conv.
    A subclass of ``nn.Conv2d`` so its parameters keep the official ``pos_embed.weight``/``.bias`` names.
    """

    def __init__(self, dim: int, kernel_size: int = 3):
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd for a same-size positional conv, got {kernel_size}")
        super().__init__(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.identity_folded = False

    def extra_repr(self) -> str:
        return super().extra_repr() + (", identity folded" if self.identity_folded else ", + identity")

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        return out if self.identity_folded else x + out

    @torch.no_grad()
    def reparameterize(self) -> None:
        """``x + dw(x)`` -> ``dw'(x)``: 1 added to the centre tap of every channel's kernel (exact)."""
        if self.identity_folded:
            return
        k = self.kernel_size
        self.weight[:, 0, k[0] // 2, k[1] // 2] += 1
        self.identity_folded = True


class AbsolutePosEmbed(nn.Module):
    """Learned absolute position embedding added to a feature map, as PVT [10] (LinGlos §5.4, w/o-C).
    Built for one grid; other input sizes get a bilinearly resized copy (PVT does the same for dense tasks)."""

    def __init__(self, dim: int, grid: tuple[int, int]):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, dim, *grid))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        return x + resize_pos_embed(self.pos_embed, x)
