"""The one downsampling layer between stages: a strided conv followed by a channel LayerNorm."""
from __future__ import annotations

from typing import Optional

from timm.layers import LayerNorm2d
from torch import Tensor, nn

__all__ = ["ConvDownsample"]


class ConvDownsample(nn.Module):
    """k×k conv with stride s and padding p, then LayerNorm over channels, on NCHW feature maps.

    - Container §3.4 patch embedding ("patch embeddings fuse spatial patches of size p×p into a single
      vector"): ``ConvDownsample(c_in, c, p)`` — k = s = p, no padding; the official code normalises with
      ``nn.LayerNorm`` (eps 1e-5) in token layout, the same normalisation as ``LayerNorm2d`` here;
    - LinGlos §3.3-3.4 ("Layer normalizations are added wherever spatial resolution is changed"): overlapping
      (k, s, p) = (7, 4, 3) first and (3, 2, 1) after, LayerNorm eps 1e-6 (PVT's).

    Any input size works; a size that is not a multiple of the stride is floored like any strided conv.
    """

    def __init__(self, in_chans: int, dim: int, kernel_size: int, stride: Optional[int] = None, padding: int = 0,
                 eps: float = 1e-5):
        super().__init__()
        self.stride = kernel_size if stride is None else stride
        self.proj = nn.Conv2d(in_chans, dim, kernel_size, stride=self.stride, padding=padding)
        self.norm = LayerNorm2d(dim, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x))
