"""Downstream dense prediction on any backbone: detection (RetinaNet, FCOS, Faster/Mask R-CNN, DETR family),
instance and semantic segmentation (Semantic FPN), as container.txt Tables 4–5, linglos.txt Tables 3–4 and
lesa.txt's COCO experiments use them. Needs the ``dense`` extra (transformers, torchmetrics, pycocotools)."""
from .backbone import SimplePyramid, TimmFeatures, TimmFPN, create_dense_backbone, dense_model_kwargs
from .detectors import TORCHVISION_DETECTORS, build_torchvision_detector
from .semantic_fpn import SemanticFPN, build_semantic_fpn

__all__ = ["SimplePyramid", "TimmFeatures", "TimmFPN", "create_dense_backbone", "dense_model_kwargs",
           "TORCHVISION_DETECTORS", "build_torchvision_detector", "SemanticFPN", "build_semantic_fpn"]
