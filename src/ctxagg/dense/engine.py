"""Training and evaluation loops for detection and semantic segmentation, with `ctxagg train`'s conventions:
a run folder, safetensors checkpoints (``last`` with optimiser + RNG state for exact resume at epoch
boundaries, ``model``, ``model_best``), ``metrics.csv``, ``curves.png``, a picture of validation predictions
and tqdm progress bars. Optimisers and schedulers are timm's."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import dispatch_clip_grad
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset

from ..errors import ConfigError
from ..train.distributed import init_distributed, rank_and_world, resolve_device
from ..train.checkpoint import (atomic_write, load_checkpoint, optimizer_state_from_flat, optimizer_state_to_flat,
                                rng_state, save_checkpoint, set_rng_state, write_metrics_csv)
from .config import DenseConfig, build_datasets
from .data import collate
from .detectors import TORCHVISION_DETECTORS, build_torchvision_detector
from .metrics import DetectionMetric, SegmentationMetric
from .predict import predict

__all__ = ["build_dense_model", "train_dense", "evaluate_dense", "DenseResult", "RUN_FILES", "main_metric"]

log = logging.getLogger("ctxagg.dense")
RUN_FILES = ("last.safetensors", "model.safetensors", "model_best.safetensors", "metrics.csv", "config.json",
             "curves.png", "predictions.png")
EVAL_FILES = ("eval.json", "predictions.png")


def build_dense_model(cfg: DenseConfig, num_classes: int) -> nn.Module:
    """The detector or Semantic FPN ``cfg`` names, for ``num_classes`` classes."""
    opts = dict(frozen_stages=cfg.frozen_stages, backbone_checkpoint=cfg.backbone_checkpoint,
                model_kwargs=dict(cfg.model_kwargs))
    if cfg.task == "segment":
        from .semantic_fpn import build_semantic_fpn
        return build_semantic_fpn(cfg.backbone, num_classes, frozen_bn=bool(cfg.frozen_bn), **opts)
    if cfg.arch in TORCHVISION_DETECTORS:  # detector_kwargs: torchvision constructor arguments
        return build_torchvision_detector(cfg.arch, cfg.backbone, num_classes, cfg.min_size, cfg.max_size,
                                          frozen_bn=bool(cfg.frozen_bn), detector_kwargs=cfg.detector_kwargs,
                                          **opts)
    from .detr import build_detr_detector  # detector_kwargs: transformers config fields
    return build_detr_detector(cfg.arch, cfg.backbone, num_classes, cfg.min_size, cfg.max_size,
                               frozen_bn=cfg.frozen_bn, **opts, **cfg.detector_kwargs)


def main_metric(task: str) -> str:
    """The metric ``model_best`` is chosen by: box mAP for detection, mIoU for segmentation."""
    return "bbox_map" if task == "detect" else "miou"


def _epoch_loader(dataset: Dataset, cfg: DenseConfig, epoch: int, rank: int = 0, world: int = 1) -> DataLoader:
    """This process's batches of one epoch. The order depends only on (seed, epoch), so a resumed run sees the
    batches the uninterrupted one saw; under torchrun each of the ``world`` processes takes every world-th image
    of the global batches (global batch ``cfg.batch_size``, as `ctxagg train`)."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
    order = order[:len(order) // cfg.batch_size * cfg.batch_size][rank::world]
    return DataLoader(Subset(dataset, order.tolist()), batch_size=cfg.batch_size // world, shuffle=False,
                      drop_last=True, num_workers=cfg.workers, collate_fn=collate)


def _segment_batch(images: list[Tensor], labels: list[Tensor]) -> tuple[Tensor, Tensor]:
    shapes = {tuple(i.shape) for i in images}
    if len(shapes) > 1:
        raise ConfigError(f"segmentation training batches need one image size, got {sorted(shapes)}; set --seg-size")
    return torch.stack(images), torch.stack(labels)


def training_loss(model: nn.Module, cfg: DenseConfig, images: list[Tensor], targets: list[Any],
                  device: torch.device) -> tuple[Tensor, dict[str, float]]:
    """The summed loss of one batch and its parts (detector losses, or pixel cross-entropy with ignore)."""
    if cfg.task == "segment":
        x, y = _segment_batch(images, targets)
        logits = model(x.to(device))
        loss = F.cross_entropy(logits, y.to(device), ignore_index=cfg.ignore_index)
        return loss, {"loss_ce": loss.item()}
    images = [i.to(device) for i in images]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    parts = model(images, targets)
    return sum(parts.values()), {k: v.item() for k, v in parts.items()}


def evaluate_model(model: nn.Module, cfg: DenseConfig, dataset: Dataset, device: torch.device,
                   num_classes: int, progress: bool = False) -> dict[str, Any]:
    """COCO box (and mask, for Mask R-CNN) AP, or mIoU / pixel accuracy, over ``dataset``."""
    limit = len(dataset) if cfg.val_limit <= 0 else min(cfg.val_limit, len(dataset))
    loader = DataLoader(Subset(dataset, range(limit)), batch_size=cfg.batch_size, collate_fn=collate,
                        num_workers=cfg.workers)
    metric = (DetectionMetric(masks=cfg.arch == "mask_rcnn") if cfg.task == "detect"
              else SegmentationMetric(num_classes, cfg.ignore_index))
    for images, targets in _progress(loader, "eval", progress):
        if cfg.task == "detect":
            metric.update(predict(model, cfg, images, device), targets)
        else:
            preds = predict(model, cfg, images, device, [tuple(t.shape[-2:]) for t in targets])
            for p, t in zip(preds, targets):
                metric.update(p[None], t[None])
    return metric.compute()


def _progress(loader, desc: str, enabled: bool):
    if not enabled:
        return loader
    from tqdm.auto import tqdm
    return tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)


class DenseResult:
    """Where a run wrote its files and its per-epoch history."""

    def __init__(self, output: Path, history: list[dict[str, Any]]):
        self.output, self.history = output, history


def _state(model: nn.Module, optimizer, cfg: DenseConfig, epoch: int, steps: int, history: list, classes: list
           ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    optim_tensors, optim_js = optimizer_state_to_flat(optimizer.state_dict())
    rng_tensors, rng_js = rng_state()
    tensors.update(optim_tensors)
    tensors.update(rng_tensors)
    meta = dict(config=cfg.to_json(), epoch=epoch, steps=steps, history=history, classes=classes, dense=True,
                optimizer=optim_js, rng=rng_js)
    return tensors, meta


def _write_epoch(out: Path, model: nn.Module, optimizer, cfg: DenseConfig, epoch: int, steps: int,
                 history: list[dict[str, Any]], classes: list[str]) -> None:
    write_metrics_csv(out / "metrics.csv", history)
    tensors, meta = _state(model, optimizer, cfg, epoch, steps, history, classes)
    save_checkpoint(out / "last.safetensors", tensors, meta)
    weights = {k: v for k, v in tensors.items() if k.startswith("model.")}
    weight_meta = dict(config=cfg.to_json(), epoch=epoch, classes=classes, dense=True, metrics=history[-1])
    save_checkpoint(out / "model.safetensors", weights, weight_meta)
    key = main_metric(cfg.task)
    if history[-1][key] >= max(h[key] for h in history):
        save_checkpoint(out / "model_best.safetensors", weights, weight_meta)


def _resume(resume: str, cfg: DenseConfig) -> tuple[DenseConfig, dict[str, Tensor], dict[str, Any]]:
    from ..runs import resolve_run_path
    path = resolve_run_path(resume)
    path = path / "last.safetensors" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"--resume {resume}: {path} does not exist (a run writes it after its first epoch)")
    tensors, meta = load_checkpoint(path)
    if not meta.get("dense") or "optimizer" not in meta:
        raise ConfigError(f"--resume {path} is not a resumable dense-prediction state; use a run's last.safetensors")
    saved = DenseConfig.from_json(meta["config"])
    if (saved.task, saved.arch, saved.backbone, saved.data) != (cfg.task, cfg.arch, cfg.backbone, cfg.data):
        raise ConfigError(f"--resume {path}: that run trained {saved.arch} on {saved.backbone} with {saved.data}, "
                          f"not {cfg.arch} on {cfg.backbone} with {cfg.data}")
    return replace(saved, epochs=cfg.epochs, max_steps=cfg.max_steps, workers=cfg.workers), tensors, meta


def _setup(cfg: DenseConfig, resume: Optional[str]):
    """Data, model (weights and optimiser restored when resuming), optimiser, scheduler and the resume point."""
    tensors = meta = None
    if resume:
        cfg, tensors, meta = _resume(resume, cfg)
    torch.manual_seed(cfg.seed)
    train_set, val_set, classes = build_datasets(cfg)
    if len(train_set) < cfg.batch_size:
        raise ConfigError(f"{len(train_set)} training images are fewer than one batch of {cfg.batch_size}")
    model = build_dense_model(cfg, len(classes))
    if cfg.backbone_checkpoint is not None:  # the weights now live in the run; rebuilds need only the architecture
        cfg = replace(cfg, backbone_checkpoint=None, model_kwargs=_backbone_kwargs(model))
    device = resolve_device(cfg.device)
    model.to(device)
    optimizer = create_optimizer_v2(model, cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_epoch = len(train_set) // cfg.batch_size
    scheduler, _ = create_scheduler_v2(optimizer, sched=cfg.sched, num_epochs=cfg.epochs,
                                       warmup_epochs=cfg.warmup_epochs, step_on_epochs=False,
                                       updates_per_epoch=per_epoch)
    start, history = 0, []
    if tensors is not None:
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        optimizer.load_state_dict(optimizer_state_from_flat(tensors, meta["optimizer"]))
        set_rng_state(tensors, meta["rng"])
        start, history = meta["epoch"] + 1, meta["history"]
    return cfg, (train_set, val_set, classes), model, device, optimizer, scheduler, start, history


def _backbone_kwargs(model: nn.Module) -> dict[str, Any]:
    for module in model.modules():
        if hasattr(module, "build_kwargs"):
            return {k: v for k, v in module.build_kwargs.items() if isinstance(v, (int, float, str, bool, list,
                                                                                     tuple))}
    return {}


def _output_dir(cfg: DenseConfig, output: Optional[str], overwrite: bool, resume: Optional[str]) -> Path:
    """The run's folder, as `ctxagg train` chooses it: a resumed run continues in its own folder (temp files of an
    interrupted write removed); any other folder follows runs.output_dir's rules (new folder, or refuse one that
    holds results unless ``overwrite``)."""
    from ..runs import data_tag, on_rank0, output_dir, remove_temp_files, resolve_run_path
    if resume:
        resumed = resolve_run_path(resume)
        resumed = resumed if resumed.is_dir() else resumed.parent
        if output is None or resolve_run_path(output).resolve() == resumed.resolve():
            on_rank0(lambda: remove_temp_files(resumed))
            return resumed
        return output_dir(output, overwrite=overwrite, outputs=RUN_FILES, resumable=True)
    return output_dir(output, cfg.task, cfg.arch, cfg.backbone, data_tag(cfg.data), overwrite=overwrite,
                      outputs=RUN_FILES, resumable=True, latest=True)


def _train_epoch(model, cfg: DenseConfig, loader, optimizer, scheduler, device, steps: int, desc: str,
                 progress: bool) -> tuple[dict[str, float], int]:
    model.train()
    sums: dict[str, float] = {}
    seen = 0
    bar = _progress(loader, desc, progress)
    for images, targets in bar:
        if cfg.max_steps is not None and steps >= cfg.max_steps:
            break
        loss, parts = training_loss(model, cfg, images, targets, device)
        if not _all_finite(loss):  # every process stops together, or DDP's all-reduce would hang
            raise FloatingPointError(f"non-finite loss {parts} at step {steps}; lower --lr or set --clip-grad")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad:
            dispatch_clip_grad(model.parameters(), cfg.clip_grad, mode="norm")
        optimizer.step()
        steps += 1
        scheduler.step_update(steps)
        seen += 1
        for k, v in {"train_loss": loss.item(), **parts}.items():
            sums[k] = sums.get(k, 0.0) + v
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{sums['train_loss'] / seen:.4f}")
    return _mean_over_processes({k: v / max(seen, 1) for k, v in sums.items()}), steps


def _all_finite(loss: Tensor) -> bool:
    finite = torch.isfinite(loss.detach()).float()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def _mean_over_processes(values: dict[str, float]) -> dict[str, float]:
    """The epoch's mean losses over every process's share (unchanged in a single process)."""
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(keys, (t / dist.get_world_size()).tolist()))


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def train_dense(cfg: DenseConfig, output: Optional[str] = None, resume: Optional[str] = None,
                overwrite: bool = False, progress: bool = True) -> DenseResult:
    """Train ``cfg.arch`` on ``cfg.backbone`` with ``cfg.data``; ``resume`` (a run folder or its
    last.safetensors) continues exactly where that run's last finished epoch left off. Under torchrun the
    processes train one DistributedDataParallel model (gloo on CPU, nccl on GPU) on shares of each global batch;
    rank 0 evaluates and writes."""
    init_distributed(resolve_device(cfg.device))
    rank, world = rank_and_world()
    if cfg.batch_size % world:
        raise ConfigError(f"--batch-size {cfg.batch_size} must be divisible by the {world} processes")
    out = _output_dir(cfg, output, overwrite, resume)
    cfg, (train_set, val_set, classes), model, device, optimizer, scheduler, start, history = _setup(cfg, resume)
    if rank == 0:
        atomic_write(out / "config.json", json.dumps(dict(cfg.to_json(), classes=classes), indent=2).encode())
    if world > 1:  # detectors leave some parameters unused in a step (e.g. mask heads without positives)
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                        find_unused_parameters=True)
    steps = history[-1]["steps"] if history else 0
    for epoch in range(start, cfg.epochs):
        if cfg.max_steps is not None and steps >= cfg.max_steps:
            break
        t0 = time.perf_counter()
        loader = _epoch_loader(train_set, cfg, epoch, rank, world)
        losses, steps = _train_epoch(model, cfg, loader, optimizer, scheduler, device, steps,
                                     f"epoch {epoch + 1}/{cfg.epochs}", progress and rank == 0)
        scheduler.step(epoch + 1)
        if rank == 0:
            _finish_epoch(_unwrap(model), cfg, out, optimizer, epoch, steps, losses, time.perf_counter() - t0,
                          history, (val_set, classes), device)
        if world > 1:
            dist.barrier()  # the others wait while rank 0 evaluates and writes
    if history and rank == 0:
        from .visualize import plot_dense_curves, plot_predictions
        plot_dense_curves(history, out / "curves.png", main_metric(cfg.task),
                          title=f"{cfg.arch} + {cfg.backbone} on {cfg.data}")
        plot_predictions(_unwrap(model), cfg, val_set, classes, device, out / "predictions.png")
    return DenseResult(out, history)


def _finish_epoch(model: nn.Module, cfg: DenseConfig, out: Path, optimizer, epoch: int, steps: int,
                  losses: dict[str, float], seconds: float, history: list[dict[str, Any]], val_data: tuple,
                  device: torch.device) -> None:
    """Evaluate, append the epoch's record, write the checkpoints and metrics, print a line (rank 0)."""
    val_set, classes = val_data
    val = evaluate_model(model, cfg, val_set, device, len(classes))
    history.append(dict(epoch=epoch, steps=steps, **losses, **val, lr=optimizer.param_groups[0]["lr"],
                        epoch_seconds=seconds))
    _write_epoch(out, model, optimizer, cfg, epoch, steps, history, classes)
    key = main_metric(cfg.task)
    print(f"epoch {epoch + 1}: train_loss {losses.get('train_loss', float('nan')):.4f} {key} {val[key]:.4f} "
          f"({seconds:.1f}s)", flush=True)


def evaluate_dense(checkpoint: str, data: Optional[str] = None, output: Optional[str] = None,
                   val_limit: int = 0, device: str = "auto", progress: bool = True,
                   overwrite: bool = False) -> dict[str, Any]:
    """Evaluate a checkpoint written by :func:`train_dense` (model rebuilt from its stored config) on the
    validation split of its data (or ``data``); writes eval.json and predictions.png next to it or in
    ``output`` (a new ``eval-val[-N]`` folder by default; an explicit one that holds results is refused unless
    ``overwrite``)."""
    from ..runs import new_run_dir, output_dir, refuse_existing, resolve_run_path
    from ..train.checkpoint import load_model_weights
    if output is not None:
        refuse_existing(output, overwrite, outputs=EVAL_FILES)  # before any work
    path = resolve_run_path(checkpoint)
    path = path / "model_best.safetensors" if path.is_dir() else path
    _, meta = load_checkpoint(path)
    if not meta.get("dense"):
        raise ConfigError(f"{path} is not a dense-prediction checkpoint (written by `ctxagg detect|segment train`)")
    cfg = replace(DenseConfig.from_json(meta["config"]), val_limit=val_limit, device=device,
                  **({"data": data} if data else {}))
    _, val_set, classes = build_datasets(cfg)
    if len(classes) != len(meta["classes"]):
        raise ConfigError(f"{cfg.data} has {len(classes)} classes, the checkpoint was trained for "
                          f"{len(meta['classes'])} ({meta['classes']})")
    model = build_dense_model(cfg, len(classes))
    load_model_weights(model, path)
    dev = resolve_device(device)
    model.to(dev)
    result = evaluate_model(model, cfg, val_set, dev, len(classes), progress)
    out = (new_run_dir(path.parent, "eval", "val", stamp=False) if output is None
           else output_dir(output, overwrite=overwrite, outputs=EVAL_FILES))
    from .visualize import plot_predictions
    plot_predictions(model, cfg, val_set, classes, dev, out / "predictions.png")
    result.update(checkpoint=str(path), data=cfg.data, arch=cfg.arch, backbone=cfg.backbone, count=len(val_set)
                  if val_limit <= 0 else min(val_limit, len(val_set)))
    atomic_write(out / "eval.json", json.dumps(result, indent=2).encode())
    result["output"] = str(out)
    return result
