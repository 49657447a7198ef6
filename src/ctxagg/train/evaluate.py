"""`ctxagg eval`: top-1/top-5, per-class accuracy and a confusion-matrix PNG for a trained checkpoint."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from torch.utils.data import DataLoader

from .checkpoint import atomic_write
from .data import ArrayDataset, load_dataset
from .engine import _device, build_eval_transform, evaluate, load_trained_model
from .plots import plot_confusion

__all__ = ["evaluate_checkpoint"]


def evaluate_checkpoint(checkpoint: str, data: Optional[str] = None, model: Optional[str] = None,
                        output: Optional[str] = None, batch_size: int = 128, split: str = "val",
                        device: str = "auto", amp: bool = False) -> dict[str, Any]:
    """Evaluate a checkpoint written by `ctxagg train` (the model is rebuilt from the config stored in it).

    ``data`` defaults to the data the run trained on; ``split`` picks its ``val`` or ``train`` part."""
    net, cfg, meta, path = load_trained_model(checkpoint, model, purpose="evaluate")
    spec = data or cfg.data
    train_arrays, val_arrays = load_dataset(spec, cfg.val_fraction, cfg.seed)
    arrays = val_arrays if split == "val" else train_arrays
    classes = meta.get("classes", arrays.classes)
    if len(arrays.classes) != meta["num_classes"]:
        raise ValueError(f"{spec} has {len(arrays.classes)} classes but the checkpoint predicts {meta['num_classes']}")
    dev = _device(device)
    net.to(dev)
    loader = DataLoader(ArrayDataset(arrays, build_eval_transform(cfg.img_size, meta["mean"], meta["std"])),
                        batch_size=batch_size)
    result = evaluate(net, loader, dev, amp, meta["num_classes"])
    confusion = result.pop("confusion")
    per_class = (confusion.diag().double() / confusion.sum(1).clamp(min=1).double() * 100).tolist()
    result.update(model=cfg.model, checkpoint=str(path), data=spec, split=split,
                  per_class_top1={c: a for c, a in zip(classes, per_class)}, confusion=confusion.tolist())
    out = Path(output) if output else path.parent / f"eval-{split}"
    out.mkdir(parents=True, exist_ok=True)
    plot_confusion(confusion.numpy(), classes, out / "confusion.png",
                   title=f"{cfg.model}: top-1 {result['top1']:.2f}% on {spec} ({split})")
    atomic_write(out / "eval.json", json.dumps(result, indent=2).encode())
    result["output"] = str(out)
    return result
