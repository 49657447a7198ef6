"""Evaluation: the validation loop `ctxagg train` runs every epoch, and `ctxagg eval` (top-1/top-5, per-class
accuracy and a confusion-matrix PNG for a trained checkpoint)."""
from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from timm.utils import accuracy
from torch import nn
from torch.utils.data import DataLoader

from ..errors import ConfigError
from ..runs import new_run_dir, output_dir, refuse_existing
from .checkpoint import atomic_write
from .data import ArrayDataset, load_dataset
from .distributed import resolve_device
from .model import build_eval_transform, load_trained_model
from .plots import plot_confusion

__all__ = ["evaluate", "evaluate_checkpoint", "EVAL_OUTPUTS"]

EVAL_OUTPUTS = ("eval.json", "confusion.png")


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, amp: bool = False,
             num_classes: Optional[int] = None) -> dict[str, Any]:
    """Top-1/top-5 accuracy, mean loss and the confusion matrix (rows: true class) over ``loader``; summed over
    processes under torch.distributed."""
    model.eval()
    correct1 = correct5 = total = 0
    loss_sum = 0.0
    confusion = None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()
    for images, targets in loader:
        images, targets = images.to(device), targets.to(device)
        with autocast:
            logits = model(images)
        logits = logits.float()
        loss_sum += nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        top1, top5 = accuracy(logits, targets, topk=(1, min(5, logits.shape[1])))
        correct1 += top1.item() * len(targets) / 100
        correct5 += top5.item() * len(targets) / 100
        total += len(targets)
        n = num_classes or logits.shape[1]
        counts = torch.bincount(targets * n + logits.argmax(1), minlength=n * n).view(n, n).cpu()
        confusion = counts if confusion is None else confusion + counts
    stats = torch.tensor([correct1, correct5, total, loss_sum], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(stats)
        if confusion is not None:
            dist.all_reduce(confusion)
    c1, c5, total, loss_sum = stats.tolist()
    return dict(top1=100 * c1 / max(total, 1), top5=100 * c5 / max(total, 1), loss=loss_sum / max(total, 1),
                count=int(total), confusion=confusion)


def _eval_folder(output: Optional[str], checkpoint: Path, split: str, overwrite: bool) -> Path:
    """An explicit ``output`` must be new (or ``overwrite``); the default is a new ``eval-<split>[-N]`` folder
    next to the checkpoint, so evaluating again never replaces an earlier evaluation."""
    if output is None:
        return new_run_dir(checkpoint.parent, "eval", split, stamp=False)
    return output_dir(output, overwrite=overwrite, outputs=EVAL_OUTPUTS)


def evaluate_checkpoint(checkpoint: str, data: Optional[str] = None, model: Optional[str] = None,
                        output: Optional[str] = None, batch_size: int = 128, split: str = "val",
                        device: str = "auto", amp: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Evaluate a checkpoint written by `ctxagg train` (the model is rebuilt from the config stored in it).

    ``data`` defaults to the data the run trained on; ``split`` picks its ``val`` or ``train`` part. Writes
    eval.json and confusion.png to ``output`` (refused if it holds results, unless ``overwrite``), by default to a
    new ``eval-<split>`` folder next to the checkpoint."""
    net, cfg, meta, path = load_trained_model(checkpoint, model, purpose="evaluate")
    if output is not None:
        refuse_existing(output, overwrite, outputs=EVAL_OUTPUTS)  # before any work
    spec = data or cfg.data
    train_arrays, val_arrays = load_dataset(spec, cfg.val_fraction, cfg.seed)
    arrays = val_arrays if split == "val" else train_arrays
    classes = meta.get("classes", arrays.classes)
    if len(arrays.classes) != meta["num_classes"]:
        raise ConfigError(f"{spec} has {len(arrays.classes)} classes but the checkpoint predicts "
                          f"{meta['num_classes']}")
    dev = resolve_device(device)
    loader = DataLoader(ArrayDataset(arrays, build_eval_transform(cfg.img_size, meta["mean"], meta["std"])),
                        batch_size=batch_size)
    result = evaluate(net.to(dev), loader, dev, amp, meta["num_classes"])
    confusion = result.pop("confusion")
    per_class = (confusion.diag().double() / confusion.sum(1).clamp(min=1).double() * 100).tolist()
    result.update(model=cfg.model, checkpoint=str(path), data=spec, split=split,
                  per_class_top1={c: a for c, a in zip(classes, per_class)}, confusion=confusion.tolist())
    out = _eval_folder(output, path, split, overwrite)
    plot_confusion(confusion.numpy(), classes, out / "confusion.png",
                   title=f"{cfg.model}: top-1 {result['top1']:.2f}% on {spec} ({split})")
    atomic_write(out / "eval.json", json.dumps(result, indent=2).encode())
    result["output"] = str(out)
    return result
