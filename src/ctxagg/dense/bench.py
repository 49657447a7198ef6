"""`ctxagg bench dense`: each backbone as a detector or segmenter sees it — built for any input size
(:func:`~ctxagg.dense.backbone.create_dense_backbone`: DeiT/Swin with dynamic sizes, LESA at output stride 32)
and returning the multi-scale maps an FPN reads — at detection (800×1333) and segmentation (512×512) sizes.
Container §3.5's reason for Container-Light, measured: global attention in the high-resolution stages does not
scale to these inputs. Sizes whose predicted pass exceeds the time budget keep their meta-device predictions."""
from __future__ import annotations

import json
from typing import Any, Callable, Optional, Sequence

import torch

from ..bench.sweep import format_sweep, sweep_models
from ..runs import output_dir
from .backbone import create_dense_backbone

__all__ = ["DENSE_BACKBONES", "DENSE_SIZES", "dense_backbone_sweep", "run_dense_bench"]

DENSE_BACKBONES = ("container_light", "container", "linglo_b0", "resnet50_lesa", "swin_t")
DENSE_SIZES = ((512, 512), (800, 1333))  # Semantic FPN on ADE20K crops; COCO detection (short side 800)
OUTPUTS = ("bench_dense.json",)
SIZE_DIVISIBLE = 32  # torchvision's GeneralizedRCNNTransform pads every batch to a multiple of 32


def dense_backbone_sweep(models: Sequence[str] = DENSE_BACKBONES, sizes: Sequence[tuple[int, int]] = DENSE_SIZES,
                         batch: int = 1, warmup: int = 1, repeats: int = 3, max_seconds: float = 30.0,
                         device: str = "cpu", progress: Optional[Callable[[dict[str, Any]], None]] = None
                         ) -> list[dict[str, Any]]:
    """Rows of :func:`ctxagg.bench.sweep.sweep_models` for each backbone's four FPN levels (strides 4-32), at each
    size padded up to a multiple of 32 as the detectors' transform batches images (800×1333 → 800×1344)."""
    def build(name: str) -> Callable[[], torch.nn.Module]:
        def make() -> torch.nn.Module:
            torch.manual_seed(0)
            return create_dense_backbone(name, num_levels=4).eval()
        return make

    padded = [tuple(-(-side // SIZE_DIVISIBLE) * SIZE_DIVISIBLE for side in size) for size in sizes]
    return sweep_models([(name, build(name)) for name in models], padded, batch, warmup, repeats, max_seconds,
                        device, progress, family="dense", source="backbone features at dense-prediction sizes")


def run_dense_bench(models: Sequence[str] = DENSE_BACKBONES, sizes: Sequence[tuple[int, int]] = DENSE_SIZES,
                    batch: int = 1, warmup: int = 1, repeats: int = 3, max_seconds: float = 30.0, device: str = "cpu",
                    output: Optional[str] = None, overwrite: bool = False,
                    echo: Optional[Callable[[str], None]] = print) -> dict[str, Any]:
    """:func:`dense_backbone_sweep`, printed as a table and written to ``bench_dense.json`` in the results folder."""
    out = output_dir(output, "bench", "dense", overwrite=overwrite, outputs=OUTPUTS)
    say = echo or (lambda text: None)
    say(f"dense backbones {list(models)} at {[f'{h}x{w}' for h, w in sizes]}, batch {batch}, {device}, "
        f"{torch.get_num_threads()} threads, {max_seconds:g} s budget a pass")
    rows = dense_backbone_sweep(models, sizes, batch, warmup, repeats, max_seconds, device,
                                progress=lambda r: say(f"  {r['model']} {r['size']}: {r['status']}"))
    table = format_sweep(rows)
    say(table)
    meta = dict(batch=batch, sizes=[list(s) for s in sizes], device=device, threads=torch.get_num_threads(),
                torch=torch.__version__, max_seconds=max_seconds)
    path = out / OUTPUTS[0]
    path.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    return dict(rows=rows, files=[str(path)], table=table, output=str(out))
