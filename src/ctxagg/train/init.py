"""Initialising a classifier from another run's backbone: a `ctxagg ssl train` run's teacher (DINO's fine-tuning
path, Caron et al. 2021 §4; container.txt §4.5), for ``ctxagg train --init RUN``."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor, nn

from ..runs import resolve_run_path
from .checkpoint import CheckpointError, load_checkpoint

__all__ = ["TEACHER_FILE", "load_ssl_backbone", "init_from_ssl"]

TEACHER_FILE = "teacher.safetensors"  # the teacher backbone an SSL run writes every epoch (``model.<name>`` tensors)


def load_ssl_backbone(path: Union[str, Path]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(teacher backbone state dict, run metadata) of a `ctxagg ssl train` run folder, its ``teacher.safetensors``
    or its ``last.safetensors``; the teacher is what DINO evaluates and fine-tunes (Caron et al. 2021, §4)."""
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
