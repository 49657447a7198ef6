"""`ctxagg export --int8 --calib DATA`: static (or dynamic) int8 post-training quantization of a trained checkpoint,
calibrated on the user's images, checked against the fp32 model on held-out images, saved as a torch.export
program (.pt2).

Calibration uses ``calib_images`` images of DATA's training split, agreement ``val_images`` of its validation
split (both fixed-seed subsets), transformed as the run's evaluation (its size, mean and std). The agreement is
measured on the *compiled* int8 model (oneDNN int8 kernels), i.e. what a deployment runs.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..errors import ConfigError
from .optimize import deploy_module, reparameterize
from .quantize import INT8_MODES, quantize_int8

__all__ = ["run_int8_export", "load_int8_program"]


def _images(arrays, count: int, size: int, mean, std, batch: int, seed: int) -> DataLoader:
    from ..train.data import ArrayDataset
    from ..train.model import build_eval_transform

    if len(arrays.labels) == 0:
        raise ConfigError("the calibration data has no images in that split")
    index = np.random.default_rng(seed).permutation(len(arrays.labels))[:count]
    return DataLoader(ArrayDataset(arrays.subset(np.sort(index)), build_eval_transform(size, mean, std)),
                      batch_size=batch, shuffle=False)


@torch.no_grad()
def _accuracy_and_agreement(reference: nn.Module, candidate: nn.Module, loader: Iterable) -> dict[str, Any]:
    """Top-1 of both models against the labels, and the fraction of images where their top-1 agree."""
    fp32_hits = int8_hits = same = total = 0
    for images, labels in loader:
        ref, out = reference(images).argmax(1), candidate(images).argmax(1)
        fp32_hits += int((ref == labels).sum())
        int8_hits += int((out == labels).sum())
        same += int((ref == out).sum())
        total += len(labels)
    return dict(val_images=total, fp32_top1=100 * fp32_hits / total, int8_top1=100 * int8_hits / total,
                top1_agreement=100 * same / total)


def _source_model(model: Optional[str], checkpoint: Optional[str], model_kwargs: Optional[dict], train_arrays
                  ) -> tuple[nn.Module, int, Any, Any]:
    """The fp32 model, its input size and the mean/std its inputs are normalised with."""
    import timm

    if checkpoint:
        from ..train.model import load_trained_model

        net, cfg, meta, _ = load_trained_model(checkpoint, model, purpose="export")
        return net, cfg.img_size, meta["mean"], meta["std"]
    if not model:
        raise ConfigError("pass --model NAME or --checkpoint RUN")
    net = timm.create_model(model, **(model_kwargs or {}))
    mean, std = train_arrays.channel_stats()
    return net, net.pretrained_cfg["input_size"][-1], mean, std


def run_int8_export(output: str, calib: str, model: Optional[str] = None, checkpoint: Optional[str] = None,
                    mode: str = "static", img_size: Optional[int] = None, calib_images: int = 256,
                    val_images: int = 1000, batch_size: int = 32, bf16: bool = False,
                    model_kwargs: Optional[dict[str, Any]] = None, seed: int = 0, observer: str = "histogram"
                    ) -> dict[str, Any]:
    """Quantize, measure and save (see the module docstring). Returns the report: mode, images used, fp32 and int8
    top-1 on the validation images and their top-1 agreement, the saved program's max |difference| from the
    in-memory quantized model, and the seconds each part took."""
    from ..train.data import load_dataset

    if mode not in INT8_MODES:
        raise ConfigError(f"unknown --int8-mode {mode!r}; choose one of {INT8_MODES}")
    if calib_images < 1 or val_images < 1 or batch_size < 1:
        raise ConfigError("--calib-images, --val-images and the batch size must be at least 1")
    if Path(output).suffix != ".pt2":
        raise ConfigError(f"an int8 model is saved as a torch.export program (.pt2), got {Path(output).name!r}")
    train_arrays, val_arrays = load_dataset(calib, seed=seed)
    net, size, mean, std = _source_model(model, checkpoint, model_kwargs, train_arrays)
    size = img_size or size
    fp32 = reparameterize(net)
    calibration = _images(train_arrays, calib_images, size, mean, std, batch_size, seed)
    started = time.perf_counter()
    quantized = quantize_int8(fp32, (images for images, _ in calibration), mode=mode, observer=observer)
    report: dict[str, Any] = dict(mode=mode, observer=observer, calib=calib, img_size=size, bf16_rest=bf16,
                                  calib_images=min(calib_images, len(train_arrays.labels)),
                                  quantize_s=time.perf_counter() - started)
    started = time.perf_counter()
    deployed = deploy_module(quantized, channels_last=True, bf16=bf16, compile=True)
    report.update(_accuracy_and_agreement(fp32, deployed, _images(val_arrays, val_images, size, mean, std,
                                                                  batch_size, seed)))
    report["measure_s"] = time.perf_counter() - started
    report.update(_save_program(quantized, output, next(iter(calibration))[0]))
    return report


def _save_program(quantized: nn.Module, output: str, example: torch.Tensor) -> dict[str, Any]:
    """torch.export the quantized graph (dynamic batch) to ``output`` and check the reloaded program."""
    example = example.contiguous(memory_format=torch.channels_last)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(quantized, (example,), dynamic_shapes=({0: batch},) if len(example) > 1 else None)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, output)
    reloaded = load_int8_program(output)
    with torch.no_grad():
        error = float((reloaded(example) - quantized(example)).abs().max())
    return dict(path=output, max_abs_error=[error], size_mb=Path(output).stat().st_size / 2 ** 20)


def load_int8_program(path: str) -> nn.Module:
    """The quantized graph saved by :func:`run_int8_export` as a module (simulated int8 in eager; wrap it with
    :func:`ctxagg.export.optimize.deploy_module` to compile it into int8 kernels)."""
    from .quantize import require_torchao

    require_torchao()  # registers the quantized ops and inductor passes the program refers to
    from torchao.quantization.pt2e import allow_exported_model_train_eval

    module = torch.export.load(path).module()
    allow_exported_model_train_eval(module)
    return module
