"""Backbones for self-supervised runs, and loading a run's teacher backbone for fine-tuning (`ctxagg train --init`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import timm
import torch
from torch import Tensor, nn

from ..checks import add_input_checks
from ..errors import ConfigError
from ..train.checkpoint import CheckpointError, load_checkpoint
from ..train.config import input_size_overrides
from .dino import DINOHead, MultiCropWrapper

__all__ = ["build_backbone", "build_student_teacher", "load_ssl_backbone", "init_from_ssl", "TEACHER_FILE"]

TEACHER_FILE = "teacher.safetensors"  # the teacher backbone a run writes every epoch (``model.<name>`` tensors)


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


def load_ssl_backbone(path: Union[str, Path]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(teacher backbone state dict, run metadata) of a `ctxagg ssl train` run folder, its ``teacher.safetensors``
    or its ``last.safetensors``; the teacher is what DINO evaluates and fine-tunes (Caron et al. 2021, §4)."""
    from ..runs import resolve_run_path

    path = resolve_run_path(path)
    if path.is_dir():
        path = path / TEACHER_FILE
    tensors, meta = load_checkpoint(path)
    for prefix in ("model.", "teacher.backbone."):
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if state:
            return state, meta
    raise CheckpointError(f"{path} holds no self-supervised teacher backbone (no 'model.' or 'teacher.backbone.' "
                          "tensors); pass a `ctxagg ssl train` run folder or its teacher.safetensors")


def init_from_ssl(model: nn.Module, path: Union[str, Path]) -> list[str]:
    """Load a self-supervised run's teacher backbone into ``model`` (a classifier of the same architecture and
    input preset) for fine-tuning; only the classifier may be missing. Returns the keys left at their init."""
    state, meta = load_ssl_backbone(path)
    trained = meta.get("config", {}).get("model", "?")
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(state) & set(own) if state[k].shape != own[k].shape)
    missing = sorted(set(own) - set(state))
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier", "head")
    prefixes = tuple(f"{c}." for c in ([classifier] if isinstance(classifier, str) else classifier))
    stray = [k for k in missing if not k.startswith(prefixes)]
    if unexpected or shapes or stray:
        raise CheckpointError(
            f"the self-supervised backbone in {path} ({trained!r}, img_size "
            f"{meta.get('config', {}).get('img_size', '?')}) does not fit this model: {len(unexpected)} unexpected, "
            f"{len(shapes)} mis-shaped ({', '.join(shapes[:4])}), {len(stray)} missing non-classifier keys "
            f"({', '.join((stray or unexpected)[:4])}); fine-tune the same --model at the same --img-size")
    with torch.no_grad():
        model.load_state_dict(state, strict=False)
    return missing
