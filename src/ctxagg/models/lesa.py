"""LESA-ResNet and its baselines on timm's ResNet (lesa.txt §4.1, Tables 2 and 6).

A torchvision-layout ResNet-50 / WRN-50-2 whose bottleneck 3×3 conv is replaced in stages 3 and 4 by
a spatial mixer: LESA, Static LESA, self-attention (SA) or Attention Augmentation (AA). As §4.1 and the
reference configuration (strides 1, 2, 2, 1): the first block of stage 3 keeps its stride-2 conv, stage
4 runs at stride 1 (output stride 16, after BoTNet [43]) and its first block is replaced too.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Sequence

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import Bottleneck, ResNet
from torch import nn

from ..affinity.lesa import AttentionAugmentedConv, LocallyEnhancedSelfAttention
from ..checks import add_input_checks, state_fixed_input_size

__all__ = ["MixerBottleneck", "LesaResNet", "PAPER_NUMBERS", "MIXERS", "small_input_kwargs"]

MIXERS = ("conv", "sa", "static_lesa", "lesa", "aa")
_LESA_MODE = {"sa": "sa", "static_lesa": "static", "lesa": "lesa"}

_T2, _T6 = "LESA Table 2", "LESA Table 6"
PAPER_NUMBERS: dict[str, dict[str, Any]] = {
    "resnet50_conv": dict(params=25.56, source=_T6, params_tol=0.01),
    "resnet50_sa": dict(params=18.06, source=_T6, params_tol=0.01),
    "resnet50_aa": dict(params=25.15, source=_T6, params_tol=0.03),
    "resnet50_static_lesa": dict(params=20.43, source=_T6, params_tol=0.01),
    "resnet50_lesa": dict(params=23.78, source=_T6, params_tol=0.01),
    "wide_resnet50_conv": dict(params=68.9, source=_T2, params_tol=0.01),
    "wide_resnet50_sa": dict(params=37.7, source=_T2, params_tol=0.01),
    "wide_resnet50_lesa": dict(params=60.6, source=_T2, params_tol=0.01),
}


class MixerBottleneck(Bottleneck):
    """timm's (torchvision v1.5) bottleneck with the 3×3 conv replaced by a spatial mixer (lesa.txt §4.1).

    A block with stride > 1 keeps its conv ("we keep the first bottleneck in stage 3 unchanged").
    LESA and SA end in their own BatchNorm, so ``bn2`` becomes an identity for them; AA keeps ``bn2``
    after its concatenation (Bello et al.). Dilation is ignored: the stride-1 last stage is not dilated,
    as in the reference configuration (paper-silent).
    """

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 mixer: str = "conv", heads: int = 8, grid: Sequence[int] = (14, 14), rel_pos: str = "full",
                 dilation: int = 1, first_dilation: int | None = None, **kwargs: Any):
        super().__init__(inplanes, planes, stride, downsample, dilation=1, first_dilation=1, **kwargs)
        if mixer not in MIXERS:
            raise ValueError(f"unknown mixer {mixer!r}; choose one of {MIXERS}")
        self.mixer = mixer if stride == 1 else "conv"
        width = self.conv2.out_channels
        if self.mixer == "aa":
            self.conv2 = AttentionAugmentedConv(width, heads, grid)
        elif self.mixer != "conv":
            self.conv2 = LocallyEnhancedSelfAttention(width, heads, grid, mode=_LESA_MODE[self.mixer], rel_pos=rel_pos)
            self.bn2 = nn.Identity()


def _stage_block(**kwargs: Any) -> Callable[..., MixerBottleneck]:
    block = partial(MixerBottleneck, **kwargs)
    block.expansion = MixerBottleneck.expansion  # read by timm's make_blocks and ResNet head
    return block


class LesaResNet(ResNet):
    """timm ``ResNet`` with a spatial mixer in chosen stages (lesa.txt §4.1): LESA-ResNet and baselines.

    Args:
        mixer: ``lesa``, ``static_lesa``, ``sa``, ``aa`` or ``conv`` (see :data:`MIXERS`).
        mixer_stages: which stages get the mixer (the paper: the last two).
        heads: attention heads and unary conv groups (§4.1: 8).
        img_size: training size; fixes the relative-position tables at img_size / output_stride
            (any other size still runs, see :class:`~ctxagg.affinity.lesa.RelativePositionTable2d`).
        rel_pos: ``full`` 2-D table or ``factorized`` height + width tables.
        output_stride: 16 puts the last stage at stride 1 (§4.1).
    All other arguments go to timm's ``ResNet`` (``layers``, ``channels``, ``base_width``, ...).
    """

    def __init__(self, mixer: str = "lesa", mixer_stages: Sequence[bool] = (False, False, True, True),
                 heads: int = 8, img_size: Any = 224, rel_pos: str = "full", output_stride: int = 16,
                 layers: Sequence[int] = (3, 4, 6, 3), **kwargs: Any):
        size = to_2tuple(img_size)
        grid = (max(1, size[0] // output_stride), max(1, size[1] // output_stride))
        blocks = tuple(_stage_block(mixer=mixer if use else "conv", heads=heads, grid=grid, rel_pos=rel_pos)
                       for use in mixer_stages)
        super().__init__(block=blocks, layers=tuple(layers), output_stride=output_stride, **kwargs)
        self.mixer = mixer


def _cfg(**kwargs: Any) -> dict:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (14, 14), "crop_pct": 0.875,
        "interpolation": "bilinear", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "conv1", "classifier": "fc", "license": "apache-2.0", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "resnet50_conv": _cfg(),
    "resnet50_sa": _cfg(),
    "resnet50_aa": _cfg(),
    "resnet50_static_lesa": _cfg(),
    "resnet50_lesa": _cfg(),
    "wide_resnet50_conv": _cfg(),
    "wide_resnet50_sa": _cfg(),
    "wide_resnet50_lesa": _cfg(),
})


def small_input_kwargs(model_name: str, img_size: int) -> dict[str, Any]:
    """Model arguments for training at ``img_size``: only ``img_size`` (it sizes the relative-position tables);
    torchvision's stem is kept, so the stride-1 last stage still leaves a 2×2 map at 32²."""
    return dict(img_size=img_size)


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> LesaResNet:
    """Build a LESA-ResNet row with timm's builder (pretrained cfg, features_only) and the input checks."""
    model = build_model_with_cfg(LesaResNet, variant, pretrained, **kwargs)
    add_input_checks(model)  # one forward-pre-hook, as every family
    return state_fixed_input_size(model)


# Paper-silent: the WRN attention uses factorized (height + width) relative tables: Table 2's WRN counts
# (37.7M, 60.6M) are only reached with them, its R50 counts only with full 2-D tables. WRN-50-2: base_width 128.


@register_model
def resnet50_conv(pretrained: bool = False, **kwargs: Any) -> LesaResNet:
    """ResNet-50 convolution baseline on the LESA stride layout (last stage stride 1; lesa.txt Table 6: 25.56M)."""
    model_args = dict(layers=(3, 4, 6, 3), mixer="conv")
    return _create("resnet50_conv", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet50_sa(pretrained: bool = False, **kwargs: Any) -> LesaResNet:
    """ResNet-50 with self-attention in stages 3-4 (lesa.txt Tables 1, 2, 6: 18.06M)."""
    model_args = dict(layers=(3, 4, 6, 3), mixer="sa")
    return _create("resnet50_sa", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet50_aa(pretrained: bool = False, **kwargs: Any) -> LesaResNet:
    """ResNet-50 with Attention Augmentation in stages 3-4 (lesa.txt Table 6: 25.15M)."""
    model_args = dict(layers=(3, 4, 6, 3), mixer="aa")
    return _create("resnet50_aa", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet50_static_lesa(pretrained: bool = False, **kwargs: Any) -> LesaResNet:
    """ResNet-50 with Static LESA (unary + binary, no fusion) in stages 3-4 (lesa.txt Table 6: 20.43M)."""
    model_args = dict(layers=(3, 4, 6, 3), mixer="static_lesa")
    return _create("resnet50_static_lesa", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet50_lesa(pretrained: bool = False, **kwargs: Any) -> LesaResNet:
    """ResNet-50 with LESA in stages 3-4 (lesa.txt §3.2-3.3, Tables 2, 6: 23.78M)."""
    model_args = dict(layers=(3, 4, 6, 3), mixer="lesa")
    return _create("resnet50_lesa", pretrained, **dict(model_args, **kwargs))


@register_model
def wide_resnet50_conv(pretrained: bool = False, **kwargs: Any) -> LesaResNet:
    """WRN-50-2 convolution baseline on the LESA stride layout (lesa.txt Table 2: 68.9M)."""
    model_args = dict(layers=(3, 4, 6, 3), base_width=128, mixer="conv")
    return _create("wide_resnet50_conv", pretrained, **dict(model_args, **kwargs))


@register_model
def wide_resnet50_sa(pretrained: bool = False, **kwargs: Any) -> LesaResNet:
    """WRN-50-2 with self-attention in stages 3-4 (lesa.txt Table 2: 37.7M)."""
    model_args = dict(layers=(3, 4, 6, 3), base_width=128, mixer="sa", rel_pos="factorized")
    return _create("wide_resnet50_sa", pretrained, **dict(model_args, **kwargs))


@register_model
def wide_resnet50_lesa(pretrained: bool = False, **kwargs: Any) -> LesaResNet:
    """WRN-50-2 with LESA in stages 3-4 (lesa.txt Table 2: 60.6M)."""
    model_args = dict(layers=(3, 4, 6, 3), base_width=128, mixer="lesa", rel_pos="factorized")
    return _create("wide_resnet50_lesa", pretrained, **dict(model_args, **kwargs))
