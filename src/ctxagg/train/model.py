"""The model a run trains, and rebuilding it (with its weights) from a `ctxagg train` checkpoint."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import timm
from timm.data import create_transform
from torch import nn

from ..checks import add_input_checks
from ..runs import resolve_run_path
from .checkpoint import CheckpointError, load_checkpoint, load_model_weights
from .config import TrainConfig, input_size_overrides

__all__ = ["build_model", "load_trained_model", "build_eval_transform", "build_train_transform"]


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """The model a run trains: registry name + classes + small-input preset + user overrides."""
    kwargs: dict[str, Any] = dict(num_classes=num_classes, drop_path_rate=cfg.drop_path or 0.0)
    kwargs.update(input_size_overrides(cfg.model, cfg.img_size))
    kwargs.update(cfg.model_kwargs)
    model = timm.create_model(cfg.model, **kwargs)
    add_input_checks(model)  # every family refuses wrong channels/dtype/size and empty batches by name
    return model


def load_trained_model(checkpoint: str, model_name: Optional[str] = None, purpose: str = "use"
                       ) -> tuple[nn.Module, TrainConfig, dict[str, Any], Path]:
    """Rebuild the model a `ctxagg train` checkpoint (file or run folder, ``runs/latest`` followed) holds, with its
    weights loaded.

    Returns (model, run config, checkpoint metadata, checkpoint path); ``model_name``, if given, must match
    the run's model. ``purpose`` words the error for checkpoints that hold no run configuration."""
    path = resolve_run_path(checkpoint)
    path = path / "model_best.safetensors" if path.is_dir() else path
    _, meta = load_checkpoint(path)
    if "config" not in meta:
        raise CheckpointError(f"{path} has no ctxagg run configuration; {purpose} checkpoints written by `ctxagg train`")
    cfg = TrainConfig.from_json(meta["config"])
    if model_name is not None and model_name != cfg.model:
        raise CheckpointError(f"{path} was trained as {cfg.model!r}, not {model_name!r}")
    model = build_model(cfg, meta["num_classes"])
    load_model_weights(model, path)
    return model, cfg, meta, path


def build_eval_transform(img_size: int, mean, std) -> Callable:
    """Resize (bicubic, no crop) and normalise with the run's channel statistics."""
    return create_transform(img_size, is_training=False, interpolation="bicubic", mean=mean, std=std, crop_pct=1.0)


def build_train_transform(cfg: TrainConfig, mean, std) -> Callable:
    """timm's training transform with the recipe's augmentations (RandAugment, random erasing, flips)."""
    return create_transform(
        cfg.img_size, is_training=True, scale=(cfg.scale_min, 1.0), hflip=cfg.hflip, vflip=0.0,
        auto_augment=cfg.randaugment or None, interpolation="bicubic", re_prob=cfg.reprob, re_mode="pixel",
        mean=mean, std=std)
