"""The run configuration of `ctxagg ssl train`, with DINO's recipe (Caron et al. 2021, Appendix) as defaults."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from ..errors import ConfigError

__all__ = ["SSLConfig", "METHODS"]

METHODS = ("dino",)


@dataclass
class SSLConfig:
    """Settings of a self-supervised run; None fields are filled by :meth:`resolved` from DINO's recipe."""

    method: str = "dino"
    model: str = "container_light"
    data: str = "digits"
    output: Optional[str] = None          # None: a new folder runs/ssl-<method>-<model>-<data>-<stamp>
    epochs: int = 100
    batch_size: int = 64
    img_size: int = 32                    # global crop size (DINO: 224)
    local_crops: int = 8                  # DINO: 8 local views
    local_crop_size: Optional[int] = None  # None: 96/224 of img_size rounded up to the backbone's stride
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    out_dim: int = 65536                  # K, DINO's head output
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    norm_last_layer: bool = True
    lr: Optional[float] = None            # None: 5e-4 · batch_size / 256 (DINO's linear scaling rule)
    min_lr: float = 1e-6
    warmup_epochs: Optional[int] = None   # None: 10% of the epochs (DINO: 10 of 100)
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.996
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: Optional[int] = None  # None: 30% of the epochs (DINO: 30 of 100)
    student_temp: float = 0.1
    center_momentum: float = 0.9
    freeze_last_layer: int = 1
    clip_grad: float = 3.0                # per-parameter gradient-norm clip (DINO's clip_gradients); 0: off
    drop_path: float = 0.1
    hflip: Optional[float] = None         # None: 0.5, or 0 for digit data (flips change digits)
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_train_limit: int = 0              # >0: k-NN bank of a fixed-seed stratified subset of this many images
    fraction: float = 1.0
    val_fraction: float = 0.2
    val_limit: int = 0
    workers: int = 0
    seed: int = 0
    device: str = "auto"
    max_steps: Optional[int] = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> "SSLConfig":
        """A copy with every None recipe field filled (``output`` and ``local_crop_size`` stay as given)."""
        out = SSLConfig(**asdict(self))
        out.global_scale, out.local_scale = tuple(self.global_scale), tuple(self.local_scale)
        if out.lr is None:
            out.lr = 5e-4 * self.batch_size / 256
        if out.warmup_epochs is None:
            out.warmup_epochs = int(round(0.1 * self.epochs))
        if out.warmup_teacher_temp_epochs is None:
            out.warmup_teacher_temp_epochs = int(round(0.3 * self.epochs))
        if out.hflip is None:
            out.hflip = 0.0 if self.data.split(":")[0] in ("digits", "mnist") else 0.5
        return out

    def validate(self) -> "SSLConfig":
        """Refuse impossible settings before any work starts; returns self."""
        problems = []

        def need(ok: bool, text: str) -> None:
            if not ok:
                problems.append(text)

        need(self.method in METHODS, f"unknown --method {self.method!r}; choose one of {', '.join(METHODS)}")
        for flag, value, low in (("epochs", self.epochs, 1), ("batch-size", self.batch_size, 2),
                                 ("img-size", self.img_size, 8), ("out-dim", self.out_dim, 1),
                                 ("hidden-dim", self.hidden_dim, 1), ("bottleneck-dim", self.bottleneck_dim, 1),
                                 ("local-crops", self.local_crops, 0), ("knn-k", self.knn_k, 1),
                                 ("freeze-last-layer", self.freeze_last_layer, 0), ("workers", self.workers, 0),
                                 ("val-limit", self.val_limit, 0), ("knn-train-limit", self.knn_train_limit, 0)):
            need(value >= low, f"--{flag} must be at least {low}, got {value}")
        for flag, value in (("lr", self.lr), ("teacher-temp", self.teacher_temp), ("student-temp", self.student_temp),
                            ("warmup-teacher-temp", self.warmup_teacher_temp), ("knn-temperature",
                                                                                 self.knn_temperature)):
            need(value is None or (math.isfinite(value) and value > 0), f"--{flag} must be positive, got {value}")
        for flag, value, lo, hi in (("momentum-teacher", self.momentum_teacher, 0, 1),
                                    ("center-momentum", self.center_momentum, 0, 0.999999),
                                    ("drop-path", self.drop_path, 0, 0.999999), ("fraction", self.fraction, 1e-9, 1),
                                    ("val-fraction", self.val_fraction, 1e-9, 0.999999),
                                    ("min-lr", self.min_lr, 0, math.inf), ("clip-grad", self.clip_grad, 0, math.inf),
                                    ("weight-decay", self.weight_decay, 0, math.inf),
                                    ("weight-decay-end", self.weight_decay_end, 0, math.inf)):
            need(lo <= value <= hi, f"--{flag} must be in [{lo}, {hi}], got {value}")
        need(self.max_steps is None or self.max_steps >= 1, f"--max-steps must be at least 1, got {self.max_steps}")
        need(self.local_crop_size is None or 1 <= self.local_crop_size <= self.img_size,
             f"--local-crop-size must be in [1, --img-size {self.img_size}], got {self.local_crop_size}")
        need(isinstance(self.model_kwargs, dict), "--model-kwargs must be a JSON object")
        problems += self._data_problems()
        if problems:
            raise ConfigError("invalid self-supervised training settings:\n  " + "\n  ".join(problems))
        return self

    def _data_problems(self) -> list[str]:
        kind, _, path = self.data.partition(":")
        if kind not in ("digits", "imagefolder", "cifar10", "mnist") or (kind != "digits" and not path):
            return [f"unknown --data {self.data!r}; use digits, imagefolder:PATH, cifar10:PATH or mnist:PATH"]
        if path and not Path(path).expanduser().exists():
            return [f"--data path {path} does not exist"]
        return []

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, js: dict[str, Any]) -> "SSLConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in js.items() if k in known})
