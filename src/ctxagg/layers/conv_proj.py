"""Input projections of a block: the 1×1 projection, or CvT's convolutional projection (Wu et al. 2021, §3.2)."""
from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from .fold import fold_bn_into_prev_conv

__all__ = ["ConvProjection", "input_projection", "PROJECTIONS"]

PROJECTIONS = ("linear", "conv<k>")


class ConvProjection(nn.Module):
    """CvT's convolutional projection (§3.2, "Convolutional Projection"): each output (q, k, v in that order, as
    many as the block needs) is ``W_r · BN_r(DW_r ⋆ x)``, a k×k depth-wise conv without bias, a BatchNorm and a
    point-wise (1×1) projection; the outputs are concatenated along channels, like a 1×1 ``proj_in``'s.

    Choice: stride 1 for every output. CvT's key/value stride 2 ("squeezed" projection) shrinks the keys, a
    non-square affinity (the spatial-reduction family, ``sra``); stride 1 keeps any affinity usable after it.
    The point-wise projection has a bias (CvT's ``qkv_bias``).
    """

    def __init__(self, dim: int, outputs: int, kernel_size: int = 3):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"a convolutional projection needs an odd kernel (a same-size map), got {kernel_size}")
        self.kernel_size = kernel_size
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, bias=False),
                          nn.BatchNorm2d(dim), nn.Conv2d(dim, dim, 1))
            for _ in range(outputs))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([branch(x) for branch in self.branches], 1)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold each BatchNorm (eval statistics) into the depth-wise conv before it: exact."""
        for branch in self.branches:
            if isinstance(branch[1], nn.BatchNorm2d):
                fold_bn_into_prev_conv(branch[0], branch[1])
                branch[1] = nn.Identity()


def input_projection(proj: str, dim: int, outputs: int) -> nn.Module:
    """``"linear"``: one 1×1 conv producing ``outputs``·dim channels; ``"conv<k>"``: :class:`ConvProjection`."""
    if proj == "linear":
        return nn.Conv2d(dim, dim * outputs, 1)
    match = re.fullmatch(r"conv(\d+)", proj)
    if not match or int(match[1]) % 2 == 0:
        raise ValueError(f"proj must be 'linear' or 'conv<k>' with an odd k (CvT's depth-wise convolutional "
                         f"projection, e.g. 'conv3'), got {proj!r}")
    return ConvProjection(dim, outputs, int(match[1]))
