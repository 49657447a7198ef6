"""`ctxagg ssl probe`: k-NN and linear-probe accuracy of a self-supervised run's frozen teacher backbone."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch.utils.data import DataLoader

from ..runs import resolve_run_path
from ..train.checkpoint import atomic_write
from ..train.data import ArrayDataset, load_dataset
from ..train.distributed import resolve_device
from ..train.engine import build_eval_transform, subset_fraction
from .config import SSLConfig
from .knn import extract_features, knn_accuracy, train_linear_probe
from .model import build_backbone, load_ssl_backbone

__all__ = ["probe"]


def probe(run: Union[str, Path], data: Optional[str] = None, epochs: int = 100, lr: float = 1e-3,
          knn_k: int = 20, fraction: float = 1.0, val_limit: int = 0, device: str = "auto", seed: int = 0,
          output: Optional[Union[str, Path]] = None) -> dict[str, Any]:
    """Frozen-feature evaluation of a `ctxagg ssl train` run (Caron et al. 2021, §4.1): weighted k-NN (k = ``knn_k``
    and 10, T = 0.07) and a linear classifier trained for ``epochs`` on the teacher's pooled features of ``data``
    (default: the run's data; its train split is the k-NN bank and the probe's training set, its validation split
    the test set). Writes the result as JSON to ``output`` when given."""
    if epochs < 1 or lr <= 0 or knn_k < 1 or not 0 < fraction <= 1:
        raise ValueError(f"probe needs epochs >= 1, lr > 0, knn_k >= 1, fraction in (0, 1]; got {epochs}, {lr}, "
                         f"{knn_k}, {fraction}")
    state, meta = load_ssl_backbone(resolve_run_path(run))
    cfg = SSLConfig.from_json(meta["config"])
    backbone = build_backbone(cfg.model, cfg.img_size, 0.0, cfg.model_kwargs)
    backbone.load_state_dict(state)
    dev = resolve_device(device)
    backbone.to(dev)
    train, val = load_dataset(data or cfg.data, cfg.val_fraction, cfg.seed)
    train = subset_fraction(train, fraction, seed)
    if 0 < val_limit < len(val.labels):
        val = subset_fraction(val, val_limit / len(val.labels), seed)
    transform = build_eval_transform(cfg.img_size, meta.get("mean", (0.5,) * 3), meta.get("std", (0.25,) * 3))
    feats = {name: extract_features(backbone, DataLoader(ArrayDataset(arrays, transform), batch_size=256), dev)
             for name, arrays in (("train", train), ("val", val))}
    (x_train, y_train), (x_val, y_val) = feats["train"], feats["val"]
    n = len(train.classes)
    knn = knn_accuracy(x_train, y_train, x_val, y_val, n, knn_k)
    knn10 = knn_accuracy(x_train, y_train, x_val, y_val, n, 10)
    torch.manual_seed(seed)
    _, history = train_linear_probe(x_train, y_train, x_val, y_val, n, epochs=epochs, lr=lr, seed=seed)
    result = dict(run=str(run), model=cfg.model, data=data or cfg.data, epochs_trained=int(meta.get("epoch", -1)) + 1,
                  train_images=len(train.labels), val_images=len(val.labels), knn_k=knn_k, knn_top1=knn["top1"],
                  knn_top5=knn["top5"], knn10_top1=knn10["top1"], linear_top1=history[-1]["val_top1"],
                  linear_best_top1=max(h["val_top1"] for h in history), linear_epochs=epochs, linear_lr=lr)
    if output is not None:
        atomic_write(Path(output), json.dumps(result, indent=2).encode())
    return result
