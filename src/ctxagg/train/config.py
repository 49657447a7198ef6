"""The run configuration of `ctxagg train`, with the papers' recipes as presets."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

from ..errors import ConfigError

__all__ = ["TrainConfig", "RECIPES", "input_size_overrides"]


@dataclass
class TrainConfig:
    model: str = "container_light"
    data: str = "digits"
    output: Optional[str] = None         # None: a new folder runs/<model>-<data>-<YYYYmmdd-HHMMSS> (runs/latest)
    recipe: str = "deit"
    epochs: int = 30
    batch_size: int = 64
    img_size: int = 32
    lr: Optional[float] = None           # None: the recipe's base lr scaled by batch_size / 512
    weight_decay: Optional[float] = None
    opt: Optional[str] = None
    momentum: float = 0.9
    sched: str = "cosine"
    warmup_epochs: Optional[int] = None
    min_lr: float = 1e-6
    warmup_lr: float = 1e-6
    label_smoothing: Optional[float] = None
    mixup: Optional[float] = None
    cutmix: Optional[float] = None
    randaugment: Optional[str] = None    # timm auto-augment string, "" to disable
    reprob: Optional[float] = None       # random-erasing probability
    hflip: Optional[float] = None        # None: 0.5, or 0 for digit data (flips change digits)
    scale_min: Optional[float] = None    # lower bound of random-resized-crop area
    augment: bool = True                 # False: train on the eval transform (deterministic runs, tests)
    drop_path: Optional[float] = None
    repeated_aug: bool = False
    ema_decay: float = 0.0               # 0 disables EMA
    clip_grad: Optional[float] = None
    amp: bool = False                    # bf16 autocast (CPU and GPU)
    compile: bool = False                # torch.compile the model (inductor) for training and validation
    channels_last: bool = False          # channels_last weights and input batches (conv-heavy models)
    sync_bn: bool = False
    fraction: float = 1.0                # fixed-seed stratified subset of the training set
    val_fraction: float = 0.2            # held out when the data has no validation split
    val_limit: int = 0                   # >0: evaluate on a fixed-seed stratified subset of this many images
    workers: int = 0
    seed: int = 0
    skip_nonfinite: bool = False
    skip_bad_images: bool = False
    device: str = "auto"
    max_steps: Optional[int] = None      # stop after this many optimiser steps (tests, smoke runs)
    init: Optional[str] = None           # a `ctxagg ssl train` run (or its teacher.safetensors) to fine-tune from
    # learned dynamic-path switches (container_auto; train/budget.py): GMACs per image at --img-size to fit
    dynamic_budget: Optional[float] = None
    dynamic_lambda: Optional[float] = None  # weight of the paths' cost (all paths = 1); None: 1 with a budget, else 0
    dynamic_search: float = 0.5          # fraction of the run that learns the switches; then they are fixed
    dynamic_lr: float = 0.05             # learning rate of the switch logits
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> "TrainConfig":
        """A copy with every None filled from the recipe."""
        out = TrainConfig(**asdict(self))
        if self.recipe not in RECIPES:
            raise ConfigError(f"unknown recipe {self.recipe!r}; choose one of {sorted(RECIPES)}")
        for key, value in RECIPES[self.recipe].items():
            if key != "base_lr" and getattr(out, key) is None:
                setattr(out, key, value)
        if out.lr is None:
            out.lr = RECIPES[self.recipe]["base_lr"] * out.batch_size / 512
        if out.hflip is None:
            out.hflip = 0.0 if out.data.split(":")[0] in ("digits", "mnist") else 0.5
        if out.scale_min is None:
            out.scale_min = 0.08 if out.img_size > 64 else 0.35  # tiny images lose the object below ~35%
        return out

    def validate(self) -> "TrainConfig":
        """Refuse impossible settings before any work starts; returns self."""
        from pathlib import Path

        from .data import DATA_SPECS

        problems = []
        if self.epochs < 1:
            problems.append(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            problems.append(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.img_size < 8:
            problems.append(f"--img-size must be at least 8, got {self.img_size}")
        if self.val_limit < 0:
            problems.append(f"--val-limit must be 0 (all) or a number of images, got {self.val_limit}")
        if not 0 < self.fraction <= 1:
            problems.append(f"--fraction must be in (0, 1], got {self.fraction}")
        if not 0 < self.val_fraction < 1:
            problems.append(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.recipe not in RECIPES:
            problems.append(f"unknown --recipe {self.recipe!r}; choose one of {sorted(RECIPES)}")
        elif ((self.mixup if self.mixup is not None else RECIPES[self.recipe]["mixup"]) > 0
              or (self.cutmix if self.cutmix is not None else RECIPES[self.recipe]["cutmix"]) > 0) \
                and self.batch_size % 2:
            problems.append(f"Mixup/CutMix mixes pairs and needs an even --batch-size, got {self.batch_size}")
        if not 0 <= self.ema_decay < 1:
            problems.append(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        problems += self._range_problems()
        kind, _, path = self.data.partition(":")
        if kind not in ("digits", "imagefolder", "cifar10", "mnist") or (kind != "digits" and not path):
            problems.append(f"unknown --data {self.data!r}; use one of {', '.join(DATA_SPECS)}")
        elif path and not Path(path).expanduser().exists():
            problems.append(f"--data path {path} does not exist")
        elif kind == "imagefolder" and not Path(path).expanduser().is_dir():
            problems.append(f"--data imagefolder:{path} is not a folder")
        if self.output and Path(self.output).expanduser().exists() and not Path(self.output).expanduser().is_dir():
            problems.append(f"--output {self.output} exists and is not a folder")
        if self.init and not Path(self.init).expanduser().exists():
            problems.append(f"--init {self.init} does not exist (give a `ctxagg ssl train` run folder or its "
                            "teacher.safetensors)")
        if problems:
            raise ConfigError("invalid training settings:\n  " + "\n  ".join(problems))
        return self

    def _range_problems(self) -> list[str]:
        """Numbers outside their meaningful range, unknown optimiser/scheduler/device, malformed model kwargs."""
        import timm.optim
        import torch

        problems = []

        def need(ok: bool, flag: str, rule: str, value: Any) -> None:
            if value is not None and not ok:
                problems.append(f"--{flag} must be {rule}, got {value}")

        need(self.workers >= 0, "workers", "0 or more", self.workers)
        need(self.max_steps is None or self.max_steps >= 1, "max-steps", "at least 1", self.max_steps)
        need(self.lr is None or (math.isfinite(self.lr) and self.lr > 0), "lr", "a positive number", self.lr)
        need(self.dynamic_budget is None or (math.isfinite(self.dynamic_budget) and self.dynamic_budget > 0),
             "dynamic-budget", "a positive number of GMACs per image", self.dynamic_budget)
        need(0 < self.dynamic_search < 1, "dynamic-search", "in (0, 1) (the switches are fixed after that fraction "
             "of the run)", self.dynamic_search)
        need(math.isfinite(self.dynamic_lr) and self.dynamic_lr > 0, "dynamic-lr", "a positive number", self.dynamic_lr)
        for flag, value, lo, hi, rule in (
                ("weight-decay", self.weight_decay, 0, math.inf, "0 or more"),
                ("momentum", self.momentum, 0, 1, "in [0, 1]"),
                ("warmup-epochs", self.warmup_epochs, 0, math.inf, "0 or more"),
                ("min-lr", self.min_lr, 0, math.inf, "0 or more"),
                ("warmup-lr", self.warmup_lr, 0, math.inf, "0 or more"),
                ("label-smoothing", self.label_smoothing, 0, 0.999999, "in [0, 1)"),
                ("mixup", self.mixup, 0, math.inf, "0 or more"),
                ("cutmix", self.cutmix, 0, math.inf, "0 or more"),
                ("reprob", self.reprob, 0, 1, "in [0, 1]"),
                ("hflip", self.hflip, 0, 1, "in [0, 1]"),
                ("scale-min", self.scale_min, 1e-9, 1, "in (0, 1]"),
                ("drop-path", self.drop_path, 0, 0.999999, "in [0, 1)"),
                ("clip-grad", self.clip_grad, 0, math.inf, "0 or more (0: off)"),
                ("dynamic-lambda", self.dynamic_lambda, 0, math.inf, "0 or more")):
            need(value is None or lo <= value <= hi, flag, rule, value)
        if self.opt is not None and self.opt.lower().split("_")[-1] not in timm.optim.list_optimizers():
            problems.append(f"unknown --opt {self.opt!r} (timm optimisers: timm.optim.list_optimizers())")
        if self.sched not in ("cosine", "tanh", "step", "multistep", "poly", "constant", "rsqrt"):
            problems.append(f"unknown --sched {self.sched!r}; use cosine, tanh, step, multistep, poly, constant or "
                            "rsqrt")
        try:
            device = torch.device("cuda" if self.device == "auto" else self.device)
        except RuntimeError as exc:
            problems.append(f"unknown --device {self.device!r} ({exc})")
        else:
            if self.device != "auto" and device.type == "cuda" and not torch.cuda.is_available():
                problems.append(f"--device {self.device} but CUDA is not available here (use --device cpu or auto)")
        if not isinstance(self.model_kwargs, dict):
            problems.append(f"--model-kwargs must be a JSON object like '{{\"dims\": [8, 8, 16, 16]}}', got "
                            f"{type(self.model_kwargs).__name__}")
        return problems

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, js: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in js.items() if k in known})


# DeiT recipe (Touvron et al. 2021; used by Container §A and LinGlos): AdamW, lr 5e-4·B/512, wd 0.05, 5 warm-up
# epochs, cosine, label smoothing 0.1, Mixup 0.8, CutMix 1.0, RandAugment m9, random erasing 0.25, drop path 0.1.
# RandAugment: DeiT's "-inc1" policy can ask Pillow for posterize(bits=0), which Pillow >= 11 rejects, so the
# standard-level policy "rand-m9-mstd0.5" is used (same ops and magnitude, posterize keeps 4-8 bits).
# LESA (lesa.txt §4.1) trains its ResNets with SGD + Nesterov, lr 0.1·B/256, wd 1e-4, cosine, label smoothing.
# "light" is the DeiT recipe without the heavy regularisers, for short runs on small data.
RECIPES: dict[str, dict[str, Any]] = {
    "deit": dict(opt="adamw", base_lr=5e-4, weight_decay=0.05, warmup_epochs=5, label_smoothing=0.1, mixup=0.8,
                 cutmix=1.0, randaugment="rand-m9-mstd0.5", reprob=0.25, drop_path=0.1, clip_grad=None),
    "sgd": dict(opt="sgd", base_lr=0.2, weight_decay=1e-4, warmup_epochs=5, label_smoothing=0.1, mixup=0.0,
                cutmix=0.0, randaugment="", reprob=0.0, drop_path=0.0, clip_grad=None),
    "light": dict(opt="adamw", base_lr=2e-3, weight_decay=0.05, warmup_epochs=2, label_smoothing=0.1, mixup=0.0,
                  cutmix=0.0, randaugment="", reprob=0.0, drop_path=0.05, clip_grad=5.0),
}


def input_size_overrides(model: str, img_size: int) -> dict[str, Any]:
    """Model arguments for training ``model`` at ``img_size``: what its family's ``small_input_kwargs`` says
    (each family module keeps its own: backbones designed for 224² are adapted to ≤ 64² images so their last
    stage keeps a 2×2 map at 32²), or nothing for a model whose module has none (timm's own models)."""
    import sys

    from timm.models._registry import model_entrypoint

    family = sys.modules.get(model_entrypoint(model).__module__)
    adapt = getattr(family, "small_input_kwargs", None)
    return adapt(model, img_size) if adapt is not None else {}
