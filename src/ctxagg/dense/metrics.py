"""COCO detection metrics and mIoU, on torchmetrics (``MeanAveragePrecision``, ``MulticlassJaccardIndex``)."""
from __future__ import annotations

from typing import Sequence

from torch import Tensor

__all__ = ["DetectionMetric", "SegmentationMetric", "COCO_KEYS", "coco_backend"]

COCO_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large")


def coco_backend() -> str:
    """``faster_coco_eval`` when installed, else ``pycocotools`` (both give COCO's 101-point interpolated AP)."""
    try:
        import faster_coco_eval  # noqa: F401
        return "faster_coco_eval"
    except ImportError:
        return "pycocotools"


class DetectionMetric:
    """COCO AP (Lin et al. 2014: mean over IoU 0.50:0.05:0.95 and classes), AP50, AP75 and AP for small /
    medium / large objects, for boxes and, with ``masks=True``, instance masks (mask scores > 0.5 binarised,
    paper-silent as torchvision's reference). Labels are 1..C as the detectors emit."""

    def __init__(self, masks: bool = False):
        from torchmetrics.detection import MeanAveragePrecision

        self.masks = masks
        # sync_on_compute off: one process evaluates (rank 0 under torchrun); a sync would wait for the others
        self.box = MeanAveragePrecision(iou_type="bbox", backend=coco_backend(), sync_on_compute=False)
        self.segm = (MeanAveragePrecision(iou_type="segm", backend=coco_backend(), sync_on_compute=False)
                     if masks else None)

    def update(self, preds: Sequence[dict[str, Tensor]], targets: Sequence[dict[str, Tensor]]) -> None:
        cpu = [{k: v.detach().cpu() for k, v in p.items()} for p in preds]
        gts = [{k: v.detach().cpu() for k, v in t.items() if k in ("boxes", "labels", "masks")} for t in targets]
        self.box.update([{k: p[k] for k in ("boxes", "scores", "labels")} for p in cpu],
                        [{k: t[k] for k in ("boxes", "labels")} for t in gts])
        if self.segm is not None:
            self.segm.update([dict(masks=_binary_masks(p["masks"]), scores=p["scores"], labels=p["labels"])
                              for p in cpu], [dict(masks=t["masks"].bool(), labels=t["labels"]) for t in gts])

    def compute(self) -> dict[str, float]:
        out = {f"bbox_{k}": float(v) for k, v in self.box.compute().items() if k in COCO_KEYS}
        if self.segm is not None:
            out.update({f"segm_{k}": float(v) for k, v in self.segm.compute().items() if k in COCO_KEYS})
        return out


def _binary_masks(masks: Tensor) -> Tensor:
    if masks.dim() == 4:  # torchvision's Mask R-CNN: (N, 1, H, W) probabilities
        masks = masks[:, 0]
    return masks > 0.5 if masks.is_floating_point() else masks.bool()


class SegmentationMetric:
    """Mean IoU over classes (Everingham et al. 2010), per-class IoU and pixel accuracy, with ``ignore_index``
    pixels unscored; classes absent from both prediction and ground truth over the whole set are left out of
    the mean (torchmetrics' macro average, as mmsegmentation's nan-mean)."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

        local = dict(ignore_index=ignore_index, sync_on_compute=False)  # one process evaluates (as above)
        self.iou = MulticlassJaccardIndex(num_classes, average="macro", **local)
        self.per_class = MulticlassJaccardIndex(num_classes, average="none", **local)
        self.accuracy = MulticlassAccuracy(num_classes, average="micro", **local)

    def update(self, preds: Tensor, target: Tensor) -> None:
        preds, target = preds.detach().cpu(), target.detach().cpu()
        for metric in (self.iou, self.per_class, self.accuracy):
            metric.update(preds, target)

    def compute(self) -> dict[str, object]:
        return dict(miou=100 * float(self.iou.compute()), pixel_acc=100 * float(self.accuracy.compute()),
                    per_class_iou=[100 * float(v) for v in self.per_class.compute()])

