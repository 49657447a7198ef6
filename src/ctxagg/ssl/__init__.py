"""Self-supervised pre-training (`ctxagg ssl train / probe`): DINO (Caron et al. 2021) with a k-NN monitor, the
framework of container.txt §4.5 / Table 6."""
from .config import SSLConfig
from .dino import DINOHead, DINOLoss, MultiCropWrapper, cosine_schedule, teacher_temperature, update_teacher
from .knn import knn_accuracy, knn_predict, train_linear_probe
from .model import build_backbone, init_from_ssl, load_ssl_backbone

__all__ = ["SSLConfig", "DINOHead", "DINOLoss", "MultiCropWrapper", "cosine_schedule", "teacher_temperature",
           "update_teacher", "knn_predict", "knn_accuracy", "train_linear_probe", "build_backbone",
           "load_ssl_backbone", "init_from_ssl"]
