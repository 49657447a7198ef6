"""Multi-crop views for DINO (Caron et al. 2021, §3.1 and Appendix "Data augmentation"), and the smallest crop a
backbone accepts.

Two global views (random-resized crops of scale 0.4-1) and N local views (scale 0.05-0.4) with BYOL's
augmentations: horizontal flip, colour jitter (0.4, 0.4, 0.2, 0.1; p = 0.8), grey-scale (p = 0.2), Gaussian blur
(p = 1.0 / 0.1 for the two global views, 0.5 for the local ones) and solarisation (p = 0.2, second global view).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

from torch import Tensor, nn
from torchvision import transforms as T

from ..checks import input_spec
from ..errors import ConfigError

__all__ = ["MultiCropTransform", "min_crop_size", "default_local_size", "check_crop_size"]

# DINO's ImageNet sizes: global 224², local 96²; small images keep the same ratio
DINO_LOCAL_RATIO = 96 / 224


def _reduction(model: nn.Module) -> Optional[int]:
    info = getattr(model, "feature_info", None)
    if isinstance(info, list) and info and isinstance(info[-1], dict) and "reduction" in info[-1]:
        return int(info[-1]["reduction"])
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    return int(patch[0]) if isinstance(patch, (tuple, list)) else None


def min_crop_size(model: nn.Module) -> tuple[int, Optional[int]]:
    """(step, fixed): crops must be a positive multiple of ``step``, the backbone's total stride (its last
    ``feature_info`` reduction, else its patch size), so the last stage keeps at least a 1×1 map; ``fixed`` is the
    only size a fixed-size backbone (token-MLP affinities, strict position tables) accepts, else None."""
    spec = input_spec(model)
    fixed = spec.fixed_size[0] if spec.fixed_size is not None else None
    step = _reduction(model)
    if step is None:
        raise ConfigError(f"cannot tell the smallest input of {spec.name}: it has neither timm's feature_info nor a "
                          "patch_embed; pass --local-crop-size explicitly")
    return step, fixed


def check_crop_size(model: nn.Module, size: int, what: str = "local crop") -> None:
    """Refuse a crop ``size`` the backbone cannot take, naming the allowed sizes."""
    step, fixed = min_crop_size(model)
    name = input_spec(model).name
    if fixed is not None and size != fixed:
        raise ConfigError(f"{what} size {size}² is impossible for {name}: it has fixed-size layers built for "
                          f"{fixed}² input only (local crops need a model that takes several sizes; for a ViT/DeiT "
                          f"pass --model-kwargs '{{\"dynamic_img_size\": true}}')")
    if size < step or size % step:
        raise ConfigError(f"{what} size {size}² does not fit {name}: its total stride is {step}, so crops must be a "
                          f"multiple of {step} (at least {step}²); e.g. --local-crop-size {max(step, size // step * step)}")


def default_local_size(model: nn.Module, global_size: int) -> int:
    """DINO's local/global ratio (96/224) rounded up to the backbone's stride, never above the global size."""
    step, fixed = min_crop_size(model)
    if fixed is not None:
        return fixed
    return min(global_size, max(step, math.ceil(global_size * DINO_LOCAL_RATIO / step) * step))


def _blur(size: int, p: float) -> T.RandomApply:
    # paper-silent at small sizes: DINO's blur radius 0.1-2 px at 224² (global and local views alike) is scaled by
    # global size/224 (kernel odd, ≥ 3)
    scale = size / 224
    kernel = max(3, 2 * math.ceil(3 * 2.0 * scale) + 1)
    return T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1 * scale, 2.0 * scale))], p=p)


class MultiCropTransform:
    """DINO's multi-crop augmentation (Caron et al. 2021, §3.1; Appendix): a PIL image → [global₁, global₂,
    local₁ … local_N] tensors, normalised with ``mean``/``std``."""

    def __init__(self, global_size: int, local_size: int, n_local: int, mean: Sequence[float],
                 std: Sequence[float], global_scale: tuple[float, float] = (0.4, 1.0),
                 local_scale: tuple[float, float] = (0.05, 0.4), hflip: float = 0.5):
        if n_local < 0:
            raise ConfigError(f"the number of local crops must be 0 or more, got {n_local}")
        for name, (lo, hi) in (("global", global_scale), ("local", local_scale)):
            if not 0 < lo <= hi <= 1:
                raise ConfigError(f"{name} crop scale must satisfy 0 < min <= max <= 1, got ({lo}, {hi})")
        flip_jitter = [T.RandomHorizontalFlip(p=hflip),
                       T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(p=0.2)]
        normalize = [T.ToTensor(), T.Normalize(mean, std)]
        crop = dict(interpolation=T.InterpolationMode.BICUBIC)
        self.global1 = T.Compose([T.RandomResizedCrop(global_size, scale=global_scale, **crop), *flip_jitter,
                                  _blur(global_size, 1.0), *normalize])
        self.global2 = T.Compose([T.RandomResizedCrop(global_size, scale=global_scale, **crop), *flip_jitter,
                                  _blur(global_size, 0.1), T.RandomSolarize(128, p=0.2), *normalize])
        self.local = T.Compose([T.RandomResizedCrop(local_size, scale=local_scale, **crop), *flip_jitter,
                                _blur(global_size, 0.5), *normalize])
        self.n_local = n_local

    def __call__(self, image: Any) -> list[Tensor]:
        return [self.global1(image), self.global2(image)] + [self.local(image) for _ in range(self.n_local)]
