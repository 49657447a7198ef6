"""torchvision detectors on any timm backbone: RetinaNet, FCOS, Faster R-CNN, Mask R-CNN (+ FPN).

The settings the papers' detection tables use (container.txt Tables 4–5, linglos.txt Table 3, lesa.txt §4.3):
RetinaNet on P3–P7 (Lin et al. 2017b), FCOS on P3–P7 (Tian et al. 2019), Faster / Mask R-CNN on P2–P5 + a
max-pooled P6 (He et al. 2017). Every detector takes ``list[Tensor]`` images in [0, 1] and targets
``{"boxes": xyxy pixels, "labels": 1..C, "masks": (N, H, W)}`` — label 0 is background for all of them.
"""
from __future__ import annotations

from typing import Any, Optional

from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from ..errors import ConfigError
from .backbone import TimmFPN, create_dense_backbone

__all__ = ["TORCHVISION_DETECTORS", "build_torchvision_detector", "retinanet_anchors", "rcnn_anchors"]

TORCHVISION_DETECTORS = ("retinanet", "fcos", "faster_rcnn", "mask_rcnn")


def retinanet_anchors(strides: tuple[int, ...]) -> AnchorGenerator:
    """RetinaNet anchors (Lin et al. 2017b §4): per level 3 scales 4s·{2^0, 2^(1/3), 2^(2/3)} for stride s
    (32 px at P3) and aspect ratios {1:2, 1:1, 2:1}."""
    sizes = tuple(tuple(int(4 * s * 2 ** (k / 3)) for k in range(3)) for s in strides)
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(strides))


def rcnn_anchors(strides: tuple[int, ...]) -> AnchorGenerator:
    """FPN-RPN anchors (Lin et al. 2017 §4.1): one scale 8s per level (32 px at P2) and ratios {1:2, 1:1, 2:1}."""
    return AnchorGenerator(tuple((8 * s,) for s in strides), ((0.5, 1.0, 2.0),) * len(strides))


def _fcos_anchors(strides: tuple[int, ...]) -> AnchorGenerator:
    # FCOS is anchor-free; torchvision encodes its locations as one square "anchor" of side s per level
    return AnchorGenerator(tuple((s,) for s in strides), ((1.0,),) * len(strides))


def _backbone(name: str, levels: int, extra: nn.Module, opts: dict[str, Any]) -> TimmFPN:
    body = create_dense_backbone(name, num_levels=levels, frozen_stages=opts.get("frozen_stages", 0),
                                 frozen_bn=opts.get("frozen_bn", False), checkpoint=opts.get("backbone_checkpoint"),
                                 **opts.get("model_kwargs", {}))
    return TimmFPN(body, opts.get("fpn_channels", 256), extra_blocks=extra)


def build_torchvision_detector(arch: str, backbone: str, num_classes: int, min_size: int = 800,
                               max_size: int = 1333, image_mean: Optional[list[float]] = None,
                               image_std: Optional[list[float]] = None, **opts: Any) -> nn.Module:
    """``arch`` (one of :data:`TORCHVISION_DETECTORS`) on ``backbone`` + FPN, for ``num_classes`` object classes
    (labels 1..num_classes; torchvision's heads get num_classes + 1 outputs, 0 = background).

    ``min_size``/``max_size``: torchvision's resize (the papers' 800×1333; smaller at CPU scale).
    ``opts``: ``frozen_stages``, ``frozen_bn``, ``backbone_checkpoint``, ``fpn_channels``, ``model_kwargs``, and
    ``detector_kwargs`` passed to the torchvision constructor (e.g. ``box_detections_per_img``,
    ``rpn_pre_nms_top_n_train``, ``box_batch_size_per_image``, ``detections_per_img``)."""
    if arch not in TORCHVISION_DETECTORS:
        raise ConfigError(f"unknown detector {arch!r}; choose one of {TORCHVISION_DETECTORS}")
    if num_classes < 1:
        raise ConfigError(f"num_classes must be at least 1, got {num_classes}")
    common = dict(min_size=min_size, max_size=max_size, image_mean=image_mean or [0.485, 0.456, 0.406],
                  image_std=image_std or [0.229, 0.224, 0.225], **opts.get("detector_kwargs", {}))
    channels = opts.get("fpn_channels", 256)
    if arch in ("retinanet", "fcos"):  # P3-P5 from the backbone, P6-P7 by stride-2 convs on P5
        fpn = _backbone(backbone, 3, LastLevelP6P7(channels, channels), opts)
        strides = fpn.body.strides + (fpn.body.strides[-1] * 2, fpn.body.strides[-1] * 4)
        if arch == "retinanet":
            return RetinaNet(fpn, num_classes + 1, anchor_generator=retinanet_anchors(strides), **common)
        return FCOS(fpn, num_classes + 1, anchor_generator=_fcos_anchors(strides), **common)
    fpn = _backbone(backbone, 4, LastLevelMaxPool(), opts)  # P2-P5 + max-pooled P6 for the RPN
    strides = fpn.body.strides + (fpn.body.strides[-1] * 2,)
    names = [str(i) for i in range(4)]
    box_pool = MultiScaleRoIAlign(names, output_size=7, sampling_ratio=2)
    if arch == "faster_rcnn":
        return FasterRCNN(fpn, num_classes + 1, rpn_anchor_generator=rcnn_anchors(strides), box_roi_pool=box_pool,
                          **common)
    mask_pool = MultiScaleRoIAlign(names, output_size=14, sampling_ratio=2)
    return MaskRCNN(fpn, num_classes + 1, rpn_anchor_generator=rcnn_anchors(strides), box_roi_pool=box_pool,
                    mask_roi_pool=mask_pool, **common)
