"""Semantic FPN (Kirillov et al. 2019, "Panoptic Feature Pyramid Networks", §3 semantic branch), as LinGlos
uses it on ADE20K (linglos.txt §4.3, Table 4)."""
from __future__ import annotations

from typing import Any, Optional

import torch.nn.functional as F
from torch import Tensor, nn

from .backbone import TimmFPN, create_dense_backbone

__all__ = ["SemanticFPN", "build_semantic_fpn"]


def _upsample_branch(in_channels: int, channels: int, doublings: int) -> nn.Sequential:
    """Kirillov et al. Fig. 3: from a level at 1/2^(k+2), k conv3×3–GN–ReLU–2× bilinear upsampling stages
    (one conv, no upsampling, at 1/4), ending at 1/4 with ``channels`` maps. GN groups: 32 (the paper)."""
    layers: list[nn.Module] = []
    for i in range(max(doublings, 1)):
        layers += [nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1, bias=False),
                   nn.GroupNorm(min(32, channels), channels), nn.ReLU(inplace=True)]
        if doublings > 0:
            layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
    return nn.Sequential(*layers)


class SemanticFPN(nn.Module):
    """Semantic FPN: an FPN (256 ch) on P2–P5, each level brought to 1/4 resolution by
    :func:`_upsample_branch` (128 ch), summed element-wise, then a 1×1 classifier and 4× bilinear upsampling to
    the input size (Kirillov et al. 2019 §3, Fig. 3). ``forward`` returns logits (B, num_classes, H, W)."""

    def __init__(self, fpn: TimmFPN, num_classes: int, channels: int = 128, dropout: float = 0.1):
        super().__init__()
        self.fpn = fpn
        strides = fpn.body.strides
        base = strides[0]
        self.branches = nn.ModuleList(_upsample_branch(fpn.out_channels, channels, (s // base).bit_length() - 1)
                                      for s in strides)
        self.dropout = nn.Dropout2d(dropout)  # paper-silent: mmsegmentation's 0.1 dropout before the classifier
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self.num_classes = num_classes

    def forward(self, x: Tensor) -> Tensor:
        maps = list(self.fpn(x).values())[:len(self.branches)]
        out = self.branches[0](maps[0])
        for branch, feat in zip(self.branches[1:], maps[1:]):
            y = branch(feat)
            out = out + (y if y.shape[-2:] == out.shape[-2:] else
                         F.interpolate(y, size=out.shape[-2:], mode="bilinear", align_corners=False))
        logits = self.classifier(self.dropout(out))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def build_semantic_fpn(backbone: str, num_classes: int, fpn_channels: int = 256, channels: int = 128,
                       frozen_stages: int = 0, frozen_bn: bool = False, backbone_checkpoint: Optional[str] = None,
                       model_kwargs: Optional[dict[str, Any]] = None) -> SemanticFPN:
    """Semantic FPN on ``backbone``'s last four feature levels (strides 4–32 for hierarchical backbones)."""
    body = create_dense_backbone(backbone, num_levels=4, frozen_stages=frozen_stages, frozen_bn=frozen_bn,
                                 checkpoint=backbone_checkpoint, **(model_kwargs or {}))
    return SemanticFPN(TimmFPN(body, fpn_channels), num_classes, channels)
