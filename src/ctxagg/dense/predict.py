"""Inference of a dense model on a list of images: detections, or per-pixel class maps at a requested size."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import DenseConfig

__all__ = ["predict"]


@torch.no_grad()
def predict(model: nn.Module, cfg: DenseConfig, images: list[Tensor], device: torch.device,
            out_sizes: Optional[list[tuple[int, int]]] = None) -> list[Any]:
    """Detections (list of dicts) or per-image class maps at ``out_sizes`` (default: the input sizes)."""
    model.eval()
    if cfg.task == "detect":
        return [{k: v.cpu() for k, v in p.items()} for p in model([i.to(device) for i in images])]
    maps = []
    for image, size in zip(images, out_sizes or [tuple(i.shape[-2:]) for i in images]):
        logits = model(image[None].to(device))
        maps.append(F.interpolate(logits, size=size, mode="bilinear", align_corners=False).argmax(1)[0].cpu())
    return maps
