"""Settings of a dense-prediction run (`ctxagg detect train` / `ctxagg segment train`) and the data they name."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

from torch.utils.data import Dataset

from ..errors import ConfigError
from .data import CocoDetection, DigitsDetection, DigitsSegmentation, SegmentationFolder, VocDetection
from .detectors import TORCHVISION_DETECTORS
from .detr import DETR_DETECTORS

__all__ = ["DenseConfig", "build_datasets", "CAMVID_CLASSES", "DATA_HELP"]

CAMVID_CLASSES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
                  "Bicyclist"]
DATA_HELP = {
    "detect": "digits (embedded: real UCI digit scans on synthetic canvases, boxes + masks), voc:ROOT (Pascal-VOC "
              "folder, splits train/val), coco:TRAIN.json,VAL.json (COCO format; images next to the json or in "
              "its images/)",
    "segment": "digits (embedded), camvid:ROOT (train/ + trainannot/, 11 classes + void), pair:ROOT (same layout; "
               "set --num-classes), ade20k:ROOT (images/ + annotations/ {training,validation}, 150 classes)",
}


@dataclass
class DenseConfig:
    """One run's settings; ``arch`` is a detector (detect) or ``semantic_fpn`` (segment)."""
    task: str = "detect"
    arch: str = "retinanet"
    backbone: str = "container_light"
    data: str = "digits"
    epochs: int = 12
    max_steps: Optional[int] = None
    batch_size: int = 4
    lr: float = 1e-4
    weight_decay: float = 0.05
    opt: str = "adamw"
    sched: str = "cosine"
    warmup_epochs: int = 0
    clip_grad: Optional[float] = None
    min_size: int = 800
    max_size: int = 1333
    seg_size: Optional[tuple[int, int]] = None
    num_classes: Optional[int] = None
    ignore_index: int = 255
    frozen_stages: int = 0
    frozen_bn: Optional[bool] = None
    backbone_checkpoint: Optional[str] = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    detector_kwargs: dict[str, Any] = field(default_factory=dict)
    digits_count: int = 128
    val_limit: int = 0
    seed: int = 0
    workers: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        archs = TORCHVISION_DETECTORS + DETR_DETECTORS if self.task == "detect" else ("semantic_fpn",)
        if self.task not in ("detect", "segment"):
            raise ConfigError(f"task must be 'detect' or 'segment', got {self.task!r}")
        if self.arch not in archs:
            raise ConfigError(f"--arch {self.arch!r} is not a {self.task} model; choose one of {archs}")
        for name in ("epochs", "batch_size", "min_size", "max_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.seg_size is not None:
            self.seg_size = tuple(int(v) for v in self.seg_size)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, js: dict[str, Any]) -> "DenseConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in js.items() if k in known})


def _detect_datasets(cfg: DenseConfig) -> tuple[Dataset, Dataset, list[str]]:
    kind, _, rest = cfg.data.partition(":")
    if kind == "digits":
        train = DigitsDetection(cfg.digits_count, split="train", seed=cfg.seed)
        return train, DigitsDetection(max(4, cfg.digits_count // 4), split="val", seed=cfg.seed), train.classes
    if kind == "voc" and rest:
        train = VocDetection(rest, "train")
        return train, VocDetection(rest, "val", classes=train.classes), train.classes
    if kind == "coco" and "," in rest:
        train_json, val_json = rest.split(",", 1)
        train = CocoDetection(train_json, masks=cfg.arch == "mask_rcnn")
        val = CocoDetection(val_json, masks=cfg.arch == "mask_rcnn")
        if val.classes != train.classes:
            raise ConfigError(f"{val_json} has categories {val.classes}, {train_json} has {train.classes}")
        return train, val, train.classes
    raise ConfigError(f"--data {cfg.data!r} is not a detection data spec; use {DATA_HELP['detect']}")


def _segment_datasets(cfg: DenseConfig) -> tuple[Dataset, Dataset, list[str]]:
    kind, _, root = cfg.data.partition(":")
    if kind == "digits":
        train = DigitsSegmentation(cfg.digits_count, split="train", seed=cfg.seed)
        return train, DigitsSegmentation(max(4, cfg.digits_count // 4), split="val", seed=cfg.seed), train.classes
    layouts = {"camvid": ("pair", 11, CAMVID_CLASSES), "pair": ("pair", cfg.num_classes, None),
               "ade20k": ("ade20k", 150, None)}
    if kind not in layouts or not root:
        raise ConfigError(f"--data {cfg.data!r} is not a segmentation data spec; use {DATA_HELP['segment']}")
    layout, num_classes, names = layouts[kind]
    num_classes = cfg.num_classes or num_classes
    if num_classes is None:
        raise ConfigError(f"--data {cfg.data}: set --num-classes (label values 0..N-1; others are ignored)")
    common = dict(layout=layout, num_classes=num_classes, ignore_index=cfg.ignore_index, size=cfg.seg_size,
                  classes=names)
    train = SegmentationFolder(root, "train", **common)
    return train, SegmentationFolder(root, "val", resize_labels=False, **common), train.classes


def build_datasets(cfg: DenseConfig) -> tuple[Dataset, Dataset, list[str]]:
    """Train and validation datasets and the class names that ``cfg.data`` names (see :data:`DATA_HELP`)."""
    return _detect_datasets(cfg) if cfg.task == "detect" else _segment_datasets(cfg)
