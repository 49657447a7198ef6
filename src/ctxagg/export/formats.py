"""`ctxagg export`: ONNX (checked against onnxruntime), TorchScript and torch.export programs."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["export_model", "FORMATS", "verify_onnx", "supports_dynamic_spatial"]

FORMATS = ("onnx", "torchscript", "exported-program")


def _dynamic_shapes(dynamic_spatial: bool, multiple: int) -> dict[str, Any]:
    batch = torch.export.Dim("batch", min=1, max=4096)
    shapes: dict[int, Any] = {0: batch}
    if dynamic_spatial:  # multiples of the total stride so every stage divides evenly; torch.export
        # specialises the last stage on having more than one position, hence at least 2 strides
        shapes[2] = multiple * torch.export.Dim("h_blocks", min=2, max=128)
        shapes[3] = multiple * torch.export.Dim("w_blocks", min=2, max=128)
    return {"x": shapes}


def supports_dynamic_spatial(model: nn.Module) -> bool:
    """Whether the model accepts other input sizes than the one it was built for."""
    if getattr(model, "pretrained_cfg", {}).get("fixed_input_size", False):
        return False
    if getattr(model, "fixed_img_size", None) is not None:
        return False
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None and getattr(patch_embed, "strict_img_size", False):
        return False  # timm ViT/Swin built without dynamic_img_size
    return True


def verify_onnx(path: Path, model: nn.Module, inputs: Sequence[torch.Tensor], atol: float = 1e-4) -> list[float]:
    """Max |onnxruntime − PyTorch| for each input; raises if any exceeds ``atol``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    errors = []
    with torch.no_grad():
        for x in inputs:
            ref = model(x).float().numpy()
            out = session.run(None, {name: x.numpy()})[0]
            if out.shape != ref.shape:
                raise AssertionError(f"onnxruntime output {out.shape} != PyTorch {ref.shape} for input {tuple(x.shape)}")
            errors.append(float(np.abs(out - ref).max()))
    if max(errors) > atol:
        raise AssertionError(f"onnxruntime differs from PyTorch by up to {max(errors):.2e} (> {atol})")
    return errors


def total_stride(model: nn.Module, default: int = 32) -> int:
    """The model's output stride, from its timm ``feature_info`` (16 for the small-input presets)."""
    info = getattr(model, "feature_info", None)
    try:
        return int(info[-1]["reduction"]) if info else default
    except (TypeError, KeyError, IndexError):
        return default


def export_model(model: nn.Module, path: str, fmt: str = "onnx", img_size: Sequence[int] = (224, 224),
                 in_chans: int = 3, dynamic_spatial: Optional[bool] = None, stride: Optional[int] = None,
                 opset: int = 18) -> dict[str, Any]:
    """Export an eval-mode ``model`` with a dynamic batch axis (and dynamic H, W in multiples of the model's
    stride when ``dynamic_spatial``; default: on unless the model has a fixed input size or the export size is
    under two strides) and check the result."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {FORMATS}")
    model = model.eval()
    stride = stride or total_stride(model)
    if dynamic_spatial is None:
        dynamic_spatial = supports_dynamic_spatial(model) and min(img_size) >= 2 * stride
    out = Path(path)
    if fmt == "exported-program" and out.suffix != ".pt2":
        raise ConfigError(f"torch.export programs are saved as .pt2 archives, got {out.name!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    h, w = img_size
    example = torch.randn(2, in_chans, h, w)
    checks = [torch.randn(1, in_chans, h, w), torch.randn(3, in_chans, h, w)]
    if dynamic_spatial:
        checks.append(torch.randn(2, in_chans, h + stride, w + 2 * stride))
    report: dict[str, Any] = dict(format=fmt, path=str(out), dynamic_batch=True, dynamic_spatial=dynamic_spatial)
    if fmt == "onnx":
        torch.onnx.export(model, (example,), str(out), dynamo=True, opset_version=opset, verbose=False,
                          dynamic_shapes=_dynamic_shapes(dynamic_spatial, stride))
        try:
            report["max_abs_error"] = verify_onnx(out, model, checks)
        except Exception as exc:  # noqa: BLE001  (onnxruntime raises its own exception types)
            if not dynamic_spatial:
                raise
            # e.g. LESA's relative-offset tables: onnxruntime mis-plans buffers for symbolic H, W; a graph
            # with dynamic batch and fixed H, W still exports and verifies
            report.update(dynamic_spatial=False, note=f"dynamic H, W failed in onnxruntime ({str(exc)[:160]}); "
                                                      "exported with fixed H, W")
            torch.onnx.export(model, (example,), str(out), dynamo=True, opset_version=opset, verbose=False,
                              dynamic_shapes=_dynamic_shapes(False, stride))
            report["max_abs_error"] = verify_onnx(out, model, checks[:2])
    elif fmt == "exported-program":
        program = torch.export.export(model, (example,), dynamic_shapes=_dynamic_shapes(dynamic_spatial, stride))
        torch.export.save(program, str(out))
        loaded = torch.export.load(str(out)).module()
        with torch.no_grad():
            report["max_abs_error"] = [float((loaded(x) - model(x)).abs().max()) for x in checks]
    else:
        with torch.no_grad():
            scripted = torch.jit.trace(model, example, check_trace=False)
        scripted.save(str(out))
        loaded = torch.jit.load(str(out))
        with torch.no_grad():
            report["max_abs_error"] = [float((loaded(x) - model(x)).abs().max()) for x in checks]
    return report
