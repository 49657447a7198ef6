"""`ctxagg ssl train`: DINO pre-training (Caron et al. 2021) with a k-NN monitor every epoch.

Run conventions of `ctxagg train`: a new folder per run (``runs/latest`` points at it) or an explicit ``--output``
that is refused when it holds results (``--overwrite``); one atomic safetensors ``last.safetensors`` holding
student, teacher, centre, optimiser and RNG state (exact resume); ``teacher.safetensors`` (the teacher backbone,
what fine-tuning and the probe load); ``metrics.csv`` and ``curves.png``; tqdm progress bars; torchrun DDP
(gloo on CPU). Epoch 0 in the metrics is the random-init k-NN baseline, measured before any step.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from ..errors import ConfigError, CtxaggError
from ..runs import data_tag, new_run_dir, refuse_existing, remove_temp_files, resolve_run_path, update_latest
from ..train.checkpoint import (atomic_write, load_checkpoint, optimizer_state_from_flat, optimizer_state_to_flat,
                                rng_state, save_checkpoint, set_rng_state, write_metrics_csv)
from ..train.data import ArrayDataset, load_dataset
from ..train.distributed import init_distributed, rank_and_world, resolve_device
from ..train.engine import build_eval_transform, seed_everything, subset_fraction
from .config import SSLConfig
from .crops import MultiCropTransform, check_crop_size, default_local_size
from .dino import (DINOLoss, cancel_last_layer_gradients, cosine_schedule, teacher_temperature, update_teacher)
from .knn import extract_features, knn_accuracy
from .model import TEACHER_FILE, build_student_teacher

__all__ = ["train_ssl", "SSLResult", "SSL_OUTPUTS", "RUNS_ROOT", "clip_gradients", "NonFiniteSSLLossError"]

log = logging.getLogger("ctxagg.ssl")
RUNS_ROOT = "runs"
SSL_OUTPUTS = ("last.safetensors", TEACHER_FILE, "metrics.csv", "config.json", "curves.png")


class NonFiniteSSLLossError(CtxaggError, RuntimeError):
    """The DINO loss became NaN or Inf."""


@dataclass
class SSLResult:
    output: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)  # this process's losses, step by step


@dataclass
class _Run:
    cfg: SSLConfig
    out: Path
    device: torch.device
    rank: int
    world: int
    student: nn.Module
    teacher: nn.Module
    loss_fn: DINOLoss
    optimizer: torch.optim.Optimizer
    lr_sched: CosineLRScheduler
    wd: np.ndarray
    momentum: np.ndarray
    loaders: dict[str, DataLoader]
    data: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)
    steps: int = 0

    def unwrapped(self) -> nn.Module:
        return self.student.module if isinstance(self.student, DistributedDataParallel) else self.student


def train_ssl(cfg: SSLConfig, resume: Optional[str] = None, progress: bool = True,
              overwrite: bool = False) -> SSLResult:
    """Pre-train ``cfg.model`` with DINO on ``cfg.data``; with ``resume`` (a run folder or its
    last.safetensors) continue exactly where it stopped."""
    cfg, saved = cfg.resolved().validate(), None
    if resume:
        cfg, saved = _resume_state(resume, cfg)
    device = resolve_device(cfg.device)
    init_distributed(device)
    rank, world = rank_and_world()
    if cfg.batch_size % world:
        raise ConfigError(f"--batch-size {cfg.batch_size} must be divisible by the {world} processes")
    out = _output_folder(cfg, resume, overwrite, rank)
    cfg = replace(cfg, output=str(out))
    seed_everything(cfg.seed)
    run = _build_run(cfg, out, device, rank, world)
    if saved is not None:
        _restore(run, *saved)
    elif rank == 0:
        run.history.append(dict(epoch=0, train_loss=float("nan"), **_knn(run), steps=0))
        log.info("random-init k-NN: top-1 %.2f%%", run.history[-1]["knn_top1"])
    if world > 1:
        run.student = DistributedDataParallel(run.student, device_ids=[device.index] if device.type == "cuda"
                                              else None)
    if rank == 0:
        atomic_write(out / "config.json", json.dumps(dict(cfg.to_json(), **run.data), indent=2).encode())
    for epoch in range(len(run.history) - 1 if run.history else 0, cfg.epochs):
        if cfg.max_steps is not None and run.steps >= cfg.max_steps:
            break
        stats = train_one_epoch(run, epoch, progress)
        record = dict(epoch=epoch + 1, **stats, **(_knn(run) if rank == 0 else {}), steps=run.steps)
        if world > 1:
            dist.barrier()  # the other processes wait while rank 0 runs the k-NN monitor
        run.history.append(record)
        if rank == 0:
            save_checkpoints(run, epoch)
            _log_epoch(record)
    if rank == 0 and run.history:
        from .plots import plot_ssl_curves
        plot_ssl_curves(run.history, out / "curves.png", title=f"DINO: {cfg.model} on {cfg.data}")
    return SSLResult(out, run.history, run.step_losses)


def _resume_state(resume: str, cfg: SSLConfig) -> tuple[SSLConfig, tuple[dict, dict]]:
    path = resolve_run_path(resume)
    path = path / "last.safetensors" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"--resume {resume}: no {path.name} there (a run writes it after its first epoch)")
    tensors, meta = load_checkpoint(path)
    if meta.get("kind") != "ssl" or not all(k in meta for k in ("config", "history", "optimizer", "rng")):
        raise ConfigError(f"--resume {path} is not a `ctxagg ssl train` state (no teacher, optimiser and RNG state)")
    saved = SSLConfig.from_json(meta["config"])
    if (saved.model, saved.data, saved.method) != (cfg.model, cfg.data, cfg.method):
        raise ConfigError(f"--resume {path}: that run trained {saved.method} on {saved.model!r} with {saved.data!r}, "
                          f"not {cfg.method} on {cfg.model!r} with {cfg.data!r}")
    # the run's own settings, except where to write, how long to run and the loader processes
    cfg = replace(saved, output=cfg.output or str(path.parent), epochs=cfg.epochs, max_steps=cfg.max_steps,
                  workers=cfg.workers).resolved()
    return cfg, (tensors, meta)


def _output_folder(cfg: SSLConfig, resume: Optional[str], overwrite: bool, rank: int) -> Path:
    if cfg.output is None:
        out = new_run_dir(RUNS_ROOT, "ssl", cfg.method, cfg.model, data_tag(cfg.data))
        if rank == 0:
            update_latest(RUNS_ROOT, out)
        return out
    out = resolve_run_path(cfg.output)
    continuing = resume is not None and out.is_dir() and (out / "last.safetensors").is_file() and \
        _same_folder(resume, out)
    if not continuing and (rank == 0 or not overwrite):
        refuse_existing(out, overwrite, resumable=True, outputs=SSL_OUTPUTS)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        remove_temp_files(out)
    return out


def _same_folder(resume: str, out: Path) -> bool:
    path = resolve_run_path(resume)
    return (path if path.is_dir() else path.parent).resolve() == out.resolve()


def _build_run(cfg: SSLConfig, out: Path, device: torch.device, rank: int, world: int) -> _Run:
    student, teacher = build_student_teacher(cfg)
    local_size = cfg.local_crop_size or default_local_size(student.backbone, cfg.img_size)
    check_crop_size(student.backbone, cfg.img_size, "global crop")
    if cfg.local_crops:
        check_crop_size(student.backbone, local_size, "local crop")
    loaders, data = _loaders(cfg, local_size, rank, world)
    steps_per_epoch = len(loaders["train"])
    student, teacher = student.to(device), teacher.to(device)
    optimizer = create_optimizer_v2(student, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
    for group in optimizer.param_groups:  # the weight-decay schedule applies to the decayed group only
        group["ssl_decay"] = group["weight_decay"] > 0
    warmup = min(cfg.warmup_epochs, cfg.epochs - 1) * steps_per_epoch
    lr_sched = CosineLRScheduler(optimizer, t_initial=cfg.epochs * steps_per_epoch - warmup, lr_min=cfg.min_lr,
                                 warmup_t=warmup, warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)
    wd = cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, steps_per_epoch)
    momentum = cosine_schedule(cfg.momentum_teacher, 1.0, cfg.epochs, steps_per_epoch)
    loss_fn = DINOLoss(cfg.out_dim, cfg.student_temp, cfg.center_momentum).to(device)
    return _Run(cfg, out, device, rank, world, student, teacher, loss_fn, optimizer, lr_sched, wd, momentum,
                loaders, dict(data, local_crop_size=local_size, steps_per_epoch=steps_per_epoch))


def _loaders(cfg: SSLConfig, local_size: int, rank: int, world: int) -> tuple[dict[str, DataLoader], dict]:
    train, val = load_dataset(cfg.data, cfg.val_fraction, cfg.seed)
    train = subset_fraction(train, cfg.fraction, cfg.seed)
    bank = train if not 0 < cfg.knn_train_limit < len(train.labels) else \
        subset_fraction(train, cfg.knn_train_limit / len(train.labels), cfg.seed)
    if 0 < cfg.val_limit < len(val.labels):
        val = subset_fraction(val, cfg.val_limit / len(val.labels), cfg.seed)
    if len(train.labels) < cfg.batch_size or len(val.labels) == 0:
        raise ConfigError(f"{cfg.data}: {len(train.labels)} training images (need at least one batch of "
                          f"{cfg.batch_size}) and {len(val.labels)} validation images (need at least 1)")
    mean, std = train.channel_stats()
    crops = MultiCropTransform(cfg.img_size, local_size, cfg.local_crops, mean, std, tuple(cfg.global_scale),
                               tuple(cfg.local_scale), cfg.hflip)
    sampler = DistributedSampler(ArrayDataset(train, crops), num_replicas=world, rank=rank, shuffle=True,
                                 seed=cfg.seed, drop_last=True)
    eval_tf = build_eval_transform(cfg.img_size, mean, std)
    loaders = dict(train=DataLoader(sampler.dataset, batch_size=cfg.batch_size // world, sampler=sampler,
                                    num_workers=cfg.workers, drop_last=True),
                   bank=DataLoader(ArrayDataset(bank, eval_tf), batch_size=256, num_workers=cfg.workers),
                   val=DataLoader(ArrayDataset(val, eval_tf), batch_size=256, num_workers=cfg.workers))
    return loaders, dict(mean=mean, std=std, num_classes=len(train.classes), classes=train.classes,
                         train_images=len(train.labels), knn_bank_images=len(bank.labels), val_images=len(val.labels))


def clip_gradients(model: nn.Module, clip: float) -> None:
    """DINO's gradient clipping: each parameter's gradient norm is clipped to ``clip`` on its own (not the global
    norm as timm's ``dispatch_clip_grad``)."""
    for p in model.parameters():
        if p.grad is not None:
            norm = p.grad.detach().norm(2)
            p.grad.mul_(torch.clamp(clip / (norm + 1e-6), max=1.0))


def _step(run: _Run, crops: list[torch.Tensor], epoch: int) -> float:
    """One DINO step (Caron et al. 2021, Algorithm 1): teacher on the 2 global views, student on all views, loss
    Eq. 3, AdamW step, centre update Eq. 4, teacher EMA."""
    cfg, step = run.cfg, run.steps
    run.lr_sched.step_update(step)
    for group in run.optimizer.param_groups:
        if group["ssl_decay"]:
            group["weight_decay"] = float(run.wd[step])
    crops = [c.to(run.device, non_blocking=True) for c in crops]
    with torch.no_grad():
        teacher_out = run.teacher(crops[:2])
    student_out = run.student(crops)
    temp = teacher_temperature(epoch, cfg.warmup_teacher_temp, cfg.teacher_temp, cfg.warmup_teacher_temp_epochs)
    loss = run.loss_fn(student_out, teacher_out, temp, len(crops))
    if not torch.isfinite(loss.detach()):
        raise NonFiniteSSLLossError(f"DINO loss is {loss.item()} at epoch {epoch + 1}, step {step}; stopping (the "
                                    "checkpoints of the last finished epoch are kept; lower --lr)")
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.clip_grad:
        clip_gradients(run.unwrapped(), cfg.clip_grad)
    cancel_last_layer_gradients(run.unwrapped(), epoch, cfg.freeze_last_layer)
    run.optimizer.step()
    run.loss_fn.update_center(teacher_out)
    update_teacher(run.unwrapped(), run.teacher, float(run.momentum[step]))
    run.steps += 1
    return loss.item()


def train_one_epoch(run: _Run, epoch: int, progress: bool = True) -> dict[str, float]:
    """One epoch of DINO steps; returns the mean loss, the schedules' last values and the speed."""
    run.student.train()
    run.teacher.train()  # paper-silent: the released code never puts the teacher in eval mode (BN batch stats)
    run.loaders["train"].sampler.set_epoch(epoch)
    losses, t0, seen = [], time.perf_counter(), 0
    bar = run.loaders["train"]
    if progress and run.rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(bar, desc=f"dino epoch {epoch + 1}/{run.cfg.epochs}", leave=False, dynamic_ncols=True)
    for crops, _ in bar:
        if run.cfg.max_steps is not None and run.steps >= run.cfg.max_steps:
            break
        losses.append(_step(run, crops, epoch))
        seen += len(crops[0]) * run.world
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{np.mean(losses):.4f}", img_s=f"{seen / (time.perf_counter() - t0):.0f}")
    run.step_losses += losses
    seconds = time.perf_counter() - t0
    mean_loss = torch.tensor([sum(losses), len(losses)], dtype=torch.float64)
    if run.world > 1:
        dist.all_reduce(mean_loss)
    last = max(run.steps - 1, 0)
    return dict(train_loss=(mean_loss[0] / mean_loss[1].clamp(min=1)).item(),
                lr=run.optimizer.param_groups[0]["lr"], weight_decay=float(run.wd[last]),
                momentum=float(run.momentum[last]),
                teacher_temp=teacher_temperature(epoch, run.cfg.warmup_teacher_temp, run.cfg.teacher_temp,
                                                 run.cfg.warmup_teacher_temp_epochs),
                epoch_seconds=seconds, img_per_s=seen / max(seconds, 1e-9))


def _knn(run: _Run) -> dict[str, float]:
    """DINO's k-NN monitor on the teacher backbone (k = cfg.knn_k, T = cfg.knn_temperature), plus k = 10."""
    backbone = run.teacher.backbone
    bank, bank_labels = extract_features(backbone, run.loaders["bank"], run.device)
    val, val_labels = extract_features(backbone, run.loaders["val"], run.device)
    n = run.data["num_classes"]
    main = knn_accuracy(bank, bank_labels, val, val_labels, n, run.cfg.knn_k, run.cfg.knn_temperature)
    ten = knn_accuracy(bank, bank_labels, val, val_labels, n, 10, run.cfg.knn_temperature)
    return dict(knn_top1=main["top1"], knn_top5=main["top5"], knn10_top1=ten["top1"])


def _state_tensors(run: _Run) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {f"student.{k}": v for k, v in run.unwrapped().state_dict().items()}
    tensors.update({f"teacher.{k}": v for k, v in run.teacher.state_dict().items()})
    tensors["dino.center"] = run.loss_fn.center
    optim_tensors, optim_js = optimizer_state_to_flat(run.optimizer.state_dict())
    rng_tensors, rng_js = rng_state()
    return {**tensors, **optim_tensors, **rng_tensors}, dict(optimizer=optim_js, rng=rng_js)


def save_checkpoints(run: _Run, epoch: int) -> None:
    """``last.safetensors`` (everything a resume needs), ``teacher.safetensors`` (the teacher backbone as
    ``model.<name>``), ``metrics.csv``."""
    tensors, state = _state_tensors(run)
    meta = dict(kind="ssl", config=run.cfg.to_json(), epoch=epoch, history=run.history, steps=run.steps,
                **run.data, **state)
    save_checkpoint(run.out / "last.safetensors", tensors, meta)
    weights = {f"model.{k}": v for k, v in run.teacher.backbone.state_dict().items()}
    save_checkpoint(run.out / TEACHER_FILE, weights, dict(kind="ssl", config=run.cfg.to_json(), epoch=epoch,
                                                          knn_top1=run.history[-1].get("knn_top1"), **run.data))
    write_metrics_csv(run.out / "metrics.csv", run.history)


def _restore(run: _Run, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    run.student.load_state_dict(part("student."))
    run.teacher.load_state_dict(part("teacher."))
    run.loss_fn.center.copy_(tensors["dino.center"])
    run.optimizer.load_state_dict(optimizer_state_from_flat(tensors, meta["optimizer"]))
    run.history, run.steps = list(meta["history"]), int(meta["steps"])
    set_rng_state(tensors, meta["rng"])


def _log_epoch(r: dict[str, Any]) -> None:
    print(f"epoch {r['epoch']}: dino_loss {r['train_loss']:.4f} knn_top1 {r['knn_top1']:.2f} (k=10: "
          f"{r['knn10_top1']:.2f}) teacher_temp {r['teacher_temp']:.3f} momentum {r['momentum']:.4f} "
          f"({r['epoch_seconds']:.1f}s, {r['img_per_s']:.0f} img/s)", flush=True)
