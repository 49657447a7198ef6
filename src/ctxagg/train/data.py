"""Datasets for `ctxagg train/eval/compare`, decoded once into uint8 arrays.

SPEC is one of ``digits`` (embedded: scikit-learn's UCI handwritten digits), ``imagefolder:PATH``,
``cifar10:PATH`` (python-pickle batches) or ``mnist:PATH`` (idx files). Every image is held as an
(H, W, 3) uint8 array (grey images are replicated to 3 channels) so CPU epochs are not spent decoding.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

__all__ = ["ImageArrays", "ArrayDataset", "load_dataset", "DATA_SPECS", "BadImageError"]

log = logging.getLogger("ctxagg.data")
DATA_SPECS = ("digits", "imagefolder:PATH", "cifar10:PATH", "mnist:PATH")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class BadImageError(ValueError):
    """An image file that cannot be decoded."""


@dataclass
class ImageArrays:
    """Decoded images (N, H, W, 3) uint8 with integer labels and class names."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    skipped: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise ValueError(f"labels must lie in [0, {len(self.classes) - 1}], found "
                             f"[{self.labels.min()}, {self.labels.max()}]")

    def subset(self, index: np.ndarray) -> "ImageArrays":
        return ImageArrays(self.images[index], self.labels[index], self.classes)

    def channel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std in [0, 1], measured on these images."""
        sample = self.images[:: max(1, len(self.images) // 5000)].reshape(-1, 3).astype(np.float64) / 255
        return tuple(sample.mean(0).round(4).tolist()), tuple(np.maximum(sample.std(0), 1e-3).round(4).tolist())


class ArrayDataset(Dataset):
    """A map-style dataset over :class:`ImageArrays`; ``transform`` receives a PIL RGB image."""

    def __init__(self, arrays: ImageArrays, transform: Optional[Callable] = None):
        self.arrays = arrays
        self.transform = transform

    def __len__(self) -> int:
        return len(self.arrays.labels)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.arrays.images[index], mode="RGB")
        return (self.transform(image) if self.transform else image), int(self.arrays.labels[index])


def _to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=-1)


def _split(arrays: ImageArrays, val_fraction: float, seed: int) -> tuple[ImageArrays, ImageArrays]:
    """Deterministic stratified split: ``val_fraction`` of every class goes to validation."""
    rng = np.random.default_rng(seed)
    val_idx = []
    for c in range(len(arrays.classes)):
        idx = np.flatnonzero(arrays.labels == c)
        rng.shuffle(idx)
        val_idx.append(idx[: int(round(len(idx) * val_fraction))])
    val = np.sort(np.concatenate(val_idx)) if val_idx else np.array([], dtype=int)
    train = np.setdiff1d(np.arange(len(arrays.labels)), val)
    return arrays.subset(train), arrays.subset(val)


def load_digits_arrays() -> ImageArrays:
    """scikit-learn's bundled UCI handwritten digits: 1,797 8×8 images with 17 grey levels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = np.round(digits.images * (255 / 16)).astype(np.uint8)
    return ImageArrays(_to_rgb(grey), digits.target.astype(np.int64), [str(i) for i in range(10)])


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR's python batches are pickles: allow only what numpy arrays need, never arbitrary code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(data), np.asarray(batch[b"labels"], dtype=np.int64)


def load_cifar10(root: Path) -> tuple[ImageArrays, ImageArrays]:
    """CIFAR-10 python batches (``data_batch_1..5``, ``test_batch``, ``batches.meta``) under ``root``."""
    root = _find_dir_with(root, "data_batch_1")
    parts = [_read_cifar_batch(root / f"data_batch_{i}") for i in range(1, 6)]
    test = _read_cifar_batch(root / "test_batch")
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    train = ImageArrays(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), classes)
    return train, ImageArrays(test[0], test[1], classes)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 8:
        raise ValueError(f"{path} is not an unsigned-byte idx file")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4: 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: header says {shape}, found {data.size} values")
    return data.reshape(shape)


def load_mnist(root: Path, val_fraction: float, seed: int) -> tuple[ImageArrays, ImageArrays]:
    """MNIST idx files (``*-images-idx3-ubyte[.gz]`` / ``*-labels-idx1-ubyte[.gz]``). With both train and
    t10k files, t10k is the validation set; with only one pair, ``val_fraction`` of it is held out."""
    def find(prefix: str, kind: str) -> Optional[Path]:
        hits = sorted(root.glob(f"{prefix}-{kind}-idx*-ubyte*"))
        return hits[0] if hits else None

    classes = [str(i) for i in range(10)]
    pairs = {p: (find(p, "images"), find(p, "labels")) for p in ("train", "t10k")}
    loaded = {p: ImageArrays(_to_rgb(_read_idx(i)), _read_idx(l).astype(np.int64), classes)
              for p, (i, l) in pairs.items() if i and l}
    if not loaded:
        raise FileNotFoundError(f"no MNIST idx files (train-images-idx3-ubyte[.gz], ...) under {root}")
    if len(loaded) == 2:
        return loaded["train"], loaded["t10k"]
    return _split(next(iter(loaded.values())), val_fraction, seed)


def _find_dir_with(root: Path, name: str) -> Path:
    if (root / name).exists():
        return root
    for sub in sorted(p for p in root.rglob(name)):
        return sub.parent
    raise FileNotFoundError(f"no {name} found under {root}")


def _decode(path: Path, size: Optional[int]) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if size and img.size != (size, size):
                img = img.resize((size, size), Image.BICUBIC)
            return np.asarray(img, dtype=np.uint8)
    except Exception as exc:  # PIL raises many types for corrupt/truncated/non-image files
        raise BadImageError(f"cannot decode image {path}: {exc}") from exc


def _scan_folder(folder: Path) -> tuple[list[Path], list[int], list[str]]:
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"{folder} has no class sub-folders (expected {folder}/<class>/<image>)")
    files, labels = [], []
    for label, cls in enumerate(classes):
        found = sorted(p for p in (folder / cls).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise ValueError(f"class folder {folder / cls} has no images ({', '.join(IMAGE_SUFFIXES)})")
        files += found
        labels += [label] * len(found)
    return files, labels, classes


def _cache_dir() -> Path:
    return Path(os.environ.get("CTXAGG_CACHE", Path.home() / ".cache" / "ctxagg"))


def load_image_folder(folder: Path, size: Optional[int], skip_bad: bool = False) -> ImageArrays:
    """Decode an ImageFolder (``<class>/<image>``) once into uint8 arrays, cached on disk by file list.

    Images of different sizes are resized to ``size`` (bicubic); a corrupt file stops the load with its
    name, or with ``skip_bad`` is skipped and counted."""
    files, labels, classes = _scan_folder(folder)
    key = hashlib.sha1(repr((str(folder.resolve()), size, [(str(f), f.stat().st_mtime_ns) for f in files]))
                       .encode()).hexdigest()[:16]
    cache = _cache_dir() / f"imagefolder-{key}.npz"
    if cache.exists():
        with np.load(cache) as z:
            return ImageArrays(z["images"], z["labels"], classes, list(z["skipped"]))
    images, kept, skipped = [], [], []
    for path, label in zip(files, labels):
        try:
            images.append(_decode(path, size))
            kept.append(label)
        except BadImageError:
            if not skip_bad:
                raise
            skipped.append(str(path))
    if skipped:
        log.warning("skipped %d unreadable image(s) in %s, e.g. %s", len(skipped), folder, skipped[0])
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise ValueError(f"images under {folder} have different sizes {sorted(shapes)[:3]}...; pass --img-size "
                         "so they are resized once while decoding")
    arrays = ImageArrays(np.stack(images), np.asarray(kept, dtype=np.int64), classes, skipped)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, images=arrays.images, labels=arrays.labels, skipped=np.asarray(skipped, dtype=str))
    os.replace(tmp, cache)
    return arrays


def load_dataset(spec: str, val_fraction: float = 0.2, seed: int = 0, decode_size: Optional[int] = None,
                 skip_bad: bool = False) -> tuple[ImageArrays, ImageArrays]:
    """(train, val) arrays for a data SPEC (see module docstring)."""
    kind, _, path = spec.partition(":")
    if kind == "digits":
        return _split(load_digits_arrays(), val_fraction, seed)
    if kind not in ("imagefolder", "cifar10", "mnist") or not path:
        raise ValueError(f"unknown data spec {spec!r}; use one of {', '.join(DATA_SPECS)}")
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data path {root} does not exist (from --data {spec})")
    if kind == "cifar10":
        return load_cifar10(root)
    if kind == "mnist":
        return load_mnist(root, val_fraction, seed)
    if (root / "train").is_dir():
        val_dir = next((root / d for d in ("val", "test", "validation") if (root / d).is_dir()), None)
        train = load_image_folder(root / "train", decode_size, skip_bad)
        if val_dir is not None:
            val = load_image_folder(val_dir, decode_size, skip_bad)
            if val.classes != train.classes:
                raise ValueError(f"{val_dir} classes {val.classes[:5]}... differ from {root / 'train'}'s")
            return train, val
        return _split(train, val_fraction, seed)
    return _split(load_image_folder(root, decode_size, skip_bad), val_fraction, seed)
