"""Patch embedding / downsampling between stages."""
from __future__ import annotations

from typing import Callable

from timm.layers import LayerNorm2d
from torch import Tensor, nn

__all__ = ["ConvPatchEmbed"]


class ConvPatchEmbed(nn.Module):
    """Non-overlapping p×p patch embedding followed by a channel norm (Container §3.4: "patch
    embeddings fuse spatial patches of size p×p into a single vector").

    The official Container code normalises with ``nn.LayerNorm`` (eps 1e-5) in token layout; the same
    normalisation is applied here in NCHW with ``LayerNorm2d`` so feature maps never leave NCHW.
    Any input size works; a size that is not a multiple of ``patch_size`` is floored like a strided conv.
    """

    def __init__(self, in_chans: int, dim: int, patch_size: int,
                 norm_layer: Callable[[int], nn.Module] = lambda c: LayerNorm2d(c, eps=1e-5)):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = norm_layer(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x))
