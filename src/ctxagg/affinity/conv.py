"""Full and grouped k×k convolution in the affinity view (Container Table 2: Conv-3, Group Conv-3)."""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor, nn

from .base import Affinity
from .depthwise import conv_toeplitz
from .registry import AffinityContext, register_affinity

__all__ = ["GroupConvAffinity"]


class GroupConvAffinity(Affinity):
    """A k×k convolution with ``groups`` groups (``groups=1``: the naive Conv-3 of Container Table 2).

    Unlike the other affinities it also mixes channels inside a group, so its affinity relates
    (position, channel) pairs: :meth:`matrix` returns (1, G, N·d, N·d) with d = C/G and row/column
    index ``n·d + c`` — the block matrix that :func:`~ctxagg.affinity.base.apply_matrix` applies to the
    group's values flattened in the same order. ``groups == dim`` reduces to a depthwise affinity.
    """

    needs_grid = True
    mixes_channels = True

    def __init__(self, dim: int, kernel_size: int = 3, groups: int = 1, bias: bool = True):
        super().__init__(dim, groups)
        self.kernel_size = kernel_size
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=groups, bias=bias)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, groups={self.heads}, kernel_size={self.kernel_size}"

    def forward(self, v: Tensor, q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        self.check_input(v)
        return self.conv(v)

    def matrix(self, v_shape: Sequence[int], q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        if len(v_shape) != 4:
            raise ValueError("a convolution affinity needs a (B, C, H, W) shape to build its matrix")
        g, d, h, w = self.heads, self.head_dim, v_shape[2], v_shape[3]
        n = h * w
        per_pair = conv_toeplitz(self.conv.weight.reshape(g * d * d, self.kernel_size, self.kernel_size), h, w)
        blocks = per_pair.view(g, d, d, n, n).permute(0, 3, 1, 4, 2)  # (g, n_out, c_out, n_in, c_in)
        return blocks.reshape(1, g, n * d, n * d)

    def bias_term(self) -> Optional[Tensor]:
        return self.conv.bias

    def macs(self, tokens: int) -> int:
        return tokens * self.dim * self.head_dim * self.kernel_size ** 2


@register_affinity("conv")
def _build_conv(ctx: AffinityContext, k: Optional[int]) -> Affinity:
    return GroupConvAffinity(ctx["dim"], k or 3, groups=1)


@register_affinity("gconv")
def _build_gconv(ctx: AffinityContext, k: Optional[int]) -> Affinity:
    return GroupConvAffinity(ctx["dim"], k or 3, groups=ctx["heads"])
