"""`ctxagg train`: the training loop on timm's data pipeline, losses, optimisers, schedulers and EMA.

Single process, or several under ``torchrun`` (DistributedDataParallel; gloo on CPU, nccl on GPU).
"""
from __future__ import annotations

import json
import logging
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import timm
import torch
import torch.distributed as dist
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, accuracy, dispatch_clip_grad
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from ..checks import add_input_checks
from .checkpoint import (load_checkpoint, optimizer_state_from_flat, optimizer_state_to_flat, rng_state,
                         save_checkpoint, set_rng_state)
from .config import TrainConfig, input_size_overrides
from .data import ArrayDataset, ImageArrays, load_dataset

__all__ = ["train", "build_model", "load_trained_model", "build_eval_transform", "TrainResult", "NonFiniteLossError"]

log = logging.getLogger("ctxagg.train")


class NonFiniteLossError(RuntimeError):
    """The loss (or the weights) became NaN or Inf."""


# temp files atomic_write leaves only when the process is killed mid-write (SIGKILL, power loss)
_RUN_FILES = ("last.safetensors", "model.safetensors", "model_best.safetensors", "metrics.csv", "config.json")


def _remove_stale_temp_files(out: Path) -> None:
    for name in _RUN_FILES:
        for tmp in out.glob(f".{name}.*.tmp"):
            log.warning("removing %s, left by an interrupted checkpoint write", tmp)
            tmp.unlink(missing_ok=True)


def _resume_state(resume: str, cfg: TrainConfig) -> tuple[TrainConfig, dict, dict]:
    """Config, tensors and JSON state of the run to resume, or a clear error before any work starts."""
    ckpt_path = Path(resume)
    if ckpt_path.is_dir():
        ckpt_path = ckpt_path / "last.safetensors"
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"--resume {resume}: no last.safetensors in that folder (a run writes it at the "
                                    "end of its first epoch)")
    elif not ckpt_path.exists():
        raise FileNotFoundError(f"--resume {resume} does not exist")
    tensors, meta = load_checkpoint(ckpt_path)
    if not all(key in meta for key in ("config", "epoch", "history", "optimizer", "rng")):
        raise ValueError(f"--resume {ckpt_path} is not a resumable training state (it has no optimiser and RNG "
                         "state); resume from the run's last.safetensors")
    saved = TrainConfig.from_json(meta["config"])
    if saved.model != cfg.model or saved.data != cfg.data:
        raise ValueError(f"--resume {ckpt_path}: that run trained {saved.model!r} on {saved.data!r}, "
                         f"not {cfg.model!r} on {cfg.data!r}")
    # the run's own settings, except where to write, how long to run and how to survive faults
    cfg = TrainConfig(**{**saved.to_json(), "output": cfg.output, "epochs": cfg.epochs, "max_steps": cfg.max_steps,
                         "workers": cfg.workers, "skip_nonfinite": saved.skip_nonfinite or cfg.skip_nonfinite,
                         "skip_bad_images": saved.skip_bad_images or cfg.skip_bad_images}).resolved()
    return cfg, tensors, meta


def _check_finite_weights(model: nn.Module, what: str, epoch: int) -> None:
    bad = [name for name, p in model.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise NonFiniteLossError(f"{what} weights became non-finite during epoch {epoch} ({len(bad)} tensors, e.g. "
                                 f"{bad[0]}); stopping without overwriting the checkpoints of the previous epoch")


@dataclass
class TrainResult:
    output: Path
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def best_top1(self) -> float:
        return max((h["val_top1"] for h in self.history), default=float("nan"))


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _init_distributed(device: torch.device) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and os.environ.get("LOCAL_RANK"):
        name = f"cuda:{os.environ['LOCAL_RANK']}"
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
    """Rebuild the model a `ctxagg train` checkpoint (file or run folder) holds, with its weights loaded.

    Returns (model, run config, checkpoint metadata, checkpoint path); ``model_name``, if given, must match
    the run's model. ``purpose`` words the error for checkpoints that hold no run configuration."""
    from .checkpoint import CheckpointError, load_model_weights

    path = Path(checkpoint)
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
    return create_transform(img_size, is_training=False, interpolation="bicubic", mean=mean, std=std, crop_pct=1.0)


def _train_transform(cfg: TrainConfig, mean, std) -> Callable:
    return create_transform(
        cfg.img_size, is_training=True, scale=(cfg.scale_min, 1.0), hflip=cfg.hflip, vflip=0.0,
        auto_augment=cfg.randaugment or None, interpolation="bicubic", re_prob=cfg.reprob, re_mode="pixel",
        mean=mean, std=std)


def subset_fraction(arrays: ImageArrays, fraction: float, seed: int) -> ImageArrays:
    """A fixed-seed stratified subset holding ``fraction`` of every class (at least one image each)."""
    if fraction >= 1.0:
        return arrays
    if not 0 < fraction:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    keep = []
    for c in range(len(arrays.classes)):
        idx = np.flatnonzero(arrays.labels == c)
        rng.shuffle(idx)
        keep.append(idx[: max(1, int(round(len(idx) * fraction)))])
    return arrays.subset(np.sort(np.concatenate(keep)))


def _loader(dataset, cfg: TrainConfig, train: bool, rank: int, world: int, generator_seed: int) -> DataLoader:
    if train and cfg.repeated_aug:
        from timm.data.distributed_sampler import RepeatAugSampler
        sampler = RepeatAugSampler(dataset, num_replicas=world, rank=rank, shuffle=True)
    else:
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=train, seed=generator_seed,
                                     drop_last=False)
    per_rank = cfg.batch_size // world
    return DataLoader(dataset, batch_size=per_rank, sampler=sampler, num_workers=cfg.workers,
                      drop_last=train, persistent_workers=False)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, amp: bool = False,
             num_classes: Optional[int] = None) -> dict[str, Any]:
    """Top-1/top-5 accuracy, mean loss and the confusion matrix (rows: true class) over ``loader``."""
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
        k = min(5, logits.shape[1])
        top1, top5 = accuracy(logits, targets, topk=(1, k))
        correct1 += top1.item() * len(targets) / 100
        correct5 += top5.item() * len(targets) / 100
        total += len(targets)
        n = num_classes or logits.shape[1]
        pairs = targets * n + logits.argmax(1)
        counts = torch.bincount(pairs, minlength=n * n).view(n, n).cpu()
        confusion = counts if confusion is None else confusion + counts
    stats = torch.tensor([correct1, correct5, total, loss_sum], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(stats)
        if confusion is not None:
            dist.all_reduce(confusion)
    c1, c5, total, loss_sum = stats.tolist()
    return dict(top1=100 * c1 / max(total, 1), top5=100 * c5 / max(total, 1), loss=loss_sum / max(total, 1),
                count=int(total), confusion=confusion)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _state_tensors(model: nn.Module, optimizer, ema: Optional[ModelEmaV3]) -> tuple[dict, dict]:
    tensors = {f"model.{k}": v for k, v in _unwrap(model).state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.module.state_dict().items()})
    optim_tensors, optim_js = optimizer_state_to_flat(optimizer.state_dict())
    rng_tensors, rng_js = rng_state()
    tensors.update(optim_tensors)
    tensors.update(rng_tensors)
    return tensors, dict(optimizer=optim_js, rng=rng_js)


def _write_csv(path: Path, history: list[dict[str, Any]]) -> None:
    from .checkpoint import atomic_write
    keys = [k for k in history[0] if k != "confusion"]
    keys += [k for h in history[1:] for k in h if k not in keys and k != "confusion"]
    lines = [",".join(keys)] + [",".join(f"{h[k]:.6g}" if isinstance(h.get(k), float) else str(h.get(k, ""))
                                         for k in keys) for h in history]
    atomic_write(path, ("\n".join(lines) + "\n").encode())


def train(cfg: TrainConfig, resume: Optional[str] = None, progress: bool = True) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data``; with ``resume`` (a run folder or checkpoint) continue exactly."""
    cfg = cfg.resolved()
    start_epoch, history, resume_state = 0, [], None
    if resume:
        cfg, tensors, meta = _resume_state(resume, cfg)
        resume_state = (tensors, meta)
        start_epoch, history = meta["epoch"] + 1, meta["history"]

    device = _device(cfg.device)
    _init_distributed(device)
    rank, world = _distributed()
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the {world} processes")
    out = Path(cfg.output)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _remove_stale_temp_files(out)
    seed_everything(cfg.seed)

    train_arrays, val_arrays = load_dataset(cfg.data, cfg.val_fraction, cfg.seed, decode_size=None,
                                            skip_bad=cfg.skip_bad_images)
    train_arrays = subset_fraction(train_arrays, cfg.fraction, cfg.seed)
    if 0 < cfg.val_limit < len(val_arrays.labels):
        val_arrays = subset_fraction(val_arrays, cfg.val_limit / len(val_arrays.labels), cfg.seed)
    mean, std = train_arrays.channel_stats()
    num_classes = len(train_arrays.classes)
    model = build_model(cfg, num_classes).to(device)
    if cfg.sync_bn and world > 1:
        if device.type != "cuda":
            raise ValueError("--sync-bn needs CUDA (PyTorch's SyncBatchNorm is GPU-only); on CPU each process "
                             "normalises its own sub-batch")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = create_optimizer_v2(model, cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    train_transform = _train_transform(cfg, mean, std) if cfg.augment else build_eval_transform(cfg.img_size, mean, std)
    train_loader = _loader(ArrayDataset(train_arrays, train_transform), cfg, True, rank, world, cfg.seed)
    val_loader = _loader(ArrayDataset(val_arrays, build_eval_transform(cfg.img_size, mean, std)), cfg, False,
                         rank, world, cfg.seed)
    if len(train_loader) == 0:
        raise ValueError(f"{len(train_arrays.labels)} training images are fewer than one batch of "
                         f"{cfg.batch_size}; lower --batch-size")
    if len(val_arrays.labels) == 0:
        raise ValueError(f"the validation split of {cfg.data} is empty; raise --val-fraction or add a val/ folder")
    scheduler, _ = create_scheduler_v2(optimizer, sched=cfg.sched, num_epochs=cfg.epochs,
                                       warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr,
                                       step_on_epochs=False, updates_per_epoch=len(train_loader))
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema_decay > 0 else None
    if resume_state is not None:
        tensors, meta = resume_state
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        if ema is not None:
            ema.module.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        optimizer.load_state_dict(optimizer_state_from_flat(tensors, meta["optimizer"]))
        set_rng_state(tensors, meta["rng"])
    if world > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    mixup = None
    if (cfg.mixup or 0) > 0 or (cfg.cutmix or 0) > 0:
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                      num_classes=num_classes)
        criterion: nn.Module = SoftTargetCrossEntropy()
    elif cfg.label_smoothing:
        criterion = LabelSmoothingCrossEntropy(cfg.label_smoothing)
    else:
        criterion = nn.CrossEntropyLoss()

    if rank == 0:
        from .checkpoint import atomic_write
        atomic_write(out / "config.json", json.dumps(dict(cfg.to_json(), mean=mean, std=std, num_classes=num_classes,
                                                          classes=train_arrays.classes), indent=2).encode())
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.amp else nullcontext()
    steps = start_epoch * len(train_loader)
    result = TrainResult(out, history)
    for epoch in range(start_epoch, cfg.epochs):
        if cfg.max_steps is not None and steps >= cfg.max_steps:
            break
        model.train()
        train_loader.sampler.set_epoch(epoch)
        seen = correct = skipped = 0
        loss_sum, t0 = 0.0, time.perf_counter()
        bar = _progress(train_loader, epoch, cfg.epochs, enabled=progress and rank == 0)
        for batch_idx, (images, targets) in enumerate(bar):
            if cfg.max_steps is not None and steps >= cfg.max_steps:
                break
            images, targets = images.to(device), targets.to(device)
            hard_targets = targets
            if mixup is not None:
                images, targets = mixup(images, targets)
            with autocast:
                logits = model(images)
            loss = criterion(logits.float(), targets)
            finite = torch.isfinite(loss.detach()).float()
            if world > 1:  # every process must take (or skip) the step together, or DDP's all-reduce hangs
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if not finite.item():
                message = (f"non-finite loss {loss.item()} at epoch {epoch}, batch {batch_idx} (step {steps}, "
                           f"lr {optimizer.param_groups[0]['lr']:.3g})")
                if not cfg.skip_nonfinite:
                    raise NonFiniteLossError(message + "; stopping, the checkpoints of the last finished epoch are "
                                             "kept (use --skip-nonfinite to skip such steps, or lower --lr)")
                skipped += 1
                log.warning("%s: step skipped (%d this epoch)", message, skipped)
                optimizer.zero_grad(set_to_none=True)
                continue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad:
                dispatch_clip_grad(model.parameters(), cfg.clip_grad, mode="norm")
            optimizer.step()
            steps += 1
            scheduler.step_update(steps)
            if ema is not None:
                ema.update(_unwrap(model), step=steps)
            seen += len(hard_targets)
            correct += (logits.argmax(1) == hard_targets).sum().item()
            loss_sum += loss.item() * len(hard_targets)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{100 * correct / seen:.1f}",
                                img_s=f"{seen * world / (time.perf_counter() - t0):.0f}")
        if skipped and seen == 0:
            raise NonFiniteLossError(f"every one of the {skipped} steps of epoch {epoch} had a non-finite loss; "
                                     "stopping (the weights or the data are broken: lower --lr, check the data)")
        scheduler.step(epoch + 1)
        train_time = time.perf_counter() - t0
        if world > 1:  # log the global epoch, not rank 0's share of it
            totals = torch.tensor([loss_sum, correct, seen], dtype=torch.float64)
            dist.all_reduce(totals)
            loss_sum, correct, seen = totals[0].item(), int(totals[1].item()), int(totals[2].item())
        val = evaluate(_unwrap(model), val_loader, device, cfg.amp, num_classes)
        record = dict(epoch=epoch, train_loss=loss_sum / max(seen, 1), train_acc=100 * correct / max(seen, 1),
                      val_loss=val["loss"], val_top1=val["top1"], val_top5=val["top5"],
                      lr=optimizer.param_groups[0]["lr"], epoch_seconds=train_time,
                      img_per_s=seen / max(train_time, 1e-9), steps=steps, skipped_steps=skipped)
        if ema is not None:
            ema_val = evaluate(ema.module, val_loader, device, cfg.amp, num_classes)
            record.update(ema_val_top1=ema_val["top1"], ema_val_top5=ema_val["top5"])
        _check_finite_weights(_unwrap(model), "model", epoch)  # never save a NaN model
        if ema is not None:
            _check_finite_weights(ema.module, "EMA", epoch)
        history.append(record)
        if rank == 0:
            _write_csv(out / "metrics.csv", history)
            tensors, state = _state_tensors(model, optimizer, ema)
            meta = dict(config=cfg.to_json(), epoch=epoch, history=history, num_classes=num_classes,
                        classes=train_arrays.classes, mean=mean, std=std, **state)
            save_checkpoint(out / "last.safetensors", tensors, meta)
            weights = {f"model.{k}": v for k, v in _unwrap(model).state_dict().items()}
            weight_meta = dict(config=cfg.to_json(), epoch=epoch, num_classes=num_classes,
                               classes=train_arrays.classes, mean=mean, std=std, val_top1=val["top1"])
            save_checkpoint(out / "model.safetensors", weights, weight_meta)
            if val["top1"] >= max(h["val_top1"] for h in history):
                save_checkpoint(out / "model_best.safetensors", weights, weight_meta)
            _log_epoch(record)
        if cfg.max_steps is not None and steps >= cfg.max_steps:
            break
    if rank == 0 and history:
        from .plots import plot_curves
        plot_curves(history, out / "curves.png", title=f"{cfg.model} on {cfg.data}")
    return result


def _progress(loader, epoch: int, epochs: int, enabled: bool):
    if not enabled:
        return loader
    from tqdm.auto import tqdm
    return tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True)


def _log_epoch(r: dict[str, Any]) -> None:
    extra = f" ema_top1 {r['ema_val_top1']:.2f}" if "ema_val_top1" in r else ""
    print(f"epoch {r['epoch'] + 1}: train_loss {r['train_loss']:.4f} train_acc {r['train_acc']:.2f} "
          f"val_loss {r['val_loss']:.4f} val_top1 {r['val_top1']:.2f} val_top5 {r['val_top5']:.2f}{extra} "
          f"({r['epoch_seconds']:.1f}s, {r['img_per_s']:.0f} img/s)", flush=True)
