"""The ``ctxagg detect`` and ``ctxagg segment`` command groups (``train``, ``eval``), registered by
:func:`add_dense_subcommands`; the work lives in :mod:`ctxagg.dense.engine`."""
from __future__ import annotations

import argparse
import json

from ..flags import add_dataclass_flags, dataclass_values
from .config import DATA_HELP, DenseConfig

__all__ = ["add_dense_subcommands"]

# what the embedded default needs to be quick: the digit canvases are 96×128 (upsampled to 128×171 here)
TASK_DEFAULTS = {"detect": dict(arch="retinanet", min_size=128, max_size=192),
                 "segment": dict(arch="semantic_fpn", min_size=128, max_size=192)}
ARCH_HELP = {"detect": "retinanet, fcos, faster_rcnn, mask_rcnn (torchvision); detr, conditional_detr, "
                       "deformable_detr (transformers)",
             "segment": "semantic_fpn (Kirillov et al. 2019)"}


def _cmd_train(args: argparse.Namespace) -> int:
    from ..models import resolve_model_name
    from .engine import main_metric, train_dense

    resolve_model_name(args.backbone)
    cfg = DenseConfig(**dataclass_values(DenseConfig, args, task=args.task))
    result = train_dense(cfg, output=args.output, resume=args.resume, overwrite=args.overwrite,
                         progress=not args.no_progress)
    key = main_metric(cfg.task)
    best = max((h[key] for h in result.history), default=float("nan"))
    print(f"\n{cfg.arch} on {cfg.backbone}, {cfg.data}: best {key} {best:.4f}")
    print(f"run folder: {result.output}\n(checkpoint model_best.safetensors, resume state last.safetensors, "
          "metrics.csv, curves.png, predictions.png)")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .engine import evaluate_dense

    result = evaluate_dense(args.checkpoint, args.data, args.output, args.val_limit, args.device,
                            progress=not args.no_progress, overwrite=args.overwrite)
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, list)}, indent=2))
    print(f"wrote {result['output']}")
    return 0


def _add_task(subparsers: argparse._SubParsersAction, task: str, help: str) -> None:
    group = subparsers.add_parser(task, help=help, description=help)
    commands = group.add_subparsers(dest=f"{task}_command", required=True)
    train = commands.add_parser("train", help=f"train a {task} model on any backbone",
                                description=f"Data (--data): {DATA_HELP[task]}. Models (--arch): {ARCH_HELP[task]}. "
                                            "Each run writes to a new runs/<task>-<arch>-<backbone>-<data>-<stamp> "
                                            "(runs/latest points to it) unless --output names a folder.")
    add_dataclass_flags(train, DenseConfig, skip=("task",), defaults=TASK_DEFAULTS[task],
                        helps=dict(backbone="any ctxagg or timm model name",
                                   backbone_checkpoint="a `ctxagg train` run (or its model_best.safetensors) "
                                                       "whose weights initialise the backbone",
                                   frozen_bn="freeze BatchNorm (default: only with --backbone-checkpoint)",
                                   detector_kwargs="torchvision detector arguments, or transformers config fields"))
    train.set_defaults(frozen_bn=None, func=_cmd_train, task=task)
    train.add_argument("--output", help="run folder (default: a new one under runs/)")
    train.add_argument("--resume", help="a run folder (or its last.safetensors) to continue exactly")
    train.add_argument("--overwrite", action="store_true", help="replace the run an explicit --output holds")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    ev = commands.add_parser("eval", help=f"evaluate a {task} checkpoint; writes eval.json and predictions.png")
    ev.add_argument("checkpoint", help="a run folder or a .safetensors written by `ctxagg "
                                       f"{task} train`")
    ev.add_argument("--data", help="data spec (default: the run's)")
    ev.add_argument("--output", help="folder for eval.json and predictions.png (default: <run>/eval-val)")
    ev.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation there")
    ev.add_argument("--val-limit", type=int, default=0, help=">0: evaluate on this many validation images")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(func=_cmd_eval)


def add_dense_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``ctxagg detect train|eval`` and ``ctxagg segment train|eval``."""
    _add_task(subparsers, "detect", "object detection and instance segmentation on any backbone (COCO mAP)")
    _add_task(subparsers, "segment", "semantic segmentation with Semantic FPN on any backbone (mIoU)")
