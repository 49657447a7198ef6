"""PNG figures of dense-prediction runs: loss / metric curves and predictions on validation images."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks  # noqa: E402

from ..train.plots import save_panels  # noqa: E402
from .predict import predict  # noqa: E402

__all__ = ["plot_dense_curves", "plot_predictions", "draw_detections", "colorize"]


def plot_dense_curves(history: list[dict[str, Any]], path: Path, metric: str, title: str = "") -> None:
    epochs = [h["epoch"] + 1 for h in history]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h.get("train_loss", float("nan")) for h in history], marker="o", label="train loss")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="training loss")
    ax_metric.plot(epochs, [h[metric] for h in history], marker="o", label=f"val {metric}")
    if "segm_map" in history[0]:
        ax_metric.plot(epochs, [h["segm_map"] for h in history], marker="o", label="val segm_map")
    ax_metric.set(xlabel="epoch", ylabel=metric, title="validation")
    save_panels(fig, (ax_loss, ax_metric), path, title)


def draw_detections(image: Tensor, pred: dict[str, Tensor], classes: Sequence[str], score_threshold: float = 0.3
                    ) -> Tensor:
    """uint8 (3, H, W) image with boxes (and masks) scoring ≥ ``score_threshold`` drawn, labelled by class."""
    canvas = (image.clamp(0, 1) * 255).to(torch.uint8)
    keep = pred["scores"] >= score_threshold if "scores" in pred else torch.ones(len(pred["labels"]), dtype=bool)
    if "masks" in pred and keep.any():
        masks = pred["masks"][keep]
        masks = (masks[:, 0] > 0.5) if masks.dim() == 4 else masks.bool()
        canvas = draw_segmentation_masks(canvas, masks, alpha=0.4)
    names = [classes[int(lab) - 1] if 0 < int(lab) <= len(classes) else str(int(lab)) for lab in pred["labels"][keep]]
    if "scores" in pred:
        names = [f"{n} {s:.2f}" for n, s in zip(names, pred["scores"][keep].tolist())]
    return draw_bounding_boxes(canvas, pred["boxes"][keep], labels=names, colors="red", width=2)


def colorize(label: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """(H, W) class map → float (H, W, 3) colours (tab20), ignored pixels black."""
    cmap = plt.get_cmap("tab20", max(num_classes, 2))
    table = torch.tensor([cmap(i)[:3] for i in range(num_classes)] + [(0.0, 0.0, 0.0)])
    idx = torch.where((label >= 0) & (label < num_classes), label, torch.full_like(label, num_classes))
    return table[idx]


def plot_predictions(model: nn.Module, cfg, dataset, classes: Sequence[str], device: torch.device, path: Path,
                     count: int = 4) -> None:
    """Up to ``count`` validation images: ground truth next to the model's prediction."""
    count = min(count, len(dataset))
    fig, axes = plt.subplots(count, 3 if cfg.task == "segment" else 2, figsize=(10, 3.2 * count), squeeze=False)
    for row in range(count):
        image, target = dataset[row]
        if cfg.task == "detect":
            pred = predict(model, cfg, [image], device)[0]
            panels = [("ground truth", draw_detections(image, target, classes)),
                      ("prediction (score ≥ 0.3)", draw_detections(image, pred, classes))]
            panels = [(t, p.permute(1, 2, 0)) for t, p in panels]
        else:
            pred = predict(model, cfg, [image], device, [tuple(target.shape[-2:])])[0]
            panels = [("image", image.permute(1, 2, 0).clamp(0, 1)),
                      ("ground truth", colorize(target, len(classes), cfg.ignore_index)),
                      ("prediction", colorize(pred, len(classes), cfg.ignore_index))]
        for ax, (title, picture) in zip(axes[row], panels):
            ax.imshow(picture.numpy())
            ax.set_title(title)
            ax.axis("off")
    fig.suptitle(f"{cfg.arch} + {cfg.backbone} on {cfg.data} (validation)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
