"""`ctxagg train`: the training loop on timm's data pipeline, losses, optimisers, schedulers and EMA.

Single process, or several under ``torchrun`` (DistributedDataParallel; gloo on CPU, nccl on GPU). As timm's
``train.py`` keeps ``train_one_epoch`` and ``validate`` out of ``main``, :func:`train` only sequences the steps:
output folder → data → model, optimiser, schedule (restored on resume) → per epoch :func:`train_one_epoch`,
:func:`validate_epoch`, :func:`save_checkpoints` → curves.
"""
from __future__ import annotations

import json
import logging
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, dispatch_clip_grad
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from ..errors import ConfigError, CtxaggError
from ..runs import DEFAULT_ROOT, data_tag, on_rank0, output_dir, remove_temp_files, resolve_run_path
from .budget import PATTERN_FILE, DynamicBudget
from .checkpoint import (atomic_write, eager_keys, load_checkpoint, optimizer_state_from_flat,
                         optimizer_state_to_flat, rng_state, save_checkpoint, set_rng_state, write_metrics_csv)
from .config import TrainConfig
from .data import ArrayDataset, ImageArrays, load_dataset
from .distributed import init_distributed, rank_and_world, resolve_device
from .evaluate import evaluate
from .init import init_from_ssl
from .model import build_eval_transform, build_model, build_train_transform, load_trained_model

__all__ = ["train", "train_one_epoch", "validate_epoch", "save_checkpoints", "build_model", "load_trained_model",
           "build_eval_transform", "evaluate", "subset_fraction", "seed_everything", "TrainResult",
           "NonFiniteLossError", "RUNS_ROOT", "RUN_OUTPUTS"]

log = logging.getLogger("ctxagg.train")
# `--compile`: inductor without weight freezing (the weights change after every step)
COMPILE_OPTIONS: dict[str, Any] = dict(options={"freezing": False})

RUNS_ROOT = DEFAULT_ROOT  # default runs: runs/<model>-<data>-<YYYYmmdd-HHMMSS>; runs/latest points to the newest
# every file a run writes (removed by --overwrite; their temp files are left only by a kill mid-write)
RUN_OUTPUTS = ("last.safetensors", "model.safetensors", "model_best.safetensors", "metrics.csv", "config.json",
               "curves.png", PATTERN_FILE)


class NonFiniteLossError(CtxaggError, RuntimeError):
    """The loss (or the weights) became NaN or Inf."""


@dataclass
class TrainResult:
    output: Path
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def best_top1(self) -> float:
        return max((h["val_top1"] for h in self.history), default=float("nan"))


@dataclass
class _Run:
    """What a run carries from epoch to epoch."""
    cfg: TrainConfig
    out: Path
    device: torch.device
    rank: int
    world: int
    data: dict[str, Any]  # classes, num_classes, mean, std, train/val image counts
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ema: Optional[ModelEmaV3]
    train_loader: DataLoader
    val_loader: DataLoader
    mixup: Optional[Mixup] = None
    criterion: nn.Module = field(default_factory=nn.CrossEntropyLoss)
    history: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    dynamic: Optional[DynamicBudget] = None  # learned dynamic-path switches (train/budget.py), if the model has them

    def budget_spent(self) -> bool:
        return self.cfg.max_steps is not None and self.steps >= self.cfg.max_steps

    def progress(self) -> float:
        """Fraction of the planned optimiser steps done (the switches' schedule; a function of the step alone, so a
        resumed run follows it exactly)."""
        return self.steps / (self.cfg.epochs * len(self.train_loader))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: TrainConfig, resume: Optional[str] = None, progress: bool = True, overwrite: bool = False
          ) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data``; with ``resume`` (a run folder or checkpoint) continue exactly.

    ``cfg.output`` None: a new folder ``runs/<model>-<data>-<stamp>`` (``runs/latest`` points to it), or, when
    resuming, the resumed run's folder. An explicit ``cfg.output`` that holds files is refused unless it is the
    folder being resumed or ``overwrite`` is set (then the run's files in it are removed first)."""
    cfg, resumed = cfg.resolved(), None
    if resume:
        cfg, *resumed = _resume_state(resume, cfg)
    device = resolve_device(cfg.device)
    init_distributed(device)
    rank, world = rank_and_world()
    if cfg.batch_size % world:
        raise ConfigError(f"--batch-size {cfg.batch_size} must be divisible by the {world} processes")
    out = _output_folder(cfg, resume, overwrite)
    cfg = replace(cfg, output=str(out))
    run = _build_run(cfg, out, device, rank, world)
    if resumed:
        _restore(run, *resumed)
    if cfg.compile:  # in place: the state_dict keys stay the eager model's, so checkpoints load either way
        run.model.compile(**COMPILE_OPTIONS)
    if world > 1:
        run.model = DistributedDataParallel(run.model, device_ids=[device.index] if device.type == "cuda" else None)
    run.mixup, run.criterion = _criterion(cfg, run.data["num_classes"])
    if rank == 0:
        atomic_write(out / "config.json", json.dumps(dict(cfg.to_json(), **run.data), indent=2).encode())
    for epoch in range(len(run.history), cfg.epochs):
        if run.budget_spent():
            break
        stats = train_one_epoch(run, epoch, progress)
        run.history.append(validate_epoch(run, epoch, stats))
        if rank == 0:
            save_checkpoints(run, epoch)
            _log_epoch(run.history[-1])
    if rank == 0 and run.history:
        from .plots import plot_curves
        plot_curves(run.history, out / "curves.png", title=f"{cfg.model} on {cfg.data}")
        if run.dynamic is not None:
            run.dynamic.finish(_unwrap(run.model), out)
    return TrainResult(out, run.history)


def _resume_state(resume: str, cfg: TrainConfig) -> tuple[TrainConfig, dict, dict]:
    """Config, tensors and JSON state of the run to resume, or a clear error before any work starts."""
    ckpt_path = resolve_run_path(resume)
    if ckpt_path.is_dir():
        ckpt_path = ckpt_path / "last.safetensors"
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"--resume {resume}: no last.safetensors in that folder (a run writes it at the "
                                    "end of its first epoch)")
    elif not ckpt_path.exists():
        raise FileNotFoundError(f"--resume {resume} does not exist")
    tensors, meta = load_checkpoint(ckpt_path)
    if not all(key in meta for key in ("config", "epoch", "history", "optimizer", "rng")):
        raise ConfigError(f"--resume {ckpt_path} is not a resumable training state (it has no optimiser and RNG "
                          "state); resume from the run's last.safetensors")
    saved = TrainConfig.from_json(meta["config"])
    if saved.model != cfg.model or saved.data != cfg.data:
        raise ConfigError(f"--resume {ckpt_path}: that run trained {saved.model!r} on {saved.data!r}, "
                          f"not {cfg.model!r} on {cfg.data!r}")
    # the run's own settings, except where to write, how long to run, how to survive faults and how fast to run
    cfg = TrainConfig(**{**saved.to_json(), "output": cfg.output or str(ckpt_path.parent), "epochs": cfg.epochs,
                         "max_steps": cfg.max_steps, "workers": cfg.workers,
                         "skip_nonfinite": saved.skip_nonfinite or cfg.skip_nonfinite,
                         "skip_bad_images": saved.skip_bad_images or cfg.skip_bad_images,
                         "compile": saved.compile or cfg.compile,
                         "channels_last": saved.channels_last or cfg.channels_last}).resolved()
    return cfg, tensors, meta


def _output_folder(cfg: TrainConfig, resume: Optional[str], overwrite: bool) -> Path:
    """The run's folder (see :func:`train`), created by rank 0; a refusal is raised on every rank alike."""
    if cfg.output is None:
        return output_dir(None, cfg.model, data_tag(cfg.data), latest=True)
    out = resolve_run_path(cfg.output)
    if resume is not None and out.is_dir() and _resume_file(resume).parent.resolve() == out.resolve():
        on_rank0(lambda: remove_temp_files(out))  # continuing the run in its own folder
        return out
    return output_dir(out, overwrite=overwrite, outputs=RUN_OUTPUTS, resumable=True)


def _resume_file(resume: str) -> Path:
    path = resolve_run_path(resume)
    return path / "last.safetensors" if path.is_dir() else path


def subset_fraction(arrays: ImageArrays, fraction: float, seed: int) -> ImageArrays:
    """A fixed-seed stratified subset holding ``fraction`` of every class (at least one image each)."""
    if fraction >= 1.0:
        return arrays
    if not 0 < fraction:
        raise ConfigError(f"fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    keep = []
    for c in range(len(arrays.classes)):
        idx = np.flatnonzero(arrays.labels == c)
        rng.shuffle(idx)
        keep.append(idx[: max(1, int(round(len(idx) * fraction)))])
    return arrays.subset(np.sort(np.concatenate(keep)))


def _load_arrays(cfg: TrainConfig) -> tuple[ImageArrays, ImageArrays]:
    train_arrays, val_arrays = load_dataset(cfg.data, cfg.val_fraction, cfg.seed, decode_size=None,
                                            skip_bad=cfg.skip_bad_images)
    train_arrays = subset_fraction(train_arrays, cfg.fraction, cfg.seed)
    if 0 < cfg.val_limit < len(val_arrays.labels):
        val_arrays = subset_fraction(val_arrays, cfg.val_limit / len(val_arrays.labels), cfg.seed)
    if len(val_arrays.labels) == 0:
        raise ConfigError(f"the validation split of {cfg.data} is empty; raise --val-fraction or add a val/ folder")
    return train_arrays, val_arrays


def _loader(dataset, cfg: TrainConfig, train: bool, rank: int, world: int) -> DataLoader:
    if train and cfg.repeated_aug:
        from timm.data.distributed_sampler import RepeatAugSampler
        sampler = RepeatAugSampler(dataset, num_replicas=world, rank=rank, shuffle=True)
    else:
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=train, seed=cfg.seed,
                                     drop_last=False)
    return DataLoader(dataset, batch_size=cfg.batch_size // world, sampler=sampler, num_workers=cfg.workers,
                      drop_last=train, persistent_workers=False)


def _build_run(cfg: TrainConfig, out: Path, device: torch.device, rank: int, world: int) -> _Run:
    """Data, model, optimiser, loaders, schedule and EMA, built in the order that fixes their random draws."""
    train_arrays, val_arrays = _load_arrays(cfg)
    # seeded after loading: the splits take the seed explicitly, and a library imported on first use (scikit-learn
    # for the digits) draws from Python's global generator, which would make a process's first run differ
    seed_everything(cfg.seed)
    mean, std = train_arrays.channel_stats()
    num_classes = len(train_arrays.classes)
    model = build_model(cfg, num_classes)
    if cfg.init:  # before the EMA copies the weights; a resumed run overwrites them with its own
        init_from_ssl(model, cfg.init)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.sync_bn and world > 1:
        if device.type != "cuda":
            raise ConfigError("--sync-bn needs CUDA (PyTorch's SyncBatchNorm is GPU-only); on CPU each process "
                              "normalises its own sub-batch")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    dynamic = DynamicBudget.for_run(model, cfg)  # a counted eval-mode pass for models with switches; no random draws
    optimizer = create_optimizer_v2(model, cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                                    param_group_fn=dynamic.param_groups(cfg.weight_decay, cfg.dynamic_lr)
                                    if dynamic is not None else None)
    transform = build_train_transform(cfg, mean, std) if cfg.augment else build_eval_transform(cfg.img_size, mean, std)
    train_loader = _loader(ArrayDataset(train_arrays, transform), cfg, True, rank, world)
    val_loader = _loader(ArrayDataset(val_arrays, build_eval_transform(cfg.img_size, mean, std)), cfg, False, rank,
                         world)
    if len(train_loader) == 0:
        raise ConfigError(f"{len(train_arrays.labels)} training images are fewer than one batch of "
                          f"{cfg.batch_size}; lower --batch-size")
    scheduler, _ = create_scheduler_v2(optimizer, sched=cfg.sched, num_epochs=cfg.epochs,
                                       warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr,
                                       step_on_epochs=False, updates_per_epoch=len(train_loader))
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema_decay > 0 else None
    data = dict(mean=mean, std=std, num_classes=num_classes, classes=train_arrays.classes)
    return _Run(cfg, out, device, rank, world, data, model, optimizer, scheduler, ema, train_loader, val_loader,
                dynamic=dynamic)


def _restore(run: _Run, tensors: dict, meta: dict) -> None:
    """Weights, EMA, optimiser, RNG streams, metrics history and step count of a resumed run."""
    run.model.load_state_dict(eager_keys({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}))
    if run.ema is not None:
        run.ema.module.load_state_dict(eager_keys({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}))
    run.optimizer.load_state_dict(optimizer_state_from_flat(tensors, meta["optimizer"]))
    set_rng_state(tensors, meta["rng"])
    run.history = meta["history"]
    run.steps = (meta["epoch"] + 1) * len(run.train_loader)


def _criterion(cfg: TrainConfig, num_classes: int) -> tuple[Optional[Mixup], nn.Module]:
    if (cfg.mixup or 0) > 0 or (cfg.cutmix or 0) > 0:
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                      num_classes=num_classes)
        return mixup, SoftTargetCrossEntropy()
    if cfg.label_smoothing:
        return None, LabelSmoothingCrossEntropy(cfg.label_smoothing)
    return None, nn.CrossEntropyLoss()


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def train_one_epoch(run: _Run, epoch: int, progress: bool = True) -> dict[str, float]:
    """One pass over the training data (stopping early at ``max_steps``); returns loss/accuracy sums over every
    process, the images seen, the steps skipped for a non-finite loss and the seconds taken."""
    run.model.train()
    run.train_loader.sampler.set_epoch(epoch)
    stats = dict(loss_sum=0.0, correct=0, seen=0, skipped=0)
    t0 = time.perf_counter()
    bar = _progress(run.train_loader, epoch, run.cfg.epochs, enabled=progress and run.rank == 0)
    for batch_idx, (images, targets) in enumerate(bar):
        if run.budget_spent():
            break
        images, hard_targets = images.to(run.device), targets.to(run.device)
        if run.dynamic is not None:
            run.dynamic.before_step(run.progress())
        loss, logits = _forward(run, images, hard_targets)
        if not _finite_or_skip(run, loss, epoch, batch_idx, stats):
            continue
        _optimizer_step(run, loss)
        stats["seen"] += len(hard_targets)
        stats["correct"] += (logits.argmax(1) == hard_targets).sum().item()
        stats["loss_sum"] += loss.item() * len(hard_targets)
        if hasattr(bar, "set_postfix"):
            seen = stats["seen"]
            bar.set_postfix(loss=f"{stats['loss_sum'] / seen:.4f}", acc=f"{100 * stats['correct'] / seen:.1f}",
                            img_s=f"{seen * run.world / (time.perf_counter() - t0):.0f}")
    if stats["skipped"] and stats["seen"] == 0:
        raise NonFiniteLossError(f"every one of the {stats['skipped']} steps of epoch {epoch} had a non-finite loss; "
                                 "stopping (the weights or the data are broken: lower --lr, check the data)")
    run.scheduler.step(epoch + 1)
    stats["seconds"] = time.perf_counter() - t0
    if run.world > 1:  # log the global epoch, not rank 0's share of it
        totals = torch.tensor([stats["loss_sum"], stats["correct"], stats["seen"]], dtype=torch.float64)
        dist.all_reduce(totals)
        stats.update(loss_sum=totals[0].item(), correct=int(totals[1].item()), seen=int(totals[2].item()))
    return stats


def _forward(run: _Run, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if run.mixup is not None:
        images, targets = run.mixup(images, targets)
    if run.cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.autocast(run.device.type, dtype=torch.bfloat16) if run.cfg.amp else nullcontext():
        logits = run.model(images)
    return run.criterion(logits.float(), targets), logits


def _finite_or_skip(run: _Run, loss: torch.Tensor, epoch: int, batch_idx: int, stats: dict) -> bool:
    """The NaN policy: a non-finite loss stops the run (keeping the last epoch's checkpoints) or, with
    ``--skip-nonfinite``, skips and counts the step. All processes decide together."""
    finite = torch.isfinite(loss.detach()).float()
    if run.world > 1:  # every process must take (or skip) the step together, or DDP's all-reduce hangs
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if finite.item():
        return True
    message = (f"non-finite loss {loss.item()} at epoch {epoch}, batch {batch_idx} (step {run.steps}, "
               f"lr {run.optimizer.param_groups[0]['lr']:.3g})")
    if not run.cfg.skip_nonfinite:
        raise NonFiniteLossError(message + "; stopping, the checkpoints of the last finished epoch are kept (use "
                                 "--skip-nonfinite to skip such steps, or lower --lr)")
    stats["skipped"] += 1
    log.warning("%s: step skipped (%d this epoch)", message, stats["skipped"])
    run.optimizer.zero_grad(set_to_none=True)
    return False


def _optimizer_step(run: _Run, loss: torch.Tensor) -> None:
    run.optimizer.zero_grad(set_to_none=True)
    penalty = run.dynamic.loss(run.progress()) if run.dynamic is not None else None  # the switches' cost term
    (loss if penalty is None else loss + penalty).backward()
    if run.cfg.clip_grad:
        dispatch_clip_grad(run.model.parameters(), run.cfg.clip_grad, mode="norm")
    run.optimizer.step()
    run.steps += 1
    run.scheduler.step_update(run.steps)
    if run.ema is not None:
        run.ema.update(_unwrap(run.model), step=run.steps)


def validate_epoch(run: _Run, epoch: int, stats: dict[str, float]) -> dict[str, Any]:
    """Evaluate the model (and its EMA) and return the epoch's metrics row; refuses non-finite weights."""
    cfg, num_classes, seen = run.cfg, run.data["num_classes"], stats["seen"]
    val = evaluate(_unwrap(run.model), run.val_loader, run.device, cfg.amp, num_classes)
    record = dict(epoch=epoch, train_loss=stats["loss_sum"] / max(seen, 1),
                  train_acc=100 * stats["correct"] / max(seen, 1), val_loss=val["loss"], val_top1=val["top1"],
                  val_top5=val["top5"], lr=run.optimizer.param_groups[0]["lr"], epoch_seconds=stats["seconds"],
                  img_per_s=seen / max(stats["seconds"], 1e-9), steps=run.steps, skipped_steps=stats["skipped"])
    if run.ema is not None:
        ema_val = evaluate(run.ema.module, run.val_loader, run.device, cfg.amp, num_classes)
        record.update(ema_val_top1=ema_val["top1"], ema_val_top5=ema_val["top5"])
    if run.dynamic is not None:
        record.update(run.dynamic.record())
    _check_finite_weights(_unwrap(run.model), "model", epoch)  # never save a NaN model
    if run.ema is not None:
        _check_finite_weights(run.ema.module, "EMA", epoch)
    return record


def _check_finite_weights(model: nn.Module, what: str, epoch: int) -> None:
    bad = [name for name, p in model.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise NonFiniteLossError(f"{what} weights became non-finite during epoch {epoch} ({len(bad)} tensors, e.g. "
                                 f"{bad[0]}); stopping without overwriting the checkpoints of the previous epoch")


def save_checkpoints(run: _Run, epoch: int) -> None:
    """metrics.csv, the resumable ``last.safetensors``, the epoch's ``model.safetensors`` and, if it is the best so
    far, ``model_best.safetensors`` (each written atomically). Rank 0 only."""
    write_metrics_csv(run.out / "metrics.csv", run.history)
    weights = {f"model.{k}": v for k, v in _unwrap(run.model).state_dict().items()}
    tensors = dict(weights)
    if run.ema is not None:
        tensors.update({f"ema.{k}": v for k, v in run.ema.module.state_dict().items()})
    optim_tensors, optim_js = optimizer_state_to_flat(run.optimizer.state_dict())
    rng_tensors, rng_js = rng_state()
    tensors.update(optim_tensors)
    tensors.update(rng_tensors)
    common = dict(config=run.cfg.to_json(), epoch=epoch, **run.data)
    save_checkpoint(run.out / "last.safetensors", tensors,
                    dict(common, history=run.history, optimizer=optim_js, rng=rng_js))
    val_top1 = run.history[-1]["val_top1"]
    save_checkpoint(run.out / "model.safetensors", weights, dict(common, val_top1=val_top1))
    # with learned switches, once they are fixed only the epochs of that fixed architecture compete for "best"
    pool = [h for h in run.history if h.get("dynamic_fixed")] or run.history
    if run.history[-1] in pool and val_top1 >= max(h["val_top1"] for h in pool):
        save_checkpoint(run.out / "model_best.safetensors", weights, dict(common, val_top1=val_top1))


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
