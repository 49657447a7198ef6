"""DETR, Conditional DETR and Deformable DETR (Hugging Face transformers ≥ 5) on any timm backbone.

The model is configured with a ``TimmBackboneConfig(backbone=<name>, out_indices=...)`` object (never a bare
name, which would make transformers query the network hub; ``use_pretrained_backbone=False``). transformers
builds that timm model and swaps each BatchNorm2d for a frozen copy (``replace_batch_norm``); the encoder's
module is then replaced by the same :class:`~ctxagg.dense.backbone.TimmFeatures` the torchvision detectors
use, so dynamic input sizes (DeiT/Swin), LESA's output stride 32, checkpoint initialisation and frozen stages
follow one code path.

Frozen BN and backbones trained from scratch: a frozen BN copies the running statistics of the layer it
replaces; for a freshly initialised backbone those are mean 0, variance 1, so "frozen BN" would silently turn
every BatchNorm into the identity and train the backbone with no normalisation at all. So BN is frozen only
when the backbone is initialised from a checkpoint (``backbone_checkpoint``, the papers' pretrain → fine-tune
path, container.txt §4.2); from scratch it stays a trainable BatchNorm2d (``frozen_bn`` overrides either way).
Deformable DETR runs on transformers' pure-PyTorch multi-scale deformable attention (no custom kernel needed).
"""
from __future__ import annotations

import os
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import box_convert

from ..errors import ConfigError
from .backbone import TimmFeatures, create_dense_backbone

__all__ = ["DETR_DETECTORS", "DetrDetector", "build_detr_detector"]

DETR_DETECTORS = ("detr", "conditional_detr", "deformable_detr")


def _transformers_classes(arch: str) -> tuple[Any, Any, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the network hub
    import transformers as tf

    return {"detr": (tf.DetrConfig, tf.DetrForObjectDetection, tf.DetrImageProcessor),
            "conditional_detr": (tf.ConditionalDetrConfig, tf.ConditionalDetrForObjectDetection,
                                 tf.ConditionalDetrImageProcessor),
            "deformable_detr": (tf.DeformableDetrConfig, tf.DeformableDetrForObjectDetection,
                                tf.DeformableDetrImageProcessor)}[arch]


class DetrDetector(nn.Module):
    """A transformers DETR-family model behind torchvision's detector interface (Carion et al. 2020; Meng et al.
    2021; Zhu et al. 2021): ``forward(images, targets)`` returns ``{"loss_detr": ...}`` in training and
    ``[{"boxes", "scores", "labels"}]`` in pixels with labels 1..C in eval. Images are resized, normalised and
    padded by torchvision's ``GeneralizedRCNNTransform``; the padding is masked out with ``pixel_mask``."""

    def __init__(self, model: nn.Module, processor: Any, min_size: int, max_size: int, image_mean: list[float],
                 image_std: list[float], top_k: int = 100):
        super().__init__()
        self.model = model
        self.processor = processor
        self.top_k = top_k
        self.transform = GeneralizedRCNNTransform(min_size, max_size, image_mean, image_std, size_divisible=32)

    def _labels(self, targets: list[dict[str, Tensor]], sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        out = []
        for target, (h, w) in zip(targets, sizes):  # DETR: centre-size boxes normalised by the unpadded image
            scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=target["boxes"].device)
            boxes = box_convert(target["boxes"].float(), "xyxy", "cxcywh") / scale
            out.append(dict(class_labels=target["labels"] - 1, boxes=boxes))
        return out

    def forward(self, images: list[Tensor], targets: Optional[list[dict[str, Tensor]]] = None):
        original = [tuple(img.shape[-2:]) for img in images]
        batch, targets = self.transform(images, targets)
        mask = torch.zeros(batch.tensors.shape[0], *batch.tensors.shape[-2:], dtype=torch.long,
                           device=batch.tensors.device)
        for i, (h, w) in enumerate(batch.image_sizes):
            mask[i, :h, :w] = 1
        if self.training:
            if targets is None:
                raise ValueError("DETR training needs targets")
            out = self.model(pixel_values=batch.tensors, pixel_mask=mask,
                             labels=self._labels(targets, batch.image_sizes))
            return {"loss_detr": out.loss}
        out = self.model(pixel_values=batch.tensors, pixel_mask=mask)
        kwargs = {} if isinstance(self.processor, _transformers_classes("detr")[2]) else dict(top_k=self.top_k)
        results = self.processor.post_process_object_detection(out, threshold=0.0, target_sizes=original, **kwargs)
        return [dict(boxes=r["boxes"], scores=r["scores"], labels=r["labels"] + 1) for r in results]


def _out_indices(body: TimmFeatures) -> list[int]:
    if body.pyramid is not None:  # isotropic: as many block outputs as levels (same channels)
        return list(range(body.indices[0] - len(body.strides) + 1, body.indices[0] + 1))
    return list(body.indices)


def _level_projections(model: nn.Module, levels: int) -> list[tuple[nn.Module, str, int]]:
    """(parent, name, backbone level) of every conv that reads a backbone map: DETR / Conditional DETR's
    ``input_projection`` (the last level); Deformable DETR's ``input_proj[i][0]`` per level and the first extra
    stride-2 level, which reads the last map (later extras read d_model channels)."""
    inner = model.model
    if hasattr(inner, "input_projection"):
        return [(inner, "input_projection", -1)]
    return [(inner.input_proj[i], "0", i if i < levels else -1) for i in range(min(levels + 1, len(inner.input_proj)))]


def _swap_backbone(model: nn.Module, body: TimmFeatures) -> None:
    """Put ``body`` in place of the timm model transformers built from the name alone (transformers passes no
    model kwargs to timm), re-making the projections that read its maps where their channel counts differ."""
    encoder = getattr(model.model.backbone, "conv_encoder", model.model.backbone)
    built, wanted = list(encoder.intermediate_channel_sizes), list(body.channels)
    if len(built) != len(wanted):
        raise ConfigError(f"transformers built {len(built)} backbone levels, the adapter gives {len(wanted)}")
    if built != wanted:
        for parent, name, level in _level_projections(model, len(wanted)):
            old = getattr(parent, name)
            conv = nn.Conv2d(wanted[level], old.out_channels, old.kernel_size, old.stride, old.padding,
                             bias=old.bias is not None)
            nn.init.xavier_uniform_(conv.weight)  # Deformable DETR's input_proj init, used for all three
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
            setattr(parent, name, conv)
        encoder.intermediate_channel_sizes = wanted
    encoder.model = body


def build_detr_detector(arch: str, backbone: str, num_classes: int, min_size: int = 800, max_size: int = 1333,
                        image_mean: Optional[list[float]] = None, image_std: Optional[list[float]] = None,
                        frozen_bn: Optional[bool] = None, **opts: Any) -> DetrDetector:
    """``arch`` (one of :data:`DETR_DETECTORS`) on ``backbone``; labels 1..num_classes as the torchvision ones.

    ``opts``: ``backbone_checkpoint``, ``frozen_stages``, ``model_kwargs`` and transformer sizes passed to the
    transformers config (``d_model``, ``encoder_layers``, ``decoder_layers``, ``num_queries``, ...; their
    defaults are the papers')."""
    if arch not in DETR_DETECTORS:
        raise ConfigError(f"unknown detector {arch!r}; choose one of {DETR_DETECTORS}")
    config_cls, model_cls, processor_cls = _transformers_classes(arch)
    from transformers import TimmBackboneConfig

    checkpoint = opts.pop("backbone_checkpoint", None)
    levels = 3 if arch == "deformable_detr" else 1  # Deformable DETR: C3-C5 (+ a stride-2 conv level)
    body = create_dense_backbone(backbone, num_levels=levels, frozen_stages=opts.pop("frozen_stages", 0),
                                 frozen_bn=checkpoint is not None if frozen_bn is None else frozen_bn,
                                 checkpoint=checkpoint, **opts.pop("model_kwargs", {}))
    backbone_config = TimmBackboneConfig(backbone=backbone, out_indices=_out_indices(body),
                                         use_pretrained_backbone=False)
    extra = dict(num_feature_levels=levels + 1) if arch == "deformable_detr" else {}
    config = config_cls(backbone_config=backbone_config, use_pretrained_backbone=False, use_timm_backbone=False,
                        num_labels=num_classes, **{**extra, **opts})
    model = model_cls(config)
    _swap_backbone(model, body)
    return DetrDetector(model, processor_cls(), min_size, max_size, image_mean or [0.485, 0.456, 0.406],
                        image_std or [0.229, 0.224, 0.225])
