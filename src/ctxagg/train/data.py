"""Datasets for `ctxagg train/eval/compare`, decoded once into uint8 arrays.

SPEC is one of ``digits`` (embedded: scikit-learn's UCI handwritten digits), ``imagefolder:PATH``,
``cifar10:PATH`` (python-pickle batches) or ``mnist:PATH`` (idx files). Every image is held as an
(H, W, 3) uint8 array (grey images are replicated to 3 channels) so CPU epochs are not spent decoding.
"""
from __future__ import annotations

import gzip
import hashlib
import logging
import os
import pickle
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..errors import CtxaggError

__all__ = ["ImageArrays", "ArrayDataset", "load_dataset", "DATA_SPECS", "DataError", "BadImageError"]

log = logging.getLogger("ctxagg.data")
DATA_SPECS = ("digits", "imagefolder:PATH", "cifar10:PATH", "mnist:PATH")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class DataError(CtxaggError, ValueError):
    """Data that cannot be used as given: an unreadable file or folder, a wrong label, a malformed file."""


class BadImageError(DataError):
    """An image file that cannot be read or decoded."""


@dataclass
class ImageArrays:
    """Decoded images (N, H, W, 3) uint8 with integer labels and class names."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    skipped: list[str] = field(default_factory=list)  # what the loader skipped (files, or "file: N sample(s)")

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise DataError(f"{len(self.images)} images but {len(self.labels)} labels")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise DataError(f"labels must lie in [0, {len(self.classes) - 1}], found "
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
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file (only numpy "
                                         "arrays are allowed; nothing was executed)")
        return super().find_class(module, name)


def _check_labels(labels: np.ndarray, num_classes: int, source: str, skip_bad: bool) -> np.ndarray:
    """Indices of the labels in [0, num_classes); an out-of-range label stops the load naming ``source``, or
    with ``skip_bad`` its sample is dropped and counted."""
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad) and not skip_bad:
        raise DataError(f"{source}: label {labels[bad[0]]} at index {bad[0]} is outside the {num_classes} classes "
                        f"0-{num_classes - 1} ({len(bad)} such label(s)); fix the file or pass --skip-bad-images "
                        "to drop those samples")
    if len(bad):
        log.warning("skipped %d sample(s) of %s with labels outside 0-%d, e.g. label %d at index %d",
                    len(bad), source, num_classes - 1, labels[bad[0]], bad[0])
    return np.setdiff1d(np.arange(len(labels)), bad)


def _read_cifar_batch(path: Path, skip_bad: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
    try:
        with open(path, "rb") as f:
            batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise DataError(f"cannot read CIFAR batch {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{path} is not a CIFAR-10 python batch (expected a dict with b'data' and b'labels')")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"], dtype=np.int64).reshape(-1)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise DataError(f"{path}: expected uint8 data shaped (N, 3072) and N labels, got data {data.dtype} "
                        f"{data.shape} and {len(labels)} labels")
    keep = _check_labels(labels, 10, f"CIFAR batch {path}", skip_bad)
    data = data[keep].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(data), labels[keep], len(labels) - len(keep)


def load_cifar10(root: Path, skip_bad: bool = False) -> tuple[ImageArrays, ImageArrays]:
    """CIFAR-10 python batches (``data_batch_1..5``, ``test_batch``, ``batches.meta``) under ``root``."""
    root = _find_dir_with(root, "data_batch_1")
    parts = [_read_cifar_batch(root / f"data_batch_{i}", skip_bad) for i in range(1, 6)]
    test = _read_cifar_batch(root / "test_batch", skip_bad)
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    train = ImageArrays(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), classes,
                        skipped=[f"{root / f'data_batch_{i}'}: {p[2]} sample(s)" for i, p in enumerate(parts, 1)
                                 if p[2]])
    return train, ImageArrays(test[0], test[1], classes,
                              skipped=[f"{root / 'test_batch'}: {test[2]} sample(s)"] if test[2] else [])


def _read_idx(path: Path, ndim_expected: Optional[int] = None) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:  # unreadable, or a truncated/corrupt .gz
        raise DataError(f"cannot read idx file {path}: {type(exc).__name__}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 8:
        raise DataError(f"{path} is not an unsigned-byte idx file")
    ndim = raw[3]
    if ndim_expected is not None and ndim != ndim_expected:
        raise DataError(f"{path} holds a {ndim}-D array; expected {ndim_expected}-D "
                        f"({'N×H×W images' if ndim_expected == 3 else 'N labels'})")
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path} is truncated inside its header")
    shape = struct.unpack(f">{ndim}I", raw[4: 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DataError(f"{path} is truncated: header says {shape}, found {data.size} values")
    return data.reshape(shape)


def _read_mnist_pair(images: Path, labels: Path, classes: list[str], skip_bad: bool) -> ImageArrays:
    x, y = _read_idx(images, 3), _read_idx(labels, 1).astype(np.int64)
    if len(x) != len(y):
        raise DataError(f"{images} holds {len(x)} images but {labels} holds {len(y)} labels")
    keep = _check_labels(y, len(classes), f"MNIST labels {labels}", skip_bad)
    skipped = [f"{labels}: {len(y) - len(keep)} sample(s)"] if len(keep) < len(y) else []
    return ImageArrays(_to_rgb(x[keep]), y[keep], classes, skipped)


def load_mnist(root: Path, val_fraction: float, seed: int,
               skip_bad: bool = False) -> tuple[ImageArrays, ImageArrays]:
    """MNIST idx files (``*-images-idx3-ubyte[.gz]`` / ``*-labels-idx1-ubyte[.gz]``). With both train and
    t10k files, t10k is the validation set; with only one pair, ``val_fraction`` of it is held out."""
    def find(prefix: str, kind: str) -> Optional[Path]:
        hits = sorted(root.glob(f"{prefix}-{kind}-idx*-ubyte*"))
        return hits[0] if hits else None

    classes = [str(i) for i in range(10)]
    pairs = {p: (find(p, "images"), find(p, "labels")) for p in ("train", "t10k")}
    loaded = {p: _read_mnist_pair(i, l, classes, skip_bad) for p, (i, l) in pairs.items() if i and l}
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
    except (PermissionError, IsADirectoryError, FileNotFoundError) as exc:  # the file itself cannot be read
        raise BadImageError(f"cannot read image file {path}: {exc.strerror or exc}") from exc
    except Exception as exc:  # PIL raises many types for corrupt/truncated/non-image files
        raise BadImageError(f"cannot decode image {path}: {exc}") from exc


def _list(folder: Path, recursive: bool) -> list[Path]:
    try:
        return sorted(folder.rglob("*") if recursive else folder.iterdir())
    except OSError as exc:
        raise DataError(f"cannot list folder {folder}: {exc.strerror or exc}") from exc


def _scan_folder(folder: Path) -> tuple[list[Path], list[int], list[str]]:
    """Image files and labels of ``<folder>/<class>/**/<image>``. Hidden entries (``.name``) are not classes or
    images; files without an image suffix (README.txt, labels.csv) are ignored and counted in the log; a file
    WITH an image suffix is always decoded, so a broken ``.jpg`` is a bad image, never silently dropped."""
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    classes = [d.name for d in _list(folder, False) if d.is_dir() and not d.name.startswith(".")]
    if not classes:
        raise DataError(f"{folder} has no class sub-folders (expected {folder}/<class>/<image>)")
    files, labels, ignored = [], [], []
    for label, cls in enumerate(classes):
        found = []
        for p in _list(folder / cls, True):
            if any(part.startswith(".") for part in p.relative_to(folder / cls).parts):
                continue
            if p.suffix.lower() in IMAGE_SUFFIXES:
                found.append(p)
            elif not p.is_dir():
                ignored.append(p)
        if not found:
            raise DataError(f"class folder {folder / cls} has no images ({', '.join(IMAGE_SUFFIXES)})"
                            + (f"; it holds {len([p for p in ignored if p.parent == folder / cls])} other file(s)"
                               if any(p.parent == folder / cls for p in ignored) else ""))
        files += found
        labels += [label] * len(found)
    if ignored:
        log.info("ignored %d non-image file(s) under %s, e.g. %s", len(ignored), folder, ignored[0])
    return files, labels, classes


def _cache_dir() -> Path:
    return Path(os.environ.get("CTXAGG_CACHE", Path.home() / ".cache" / "ctxagg"))


def _stat_key(path: Path) -> tuple[str, int, int]:
    try:
        st = path.stat()
    except OSError as exc:
        raise BadImageError(f"cannot read image file {path}: {exc.strerror or exc}") from exc
    return str(path), st.st_mtime_ns, st.st_size


def _load_cache(cache: Path, classes: list[str], skip_bad: bool) -> Optional[ImageArrays]:
    try:
        with np.load(cache) as z:
            arrays = ImageArrays(z["images"], z["labels"], classes, [str(s) for s in z["skipped"]])
    except Exception as exc:  # a torn or stale cache is rebuilt, never trusted
        log.warning("ignoring unreadable decode cache %s (%s); decoding again", cache, exc)
        return None
    if arrays.skipped and not skip_bad:
        raise BadImageError(f"cannot decode image {arrays.skipped[0]} ({len(arrays.skipped)} bad image(s) recorded "
                            f"in the decode cache); fix or remove them, or pass --skip-bad-images")
    if arrays.skipped:
        log.warning("skipped %d unreadable image(s), e.g. %s (from the decode cache)", len(arrays.skipped),
                    arrays.skipped[0])
    return arrays


def load_image_folder(folder: Path, size: Optional[int], skip_bad: bool = False) -> ImageArrays:
    """Decode an ImageFolder (``<class>/<image>``) once into uint8 arrays, cached on disk by file list.

    Images of different sizes are resized to ``size`` (bicubic); a corrupt or unreadable file stops the load
    with its name, or with ``skip_bad`` is skipped, counted and logged. A class left with no readable image
    stops the load (its label would silently vanish)."""
    files, labels, classes = _scan_folder(folder)
    key = hashlib.sha1(repr((str(folder.resolve()), size, [_stat_key(f) for f in files])).encode()).hexdigest()[:16]
    cache = _cache_dir() / f"imagefolder-{key}.npz"
    if cache.exists():
        cached = _load_cache(cache, classes, skip_bad)
        if cached is not None:
            return cached
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
    empty = [classes[c] for c in range(len(classes)) if c not in set(kept)]
    if empty:
        raise DataError(f"class folder(s) {', '.join(str(folder / c) for c in empty[:5])} have no readable image "
                        f"left after skipping {len(skipped)} bad one(s)")
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise DataError(f"images under {folder} have different sizes {sorted(shapes)[:3]}...; pass --img-size "
                        "so they are resized once while decoding")
    arrays = ImageArrays(np.stack(images), np.asarray(kept, dtype=np.int64), classes, skipped)
    _save_cache(cache, arrays)
    return arrays


def _save_cache(cache: Path, arrays: ImageArrays) -> None:
    """Best effort (a full disk only costs the next run a decode); a unique temp name, so parallel processes
    (DDP ranks) never write into each other's file."""
    tmp = None
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{cache.stem}.", suffix=".npz", dir=cache.parent)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, images=arrays.images, labels=arrays.labels, skipped=np.asarray(arrays.skipped, dtype=str))
        os.replace(tmp, cache)
    except OSError as exc:
        log.warning("could not write the decode cache %s: %s", cache, exc)
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def load_dataset(spec: str, val_fraction: float = 0.2, seed: int = 0, decode_size: Optional[int] = None,
                 skip_bad: bool = False) -> tuple[ImageArrays, ImageArrays]:
    """(train, val) arrays for a data SPEC (see module docstring)."""
    kind, _, path = spec.partition(":")
    if kind == "digits":
        return _split(load_digits_arrays(), val_fraction, seed)
    if kind not in ("imagefolder", "cifar10", "mnist") or not path:
        raise DataError(f"unknown data spec {spec!r}; use one of {', '.join(DATA_SPECS)}")
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data path {root} does not exist (from --data {spec})")
    if kind == "cifar10":
        return load_cifar10(root, skip_bad)
    if kind == "mnist":
        return load_mnist(root, val_fraction, seed, skip_bad)
    if (root / "train").is_dir():
        val_dir = next((root / d for d in ("val", "test", "validation") if (root / d).is_dir()), None)
        train = load_image_folder(root / "train", decode_size, skip_bad)
        if val_dir is not None:
            val = load_image_folder(val_dir, decode_size, skip_bad)
            if val.classes != train.classes:
                raise DataError(f"{val_dir} classes {val.classes[:5]}... differ from {root / 'train'}'s")
            return train, val
        return _split(train, val_fraction, seed)
    return _split(load_image_folder(root, decode_size, skip_bad), val_fraction, seed)
