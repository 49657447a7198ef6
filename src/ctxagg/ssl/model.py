"""Backbones for self-supervised runs, and loading a run's teacher backbone for fine-tuning (`ctxagg train --init`)."""
from __future__ import annotations

from typing import Any

import timm
from torch import nn

from ..checks import add_input_checks
from ..errors import ConfigError
from ..train.config import input_size_overrides
from ..train.init import TEACHER_FILE, init_from_ssl, load_ssl_backbone  # noqa: F401  (re-exported)
from .dino import DINOHead, MultiCropWrapper

__all__ = ["build_backbone", "build_student_teacher", "load_ssl_backbone", "init_from_ssl", "TEACHER_FILE"]


def build_backbone(name: str, img_size: int, drop_path: float = 0.0, model_kwargs: dict[str, Any] = None
                   ) -> nn.Module:
    """A timm-registered backbone without classifier (``num_classes=0``: forward returns pooled features), with
    the small-input preset of ``ctxagg train`` (:func:`ctxagg.train.config.input_size_overrides`)."""
    from timm.models._registry import model_entrypoint

    kwargs: dict[str, Any] = dict(num_classes=0, drop_path_rate=drop_path)
    kwargs.update(input_size_overrides(name, img_size))
    if model_entrypoint(name).__module__.split(".")[-1] == "vit":
        # DINO resamples the ViT position embedding for local crops (its interpolate_pos_encoding): timm's
        # dynamic_img_size does the same
        kwargs["dynamic_img_size"] = True
    kwargs.update(model_kwargs or {})
    model = timm.create_model(name, **kwargs)
    if not hasattr(model, "num_features"):
        raise ConfigError(f"{name} has no num_features: DINO needs a backbone with forward_features and pooling")
    add_input_checks(model)
    return model


def build_student_teacher(cfg: Any) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Student (drop path ``cfg.drop_path``) and teacher (no drop path, DINO's choice) with identical starting
    weights; the teacher takes no gradients (Caron et al. 2021, §3.1)."""
    def make(drop_path: float) -> MultiCropWrapper:
        backbone = build_backbone(cfg.model, cfg.img_size, drop_path, cfg.model_kwargs)
        head = DINOHead(backbone.num_features, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim,
                        norm_last_layer=cfg.norm_last_layer)
        return MultiCropWrapper(backbone, head)

    student = make(cfg.drop_path)
    teacher = make(0.0)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher
