"""Any timm model (ctxagg's or timm's own) as a multi-scale feature extractor with an FPN on top.

torchvision's ``BackboneWithFPN`` wants an ``IntermediateLayerGetter`` over named children, which a timm model
with its own ``forward_intermediates`` does not fit; :class:`TimmFeatures` uses timm's
``forward_intermediates`` and ``feature_info`` instead, and :class:`TimmFPN` puts torchvision's
``FeaturePyramidNetwork`` (Lin et al. 2017) on it, exposing ``out_channels`` as torchvision's detectors expect.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Optional, Sequence

import timm
import torch
from timm.models.resnet import ResNet
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from timm.utils.model import freeze_batch_norm_2d
from torch import Tensor, nn
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, FeaturePyramidNetwork

from ..errors import ConfigError

__all__ = ["TimmFeatures", "TimmFPN", "SimplePyramid", "dense_model_kwargs", "create_dense_backbone",
           "FixedSizeBackboneError"]


class FixedSizeBackboneError(ConfigError):
    """A backbone whose mixers are built for one input size cannot serve detection or segmentation."""


def dense_model_kwargs(model_name: str) -> dict[str, Any]:
    """The creation kwargs that let ``model_name`` take any input size with the strides an FPN needs.

    ViT/DeiT: ``dynamic_img_size=True`` (position embeddings resampled per input); Swin: ``strict_img_size=False``
    (windows padded); ResNets (LESA included, whose classification form is output stride 16 by design,
    lesa.txt §4.1): ``output_stride=32`` so the last stage gives the C5 level of an FPN. Others: none."""
    try:
        with torch.device("meta"):  # read the class without allocating weights
            probe = timm.create_model(model_name)
    except (NotImplementedError, RuntimeError) as exc:  # a constructor that copies data cannot run on meta
        if "Unknown model" in str(exc):
            raise ConfigError(f"unknown model {model_name!r}; `ctxagg models` lists the registered ones") from exc
        probe = timm.create_model(model_name)
    if isinstance(probe, VisionTransformer):
        return dict(dynamic_img_size=True)
    if isinstance(probe, SwinTransformer):
        return dict(strict_img_size=False)
    if isinstance(probe, ResNet):
        return dict(output_stride=32)
    return {}


def _fixed_size(model: nn.Module, model_name: str) -> Optional[tuple[int, int]]:
    fixed = getattr(model, "fixed_img_size", None)
    if fixed is None and getattr(model, "pretrained_cfg", {}).get("fixed_input_size", False):
        if not getattr(model, "dynamic_img_size", False):
            fixed = tuple(model.pretrained_cfg["input_size"][-2:])
    return tuple(fixed) if fixed is not None else None


class SimplePyramid(nn.Module):
    """ViTDet's simple feature pyramid (Li et al. 2022, §3 "simple feature pyramid"): the last map of a
    single-stride (isotropic) backbone resampled to each wanted stride by stride-2 transposed convs (up) or 2×2
    max-pooling (down). Paper-silent here: GELU between two transposed convs, no norm (ViTDet adds LN)."""

    def __init__(self, channels: int, in_stride: int, strides: Sequence[int]):
        super().__init__()
        self.strides = tuple(strides)
        self.branches = nn.ModuleList(self._branch(channels, in_stride, s) for s in self.strides)

    @staticmethod
    def _branch(channels: int, in_stride: int, stride: int) -> nn.Module:
        layers: list[nn.Module] = []
        while in_stride > stride:
            layers += [nn.ConvTranspose2d(channels, channels, 2, stride=2), nn.GELU()]
            in_stride //= 2
        while in_stride < stride:
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
            in_stride *= 2
        if in_stride != stride:
            raise ConfigError(f"stride {stride} cannot be reached from {in_stride} by factors of 2")
        return nn.Sequential(*(layers[:-1] if layers and isinstance(layers[-1], nn.GELU) else layers))

    def forward(self, x: Tensor) -> list[Tensor]:
        return [branch(x) for branch in self.branches]


class TimmFeatures(nn.Module):
    """The last ``num_levels`` feature maps of a timm model (e.g. C3–C5 at strides 8/16/32), NCHW, via
    ``forward_intermediates``; ``strides`` says which strides they have.

    Hierarchical backbones give one stage output per stride (the last stage at each stride); isotropic ones
    (ViT/DeiT, one stride s) go through :class:`SimplePyramid` to strides 2s/2^(num_levels-1), …, s, 2s. ``frozen_stages`` freezes the stem and the first N stages
    (mmdetection's meaning; -1 or 0: nothing frozen); ``frozen_bn`` swaps every BatchNorm2d for timm's
    FrozenBatchNorm2d, as the papers' 1× detection schedules do."""

    def __init__(self, model: nn.Module, num_levels: int = 3, frozen_stages: int = 0, frozen_bn: bool = False,
                 model_name: str = "model"):
        super().__init__()
        fixed = _fixed_size(model, model_name)
        if fixed is not None:
            raise FixedSizeBackboneError(
                f"{model_name} has fixed-size mixers built for {fixed[0]}×{fixed[1]} inputs (e.g. token MLPs); "
                "detection and segmentation resize images to many sizes. Use a backbone that takes any size "
                "(container_light, linglo_*, resnet50_*, deit_*, swin_*)")
        info = list(model.feature_info)
        have = sorted({int(f["reduction"]) for f in info})
        self.model = model
        self.build_kwargs: dict[str, Any] = {}  # set by create_dense_backbone
        self.pyramid: Optional[SimplePyramid] = None
        if len(have) == 1:  # isotropic: resample the last map (ViTDet)
            self.strides = tuple(have[0] * 2 // 2 ** k for k in reversed(range(num_levels)))
            self.indices = [len(info) - 1]
            self.pyramid = SimplePyramid(int(info[-1]["num_chs"]), have[0], self.strides)
            self.channels = [int(info[-1]["num_chs"])] * num_levels
        else:
            if not 1 <= num_levels <= len(have):
                raise ConfigError(f"{model_name} has {len(have)} feature strides {have}; asked for {num_levels} levels")
            self.strides = tuple(have[-num_levels:])
            self.indices = [max(i for i, f in enumerate(info) if int(f["reduction"]) == s) for s in self.strides]
            self.channels = [int(info[i]["num_chs"]) for i in self.indices]
        model.prune_intermediate_layers(self.indices, prune_norm=True, prune_head=True)  # features skip the final norm
        self._freeze(info, frozen_stages)
        if frozen_bn:
            self.model = freeze_batch_norm_2d(self.model)

    def _freeze(self, info: list[dict], frozen_stages: int) -> None:
        if frozen_stages <= 0:
            return
        stages = [f["module"] for f in info if int(f["reduction"]) >= 4]
        if frozen_stages > len(stages):
            raise ConfigError(f"frozen_stages={frozen_stages} but the backbone has {len(stages)} stages")
        last = stages[frozen_stages - 1]
        names = [n for n, _ in self.model.named_parameters()]
        stop = max(i for i, n in enumerate(names) if n.startswith(last + ".") or n.startswith(last.replace(".", "_")
                                                                                               + "."))
        for i, (_, param) in enumerate(self.model.named_parameters()):
            if i <= stop:
                param.requires_grad_(False)

    def forward(self, x: Tensor) -> list[Tensor]:
        maps = self.model.forward_intermediates(x, indices=self.indices, intermediates_only=True)
        if self.pyramid is not None:
            return self.pyramid(maps[-1])
        return list(maps)


class TimmFPN(nn.Module):
    """:class:`TimmFeatures` + torchvision ``FeaturePyramidNetwork`` (Lin et al. 2017, Fig. 3: lateral 1×1,
    top-down nearest ×2 and sum, 3×3 output conv), returning an ``OrderedDict`` of maps ('0', '1', ... and the
    extra block's 'p6'/'p7' or 'pool'), with ``out_channels`` as torchvision's detectors read it."""

    def __init__(self, body: TimmFeatures, out_channels: int = 256, extra_blocks: Optional[ExtraFPNBlock] = None,
                 norm_layer: Optional[type] = None):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.channels, out_channels, extra_blocks=extra_blocks,
                                         norm_layer=norm_layer)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        maps = self.body(x)
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))


def create_dense_backbone(model_name: str, num_levels: int = 3, frozen_stages: int = 0,
                          frozen_bn: bool = False, checkpoint: Optional[str] = None,
                          **model_kwargs: Any) -> TimmFeatures:
    """Build ``model_name`` for dense prediction (any input size; see :func:`dense_model_kwargs`), optionally
    initialised from a ``ctxagg train`` checkpoint (its classifier is dropped), and wrap it in
    :class:`TimmFeatures`."""
    kwargs = {**dense_model_kwargs(model_name), **model_kwargs}
    if checkpoint is not None:
        model, kwargs = _load_classifier_checkpoint(model_name, checkpoint, kwargs)
    else:
        model = timm.create_model(model_name, pretrained=False, **kwargs)
    features = TimmFeatures(model, num_levels, frozen_stages, frozen_bn, model_name)
    features.build_kwargs = kwargs  # what rebuilds this architecture without the checkpoint (saved with runs)
    return features


def _load_classifier_checkpoint(model_name: str, checkpoint: str, kwargs: dict[str, Any]
                                ) -> tuple[nn.Module, dict[str, Any]]:
    from ..train.checkpoint import load_checkpoint, load_model_weights
    from ..train.config import input_size_overrides
    from ..runs import resolve_run_path

    path = resolve_run_path(checkpoint)
    path = path / "model_best.safetensors" if path.is_dir() else path
    _, meta = load_checkpoint(path) if path.suffix == ".safetensors" else (None, {})
    trained = meta.get("config", {}).get("model")
    if trained is not None and trained != model_name:
        raise ConfigError(f"--backbone-checkpoint {checkpoint} holds a {trained!r} model, not {model_name!r}")
    run_cfg = meta.get("config", {})
    run_kwargs = dict(input_size_overrides(model_name, int(run_cfg["img_size"]))) if "img_size" in run_cfg else {}
    run_kwargs.update(run_cfg.get("model_kwargs") or {})  # the architecture the run trained (small-input stems)
    num_classes = int(meta.get("num_classes", 1000))
    kwargs = {**run_kwargs, **kwargs}
    model = timm.create_model(model_name, pretrained=False, num_classes=num_classes, **kwargs)
    load_model_weights(model, path)
    return model, kwargs
