"""Swin-T with its window attention replaced by (dynamic) depth-wise convolution: Han et al., "On the Connection
between Local Attention and Dynamic Depth-wise Convolution" (ICLR 2022; ViT-as-DynConv's [11], Table 1's
"Dynamic DW-Conv." row, the Swin-T setting the paper sets it against). Name: ``swin_t_dynamic_dw`` (D-DWNet-T).

What changes from Swin-T, as in Han et al.'s released code (github.com/Atten4Vis/DemystifyLocalViT, read to
understand the design, not copied); everything else is timm's ``SwinTransformer`` (patch embedding with
LayerNorm, patch merging, depths 2-2-6-2, widths 96·2^i, MLP ratio 4, final LayerNorm, stochastic depth 0.2):

- each block's spatial branch (LayerNorm → (shifted-)window attention) becomes
  1×1 conv → BN → ReLU → 7×7 dynamic depth-wise conv (:class:`~ctxagg.affinity.DynamicDepthwiseConv`) → BN →
  ReLU → 1×1 conv → BN, on the whole map: no LayerNorm before it, no windows, no shift, no relative bias;
- the LayerNorm before the MLP becomes a BatchNorm.

The published size (the official repository's model table: dynamic_dwnet_tiny 51M parameters, 3.8G FLOPs; the
static DWNet-T 24M, 3.8G) is :data:`PAPER_NUMBERS`. This construction: 51.13M parameters, 3.754 GMACs at 224²
(static: 24.17M, 3.727). The repository's own FLOP formula gives 3.770G (static 3.742G): it also charges
BatchNorm and ReLU element-wise, which timm/torch counters (ours) do not.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.swin_transformer import SwinTransformer
from torch import Tensor, nn

from ..affinity.depthwise import DepthwiseConvAffinity
from ..affinity.dynamic_conv import DynamicDepthwiseConv
from ..checks import add_input_checks
from .swin import _cfg, small_input_kwargs

__all__ = ["DWNetSwin", "DWNetBlock", "DepthwiseConvMixer", "PAPER_NUMBERS", "small_input_kwargs"]

PAPER_NUMBERS: dict[str, dict[str, Any]] = {
    "swin_t_dynamic_dw": dict(params=51.0, gflops=3.8, params_tol=0.01, source=(
        "Han et al. 2022 (ViT-as-DynConv [11]), the official DemystifyLocalViT model table: dynamic_dwnet_tiny "
        "51M params, 3.8G FLOPs (two significant digits)")),
}


class DepthwiseConvMixer(nn.Module):
    """Han et al.'s spatial branch: ``BN(W₂ ReLU(BN(DW(ReLU(BN(W₁ x))))))`` with 1×1 convs W₁, W₂ (no bias, each
    followed by BatchNorm) around a k×k depth-wise convolution — dynamic (kernels generated per image from the
    pooled map, :class:`DynamicDepthwiseConv`) or static (:class:`DepthwiseConvAffinity`, their DWNet)."""

    def __init__(self, dim: int, kernel_size: int = 7, dynamic: bool = True):
        super().__init__()
        self.proj_in, self.norm_in = nn.Conv2d(dim, dim, 1, bias=False), nn.BatchNorm2d(dim)
        self.conv = DynamicDepthwiseConv(dim, kernel_size) if dynamic else DepthwiseConvAffinity(dim, kernel_size)
        self.norm = nn.BatchNorm2d(dim)
        self.proj_out, self.norm_out = nn.Conv2d(dim, dim, 1, bias=False), nn.BatchNorm2d(dim)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W), any H×W."""
        x = F.relu(self.norm_in(self.proj_in(x)))
        x = F.relu(self.norm(self.conv(x)))  # kernels generated from x itself (the operator's q defaults to v)
        return self.norm_out(self.proj_out(x))


class DWNetBlock(nn.Module):
    """Drop-in for timm's ``SwinTransformerBlock`` on (B, H, W, C) maps: ``x += DW-branch(x)``,
    ``x += MLP(BN(x))`` (Han et al.'s block). Takes the Swin block's MLP and stochastic-depth modules as they
    were built (timm's initialisation and per-block drop-path rate)."""

    def __init__(self, dim: int, mlp: nn.Module, drop_path1: nn.Module, drop_path2: nn.Module,
                 kernel_size: int = 7, dynamic: bool = True):
        super().__init__()
        self.dim = dim
        self.mixer = DepthwiseConvMixer(dim, kernel_size, dynamic)
        self.drop_path1 = drop_path1
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = mlp
        self.drop_path2 = drop_path2

    def set_input_size(self, feat_size: Sequence[int], window_size: Any, always_partition: Any = None) -> None:
        """timm's resize hook: a convolution takes any size, so there is nothing to rebuild."""
        self.input_resolution = tuple(feat_size)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path1(self.mixer(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        return x + self.drop_path2(self.mlp(self.norm2(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)))


class DWNetSwin(SwinTransformer):
    """timm's ``SwinTransformer`` whose every block is a :class:`DWNetBlock` (Han et al.'s DWNet, dynamic or not);
    ``window_size`` and ``num_heads`` only shape the Swin blocks that are replaced."""

    def __init__(self, kernel_size: int = 7, dynamic: bool = True, **kwargs: Any):
        super().__init__(**kwargs)
        self.kernel_size, self.dynamic = kernel_size, dynamic
        for stage in self.layers:
            stage.blocks = nn.Sequential(*[
                DWNetBlock(old.dim, old.mlp, old.drop_path1, old.drop_path2, kernel_size, dynamic)
                for old in stage.blocks])


default_cfgs = generate_default_cfgs({"swin_t_dynamic_dw": _cfg()})  # Swin's pretrained cfg (224², head.fc)


def _create_dwnet(variant: str, pretrained: bool = False, **kwargs: Any) -> DWNetSwin:
    """Build with timm's builder (pretrained cfg, features_only as Swin) and the package's input checks."""
    out_indices = kwargs.pop("out_indices", tuple(range(len(kwargs["depths"]))))
    kwargs.setdefault("strict_img_size", False)  # convolutions and padded patch merging take any input size
    model = build_model_with_cfg(DWNetSwin, variant, pretrained,
                                 feature_cfg=dict(flatten_sequential=True, out_indices=out_indices), **kwargs)
    add_input_checks(model)
    return model


@register_model
def swin_t_dynamic_dw(pretrained: bool = False, **kwargs: Any) -> DWNetSwin:
    """Swin-T with every window attention replaced by a 7×7 dynamic depth-wise convolution (Han et al.'s
    D-DWNet-T; ViT-as-DynConv Table 1 "Dynamic DW-Conv." [11])."""
    model_args = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                      drop_path_rate=0.2, kernel_size=7, dynamic=True)
    return _create_dwnet("swin_t_dynamic_dw", pretrained, **dict(model_args, **kwargs))
