"""Detection and segmentation data: COCO json, Pascal-VOC XML folders, index-PNG folders, and an embedded default.

Every detection dataset yields ``(image, target)``: a float image (3, H, W) in [0, 1] and
``{"boxes": (N, 4) xyxy pixels, "labels": (N,) in 1..C, "masks": (N, H, W) uint8 (when known), "image_id"}``;
segmentation datasets yield ``(image, label)`` with an int64 (H, W) label map whose ``ignore_index`` pixels
are not scored. ``classes`` lists the C class names (label k is ``classes[k - 1]`` for detection, ``classes[k]``
for segmentation).
"""
from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image

from ..errors import ConfigError

__all__ = ["CocoDetection", "VocDetection", "SegmentationFolder", "DigitsDetection", "DigitsSegmentation",
           "read_image", "drop_degenerate_boxes", "collate"]

log = logging.getLogger("ctxagg.dense")


def read_image(path: Path) -> Tensor:
    """An RGB image file as float (3, H, W) in [0, 1]."""
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    return decode_image(str(path), mode=ImageReadMode.RGB).float() / 255


def collate(batch: Sequence[tuple[Any, Any]]) -> tuple[list[Any], list[Any]]:
    """Images and targets as two lists (detectors take lists of differently sized images)."""
    return [b[0] for b in batch], [b[1] for b in batch]


def drop_degenerate_boxes(boxes: np.ndarray, where: str, warn: bool = True) -> tuple[np.ndarray, int]:
    """Keep boxes with x2 > x1 and y2 > y1 (torchvision's detectors refuse the others); returns the keep mask
    and the number dropped, logging a warning naming ``where`` and the boxes (with ``warn``)."""
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) if len(boxes) else np.zeros(0, bool)
    dropped = int((~keep).sum())
    if dropped and warn:
        log.warning("%s: dropped %d degenerate box(es) with zero width or height: %s", where, dropped,
                    boxes[~keep].tolist())
    return keep, dropped


class VocDetection(Dataset):
    """Pascal-VOC detection folder (Everingham et al. 2010): ``root/JPEGImages/*.jpg``, ``root/Annotations/*.xml``,
    ``root/ImageSets/Main/<split>.txt``. Boxes use VOC's 1-based inclusive pixels as written (paper-silent: no
    -1 shift, as torchvision's VOC reader). Degenerate boxes are dropped with a warning; ``dropped`` counts them."""

    def __init__(self, root: str | Path, split: str = "train", classes: Optional[Sequence[str]] = None,
                 skip_difficult: bool = False):
        self.root = Path(root)
        ids_file = self.root / "ImageSets" / "Main" / f"{split}.txt"
        if not ids_file.is_file():
            raise ConfigError(f"{ids_file} does not exist: a VOC folder holds JPEGImages/, Annotations/ and "
                              f"ImageSets/Main/<split>.txt (split {split!r})")
        self.ids = [line.strip() for line in ids_file.read_text().splitlines() if line.strip()]
        self.records = [self._parse(i, skip_difficult) for i in self.ids]
        names = sorted({n for r in self.records for n in r["names"]})
        self.classes = list(classes) if classes is not None else names
        unknown = sorted(set(names) - set(self.classes))
        if unknown:
            raise ConfigError(f"{self.root} ({split}) has classes {unknown} not in the class list {self.classes}")
        self.dropped = sum(r["dropped"] for r in self.records)

    def _parse(self, image_id: str, skip_difficult: bool) -> dict[str, Any]:
        path = self.root / "Annotations" / f"{image_id}.xml"
        tree = ET.parse(path).getroot()
        names, boxes = [], []
        for obj in tree.iter("object"):
            if skip_difficult and obj.findtext("difficult", "0").strip() == "1":
                continue
            bb = obj.find("bndbox")
            names.append(obj.findtext("name").strip())
            boxes.append([float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")])
        boxes_np = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        keep, dropped = drop_degenerate_boxes(boxes_np, str(path))
        file_name = tree.findtext("filename") or f"{image_id}.jpg"
        return dict(file=file_name, boxes=boxes_np[keep], names=[n for n, k in zip(names, keep) if k],
                    dropped=dropped)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        rec = self.records[index]
        image = read_image(self.root / "JPEGImages" / rec["file"])
        labels = torch.tensor([self.classes.index(n) + 1 for n in rec["names"]], dtype=torch.int64)
        return image, dict(boxes=torch.from_numpy(rec["boxes"]).reshape(-1, 4), labels=labels,
                           image_id=torch.tensor(index))


class CocoDetection(Dataset):
    """COCO-format detection / instance segmentation (Lin et al. 2014): an annotation json (``images``,
    ``annotations`` with ``bbox`` [x, y, w, h] and optional polygon/RLE ``segmentation``, ``categories``) and an
    image folder (default: the json's folder, then its ``images/``). Category ids map to labels 1..C in id
    order; crowd annotations are skipped; degenerate boxes are dropped with a warning."""

    def __init__(self, annotations: str | Path, image_root: Optional[str | Path] = None, masks: bool = True):
        from pycocotools.coco import COCO

        self.annotations = Path(annotations)
        if not self.annotations.is_file():
            raise ConfigError(f"COCO annotation file {self.annotations} does not exist")
        self.coco = COCO(str(self.annotations))
        self.image_root = Path(image_root) if image_root else self._guess_root()
        self.cat_ids = sorted(self.coco.getCatIds())
        self.classes = [self.coco.cats[c]["name"] for c in self.cat_ids]
        self.ids = sorted(self.coco.getImgIds())
        self.masks = masks
        bad = [a for a in self.coco.anns.values() if not a.get("iscrowd", 0) and min(a["bbox"][2:]) <= 0]
        self.dropped = len(bad)
        if bad:
            log.warning("%s: %d degenerate box(es) with zero width or height will be dropped (annotation ids %s)",
                        self.annotations, len(bad), [a["id"] for a in bad][:10])

    def _guess_root(self) -> Path:
        first = next(iter(self.coco.imgs.values()), {}).get("file_name", "")
        for root in (self.annotations.parent, self.annotations.parent / "images"):
            if (root / first).is_file():
                return root
        return self.annotations.parent

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        info = self.coco.imgs[self.ids[index]]
        image = read_image(self.image_root / info["file_name"])
        anns = [a for a in self.coco.imgToAnns.get(self.ids[index], []) if not a.get("iscrowd", 0)]
        xywh = np.asarray([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        keep, _ = drop_degenerate_boxes(boxes, info["file_name"], warn=False)  # counted and reported in __init__
        anns = [a for a, k in zip(anns, keep) if k]
        target = dict(boxes=torch.from_numpy(boxes[keep]).reshape(-1, 4), image_id=torch.tensor(self.ids[index]),
                      labels=torch.tensor([self.cat_ids.index(a["category_id"]) + 1 for a in anns],
                                          dtype=torch.int64))
        if self.masks and all("segmentation" in a for a in anns):
            h, w = image.shape[-2:]
            masks = np.stack([self.coco.annToMask(a) for a in anns]) if anns else np.zeros((0, h, w), np.uint8)
            target["masks"] = torch.from_numpy(masks.astype(np.uint8))
        return image, target


def _pair_files(images: Path, labels: Path, suffix: str = ".png") -> list[tuple[Path, Path]]:
    if not images.is_dir() or not labels.is_dir():
        raise ConfigError(f"segmentation folders {images} and {labels} must both exist")
    pairs = []
    for img in sorted(p for p in images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")):
        label = labels / (img.stem + suffix)
        if not label.is_file():
            raise ConfigError(f"no label map {label} for image {img}")
        pairs.append((img, label))
    if not pairs:
        raise ConfigError(f"no images in {images}")
    return pairs


class SegmentationFolder(Dataset):
    """Index-PNG semantic segmentation: ``layout="pair"`` reads ``root/<split>/*.jpg|png`` with
    ``root/<split>annot/<stem>.png`` (the SegNet CamVid layout); ``layout="ade20k"`` reads
    ``root/images/<training|validation>/*.jpg`` with ``root/annotations/<...>/<stem>.png``, where 0 is "other"
    (ignored) and classes are 1..150, shifted to 0..149 (mmsegmentation's ``reduce_zero_label``).
    Label values ≥ ``num_classes`` become ``ignore_index``; ``size`` (H, W) resizes images (bilinear) and, for
    training, labels (nearest)."""

    def __init__(self, root: str | Path, split: str = "train", layout: str = "pair", num_classes: int = 11,
                 ignore_index: int = 255, size: Optional[tuple[int, int]] = None, resize_labels: bool = True,
                 classes: Optional[Sequence[str]] = None):
        root = Path(root)
        if layout == "pair":
            self.pairs = _pair_files(root / split, root / f"{split}annot")
        elif layout == "ade20k":
            sub = {"train": "training", "val": "validation"}.get(split, split)
            self.pairs = _pair_files(root / "images" / sub, root / "annotations" / sub)
        else:
            raise ConfigError(f"unknown segmentation layout {layout!r}; choose 'pair' or 'ade20k'")
        self.layout, self.num_classes, self.ignore_index = layout, num_classes, ignore_index
        self.size, self.resize_labels = size, resize_labels
        self.classes = list(classes) if classes is not None else [str(i) for i in range(num_classes)]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        img_path, label_path = self.pairs[index]
        image = read_image(img_path)
        label = decode_image(str(label_path), mode=ImageReadMode.GRAY)[0].long()
        if self.layout == "ade20k":
            label = torch.where(label == 0, self.ignore_index + 1, label - 1)
        label = torch.where(label >= self.num_classes, self.ignore_index, label)
        return resize_pair(image, label, self.size, self.resize_labels)


def resize_pair(image: Tensor, label: Tensor, size: Optional[tuple[int, int]], resize_labels: bool
                ) -> tuple[Tensor, Tensor]:
    """Resize an image (bilinear) and, if ``resize_labels``, its label map (nearest) to ``size``."""
    if size is None or tuple(image.shape[-2:]) == tuple(size):
        return image, label
    image = torch.nn.functional.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    if resize_labels:
        label = torch.nn.functional.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return image, label


def _digit_glyphs() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64)


class _DigitCanvases:
    """Shared layout of the embedded data: real UCI digit scans (Alpaydin & Kaynak 1998, scikit-learn's
    ``load_digits``, 1,797 8×8 scans) upscaled and pasted without overlap onto grey-noise canvases — real digits,
    synthetic layout. A digit's mask is its upscaled strokes (intensity > 0.25; paper-silent threshold)."""

    def __init__(self, count: int, size: tuple[int, int], per_image: tuple[int, int], scale: tuple[int, int],
                 seed: int, split: str):
        glyphs, targets = _digit_glyphs()
        half = np.arange(len(glyphs)) % 5 != 0  # 80/20 split of the scans: val canvases use unseen digits
        pool = np.flatnonzero(half if split == "train" else ~half)
        self.glyphs, self.targets, self.pool = glyphs, targets, pool
        self.count, self.size, self.per_image, self.scale = count, size, per_image, scale
        self.seed = seed + (0 if split == "train" else 1_000_003)
        self.classes = [str(d) for d in range(10)]

    def render(self, index: int) -> tuple[Tensor, list[tuple[int, np.ndarray, tuple[int, int]]]]:
        rng = np.random.default_rng((self.seed, index))
        h, w = self.size
        canvas = rng.uniform(0.0, 0.15, size=(h, w)).astype(np.float32)
        placed: list[tuple[int, np.ndarray, tuple[int, int]]] = []
        for _ in range(int(rng.integers(self.per_image[0], self.per_image[1] + 1))):
            k = int(self.pool[rng.integers(len(self.pool))])
            side = int(rng.integers(self.scale[0], self.scale[1] + 1))
            glyph = torch.nn.functional.interpolate(torch.from_numpy(self.glyphs[k])[None, None], size=(side, side),
                                                    mode="bilinear", align_corners=False)[0, 0].numpy()
            for _ in range(20):  # rejection-sample a free spot; a digit that finds none is left out
                y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
                if all(y + side <= py or py + g.shape[0] <= y or x + side <= px or px + g.shape[1] <= x
                       for _, g, (py, px) in placed):
                    canvas[y:y + side, x:x + side] = np.maximum(canvas[y:y + side, x:x + side], glyph)
                    placed.append((int(self.targets[k]), glyph, (y, x)))
                    break
        image = torch.from_numpy(np.clip(canvas, 0, 1))[None].repeat(3, 1, 1)
        return image, placed


class DigitsDetection(Dataset):
    """Embedded detection / instance-segmentation data needing no download (see :class:`_DigitCanvases`):
    ``count`` canvases of ``size`` with 1–4 digits each; labels 1..10 for digits 0..9, boxes are the tight box
    of each mask."""

    def __init__(self, count: int = 64, size: tuple[int, int] = (96, 128), split: str = "train", seed: int = 0,
                 per_image: tuple[int, int] = (1, 4), scale: tuple[int, int] = (20, 36)):
        self.canvases = _DigitCanvases(count, size, per_image, scale, seed, split)
        self.classes = self.canvases.classes

    def __len__(self) -> int:
        return self.canvases.count

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        image, placed = self.canvases.render(index)
        h, w = image.shape[-2:]
        masks = np.zeros((len(placed), h, w), np.uint8)
        for i, (_, glyph, (y, x)) in enumerate(placed):
            masks[i, y:y + glyph.shape[0], x:x + glyph.shape[1]] = glyph > 0.25
        boxes = []
        for m in masks:
            ys, xs = np.nonzero(m)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        return image, dict(boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                           labels=torch.tensor([d + 1 for d, _, _ in placed], dtype=torch.int64),
                           masks=torch.from_numpy(masks), image_id=torch.tensor(index))


class DigitsSegmentation(Dataset):
    """Embedded semantic-segmentation data (see :class:`_DigitCanvases`): each stroke pixel is labelled with
    its digit's class 1..10, everything else is background 0 (11 classes)."""

    def __init__(self, count: int = 64, size: tuple[int, int] = (96, 128), split: str = "train", seed: int = 0,
                 per_image: tuple[int, int] = (1, 4), scale: tuple[int, int] = (20, 36)):
        self.canvases = _DigitCanvases(count, size, per_image, scale, seed, split)
        self.classes = ["background"] + self.canvases.classes
        self.num_classes, self.ignore_index = 11, 255

    def __len__(self) -> int:
        return self.canvases.count

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image, placed = self.canvases.render(index)
        label = torch.zeros(image.shape[-2:], dtype=torch.int64)
        for digit, glyph, (y, x) in placed:
            region = label[y:y + glyph.shape[0], x:x + glyph.shape[1]]
            region[torch.from_numpy(glyph > 0.25)] = digit + 1
        return image, label
