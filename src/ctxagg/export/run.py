"""`ctxagg export` as a function: rebuild a trained (or fresh) model, re-parameterise it, export and verify it.

An existing export file is never replaced without ``overwrite`` (see :mod:`ctxagg.runs`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ..errors import ConfigError, RunExistsError
from .formats import FORMATS, export_model
from .optimize import reparameterize

__all__ = ["run_export", "refuse_existing_file"]


def refuse_existing_file(output: str, overwrite: bool) -> None:
    taken = [p for p in (Path(output), Path(output + ".data")) if p.exists()]
    if taken and not overwrite:
        raise RunExistsError(f"--output {output} already exists ({', '.join(str(p) for p in taken)}); nothing was "
                             "changed. Use another --output or --overwrite to replace it")
    if taken and Path(output).is_dir():
        raise RunExistsError(f"--output {output} is a folder; give a file name (.onnx, .pt or .pt2)")


def run_export(output: str, model: Optional[str] = None, checkpoint: Optional[str] = None, fmt: str = "onnx",
               img_size: Optional[int] = None, static_spatial: bool = False, reparameterized: bool = True,
               model_kwargs: Optional[dict[str, Any]] = None, overwrite: bool = False) -> dict[str, Any]:
    """Export ``checkpoint`` (a `ctxagg train` checkpoint or run folder; the model is rebuilt from it) or the
    registered ``model`` (untrained) to ``output`` in ``fmt`` and check it against PyTorch. Returns
    :func:`export_model`'s report, with ``data_file`` where ONNX stored the weights next to the graph."""
    import timm

    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {FORMATS}")
    refuse_existing_file(output, overwrite)
    if checkpoint:
        from ..train.model import load_trained_model

        net, cfg, _, _ = load_trained_model(checkpoint, model, purpose="export")
        size = img_size or cfg.img_size
    elif model:
        net = timm.create_model(model, **(model_kwargs or {}))
        size = img_size or net.pretrained_cfg["input_size"][-1]
    else:
        raise ConfigError("pass --model NAME (and optionally --checkpoint from `ctxagg train`)")
    net = reparameterize(net) if reparameterized else net.eval()
    report = export_model(net, output, fmt, img_size=(size, size), dynamic_spatial=False if static_spatial else None)
    data = Path(report["path"] + ".data")
    report["data_file"] = str(data) if data.exists() else None
    return report
